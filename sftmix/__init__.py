"""SFTMix: Mixup-regularised instruction tuning (Xiao et al., arXiv 2410.05248) on Hugging Face TRL.

>>> from sftmix import SFTMixConfig, SFTMixTrainer  # drop-in for trl.SFTConfig / trl.SFTTrainer

The names of the public interface (README.md, "Quick start from Python"), imported lazily so that
``sftmix --help`` stays fast: `SFTMixConfig`, `SFTMixTrainer`, `DynamicsCallback`, `confidence_scores`,
`median_split`, `drop_unconfident`, `mixup_loss`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
_EXPORTS = {
    "SFTMixConfig": "sftmix_config",
    "SFTMixTrainer": "sftmix_trainer",
    "DynamicsCallback": "stage1.online",
    "confidence_scores": "stage1.splits",
    "median_split": "stage1.splits",
    "drop_unconfident": "stage1.splits",
    "mixup_loss": "mixup.loss",
}
__all__ = [
    "DynamicsCallback",
    "SFTMixConfig",
    "SFTMixTrainer",
    "__version__",
    "confidence_scores",
    "drop_unconfident",
    "median_split",
    "mixup_loss",
]

if TYPE_CHECKING:
    from .mixup.loss import mixup_loss
    from .sftmix_config import SFTMixConfig
    from .sftmix_trainer import SFTMixTrainer
    from .stage1.online import DynamicsCallback
    from .stage1.splits import confidence_scores, drop_unconfident, median_split


def __getattr__(name: str):
    # Lazy imports: `import sftmix` does not import torch/transformers.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sftmix' has no attribute {name!r}")
