"""``sftmix run``: stages 1 to 3 in one output directory.

Layout of ``output_dir``::

    dynamics/            stage 1-2: reference checkpoints, per-checkpoint scores, dynamics.jsonl, datamap.png
    checkpoint-*/        stage 3 checkpoints (resume points)
    final/               the trained model and tokenizer
    runs/                TensorBoard logs

Each stage resumes on its own, so re-running the same command after a crash continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from trl import ModelConfig

from .sftmix_config import DataArguments, DynamicsArguments, SFTMixConfig

logger = logging.getLogger(__name__)


def stage1_args(training_args: SFTMixConfig, dyn_args: DynamicsArguments) -> SFTMixConfig:
    """The reference run's arguments: plain NTP, ``reference_epochs`` epochs, in ``output_dir/dynamics``."""
    return dataclasses.replace(
        training_args,
        output_dir=str(Path(training_args.output_dir) / "dynamics"),
        num_train_epochs=dyn_args.reference_epochs,
        max_steps=-1,
        mixup_weight=0.0,
        dynamics_path=None,
    )


def run_pipeline(
    model_args: ModelConfig,
    data_args: DataArguments,
    dyn_args: DynamicsArguments,
    training_args: SFTMixConfig,
) -> str:
    """Run stages 1-2 (`sftmix.dynamics.run_dynamics`) then stage 3 (`sftmix.sftmix_trainer.train`).

    Returns the directory of the final model.
    """
    from .dynamics import run_dynamics
    from .sftmix_trainer import train

    ref_args = stage1_args(training_args, dyn_args)
    if training_args.mixup_weight > 0 and not training_args.dynamics_path:
        run_dynamics(model_args, data_args, dyn_args, ref_args)
        training_args.dynamics_path = str(Path(ref_args.output_dir) / "dynamics.jsonl")
    logger.info(
        "Stage 3: SFTMix training (mixup_weight=%s) into %s",
        training_args.mixup_weight,
        training_args.output_dir,
    )
    final = train(model_args, data_args, training_args)
    dynamics = training_args.dynamics_path
    logger.info(
        "Done. Model: %s | dynamics: %s | data map: %s | logs: tensorboard --logdir %s",
        final,
        dynamics,
        Path(dynamics).with_name("datamap.png") if dynamics else None,
        training_args.output_dir,
    )
    return final
