"""``sftmix train`` and ``sftmix run``: the load-train-save drivers of stage 3 and of stages 1 to 3.

Layout of ``output_dir`` for ``sftmix run``::

    dynamics/            stage 1-2: reference checkpoints, per-checkpoint scores, dynamics.jsonl, datamap.png
    checkpoint-*/        stage 3 checkpoints (resume points)
    final/               the trained model and tokenizer
    runs/                TensorBoard logs

Each stage resumes on its own, so re-running the same command after a crash continues where it stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from trl import ModelConfig, get_peft_config

from ..bema import BEMA_DIR, BEMASaver
from ..data.dataset import prepare_sft_dataset
from ..data.models import load_model, load_tokenizer
from ..data.selection import unconfident_fraction
from ..errors import SFTMixError
from ..io_utils import atomic_write_json, last_complete_checkpoint
from ..sftmix_config import DataArguments, SFTMixConfig
from ..sftmix_trainer import SFTMixTrainer
from ..stage1.reference import stage1_args
from ..stage1.scorers import scorer_for
from ..stage1.splits import align_split, drop_unconfident, read_dynamics_splits
from .dynamics import run_dynamics

logger = logging.getLogger(__name__)

FINAL_DIR = "final"


def train(model_args: ModelConfig, data_args: DataArguments, training_args: SFTMixConfig) -> str:
    """Stage 3 end to end: load, tokenize, train (resuming from the last checkpoint), save; return the model dir.

    Re-running with the same ``output_dir`` resumes from its latest ``checkpoint-*``; once ``output_dir/final``
    exists (it is renamed into place only when complete), the run is done and returns at once.

    Args:
        model_args: TRL's model config (``model_name_or_path``, ``dtype``, ``use_peft``, ``lora_r``...).
        data_args: Where the training data is (`DataArguments`).
        training_args: The `SFTMixConfig` (``output_dir``, ``mixup_weight``, ``dynamics_path``, ``max_length``...).

    Returns:
        The final model directory (``output_dir/final``): the model (or the PEFT adapter) and its tokenizer.
    """
    output_dir = Path(training_args.output_dir)
    final_dir = output_dir / FINAL_DIR
    if final_dir.is_dir():
        logger.info("%s exists: training already finished", final_dir)
        return str(final_dir)
    if not model_args.model_name_or_path:
        raise SFTMixError("model_name_or_path is not set")
    # Inputs are checked before anything is written: data first (cheap), then the model
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    dataset = prepare_sft_dataset(
        data_args, tokenizer, training_args.max_length, training_args.truncation_mode
    )
    drop = unconfident_fraction(data_args.selection)
    if training_args.mixup_weight > 0:  # the batch shape, before anything is written
        SFTMixTrainer.check_mixup_args(training_args)
    if drop is not None:  # data cleaning needs stage 1's confidences first
        if not training_args.dynamics_path:
            _check_scorer_runs_first(training_args)
            training_args.dynamics_path = str(run_dynamics(model_args, data_args, stage1_args(training_args)))
        size = len(dataset)
        dataset = drop_unconfident(dataset, drop, training_args.dynamics_path)
        logger.info("selection %s kept %d of %d examples", data_args.selection, len(dataset), size)
    confident_by_id = None
    if training_args.mixup_weight > 0 and training_args.dynamics_path:
        # read once: the trainer gets the parsed file (else it runs stage 1); after a drop, the halves of what is kept
        kept = dataset["id"] if drop is not None else None
        confident_by_id = read_dynamics_splits(training_args.dynamics_path, among=kept)
        align_split(confident_by_id, dataset["id"], training_args.dynamics_path)
    model_kwargs = {"trust_remote_code": getattr(model_args, "trust_remote_code", False)}
    if model_args.attn_implementation is not None:
        model_kwargs["attn_implementation"] = model_args.attn_implementation
    model = load_model(model_args.model_name_or_path, dtype=model_args.dtype or "float32", **model_kwargs)
    trainer = SFTMixTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        confident_by_id=confident_by_id,
        callbacks=[BEMASaver(update_freq=training_args.bema_update_freq)] if training_args.bema else None,
    )
    last = last_complete_checkpoint(output_dir)
    if last is not None:
        logger.info("Resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)

    tmp_dir = output_dir / f"{FINAL_DIR}.tmp"
    if trainer.accelerator.is_main_process and tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    trainer.accelerator.wait_for_everyone()
    if (
        trainer.is_fsdp_enabled
    ):  # the final model in one file plain transformers loads, however checkpoints are kept
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(tmp_dir))  # every process calls it (FSDP/ZeRO-3 gather); the main one writes
    trainer.save_model_card(tmp_dir)  # TRL's card, with SFTMix's settings and the data map
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(tmp_dir)
        if training_args.bema:  # TRL's callback wrote it to output_dir/bema at the end of training
            os.replace(output_dir / BEMA_DIR, tmp_dir / BEMA_DIR)
            tokenizer.save_pretrained(tmp_dir / BEMA_DIR)
        atomic_write_json(
            tmp_dir / "sftmix_train.json",
            {
                "model_name_or_path": model_args.model_name_or_path,
                "mixup_weight": training_args.mixup_weight,
                "mixup_alpha": training_args.mixup_alpha,
                "dynamics_path": training_args.dynamics_path,
                "selection": data_args.selection,
                "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
                "confidence_scorer": training_args.confidence_scorer
                if training_args.mixup_weight > 0
                else None,
                "global_step": trainer.state.global_step,
            },
        )
        os.replace(tmp_dir, final_dir)  # the rename marks the run as finished
    trainer.accelerator.wait_for_everyone()
    return str(final_dir)


def _check_scorer_runs_first(training_args: SFTMixConfig) -> None:
    scorer_for(training_args, checkpoints=False).check_runs_before_training(
        "selection drop_unconfident needs the confidences before training: set dynamics_path, or use the "
        "reference, base or random scorer"
    )


def run_pipeline(model_args: ModelConfig, data_args: DataArguments, training_args: SFTMixConfig) -> str:
    """Run stages 1-2 then stage 3 (`train`); return the final model's dir.

    The ``reference``, ``base`` and ``random`` scorers run first as ``sftmix dynamics`` does
    (`sftmix.cli.dynamics.run_dynamics`, which tokenizes the data for a reference model with its own tokenizer);
    ``warmup`` and ``online`` make the split inside the target's training (`sftmix.SFTMixTrainer`)."""
    drop = unconfident_fraction(data_args.selection)
    if drop is not None and not training_args.dynamics_path:
        _check_scorer_runs_first(training_args)
    if (
        (training_args.mixup_weight > 0 or drop is not None)
        and not training_args.dynamics_path
        and not scorer_for(training_args, checkpoints=False).inside_training
    ):
        training_args.dynamics_path = str(run_dynamics(model_args, data_args, stage1_args(training_args)))
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
