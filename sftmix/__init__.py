"""SFTMix: Mixup-regularised instruction tuning (Xiao et al., arXiv 2410.05248) on Hugging Face TRL.

>>> from sftmix import SFTMixConfig, SFTMixTrainer  # drop-in for trl.SFTConfig / trl.SFTTrainer
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["SFTMixConfig", "SFTMixTrainer", "__version__"]

if TYPE_CHECKING:
    from .sftmix_config import SFTMixConfig
    from .sftmix_trainer import SFTMixTrainer


def __getattr__(name: str):
    # Lazy imports keep `sftmix --help` fast (no torch/transformers import).
    if name == "SFTMixConfig":
        from .sftmix_config import SFTMixConfig

        return SFTMixConfig
    if name == "SFTMixTrainer":
        from .sftmix_trainer import SFTMixTrainer

        return SFTMixTrainer
    raise AttributeError(f"module 'sftmix' has no attribute {name!r}")
