"""Stage 1's reference run (the ``reference`` scorer): plain next-token prediction, scored at C steps in-process.

The reference model (the target itself by default, or a smaller one: the paper's weak-to-strong result) is
trained on the SFT data for ``reference_epochs`` epochs with `sftmix.SFTMixTrainer` at ``mixup_weight=0``
(exactly TRL's NTP training). At steps ``round(k * T / C)``, k = 1..C (`checkpoint_steps`), the model being
trained is scored where it is (`sftmix.stage1.files.ScoreAtStepsCallback`): no checkpoint is saved and reloaded unless
``keep_reference_checkpoints`` asks for it. A marker file records the data fingerprint and the settings: a rerun
reuses the scored checkpoints, skips a finished run, and refuses a directory trained on other data or settings.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState
from datasets import Dataset
from transformers import PreTrainedModel
from transformers.trainer_utils import SaveStrategy

from ..data.models import load_model
from ..errors import SFTMixError
from ..io_utils import atomic_write_json, last_complete_checkpoint
from .files import SCORES_DIR, ScoreAtStepsCallback

logger = logging.getLogger(__name__)


def checkpoint_steps(total_steps: int, num_checkpoints: int) -> list[int]:
    """The C optimizer steps to save at: ``round(k * T / C)`` for ``k = 1..C`` (half up), step 0 excluded.

    >>> checkpoint_steps(10, 3)
    [3, 7, 10]
    >>> checkpoint_steps(64, 4)
    [16, 32, 48, 64]
    """
    if num_checkpoints < 1:
        raise SFTMixError(f"num_checkpoints must be >= 1, got {num_checkpoints}")
    if total_steps < num_checkpoints:
        raise SFTMixError(
            f"the reference run has {total_steps} optimizer steps, fewer than num_checkpoints={num_checkpoints}: "
            "lower num_checkpoints, the batch size or gradient_accumulation_steps, or use more data"
        )
    # Integer arithmetic for round-half-up of k*T/C, so no float ever decides a step.
    return [
        (2 * k * total_steps + num_checkpoints) // (2 * num_checkpoints)
        for k in range(1, num_checkpoints + 1)
    ]


def stage1_args(training_args: Any) -> Any:
    """Stage 1's config inside ``sftmix run`` and `SFTMixTrainer`: the run's config in ``output_dir/dynamics``,
    without stage 3's step budget (``max_steps``). `_reference_args` derives the reference run from it."""
    return dataclasses.replace(
        training_args, output_dir=str(Path(training_args.output_dir) / "dynamics"), max_steps=-1
    )


def _reference_args(training_args: Any, output_dir: Path, epochs: float) -> Any:
    """The target's training config, redirected to the reference run: its own dir, epochs, no other saves."""
    changes: dict[str, Any] = dict(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        save_strategy=SaveStrategy.NO,
        save_total_limit=None,
        load_best_model_at_end=False,
        push_to_hub=False,
    )
    field_names = {f.name for f in dataclasses.fields(training_args)}
    # Plain NTP: if the config is an SFTMixConfig, switch the regulariser off (no dynamics exist yet), and the
    # target's label smoothing too (the confidences are those of a plain NLL model).
    off = (("mixup_weight", 0.0), ("dynamics_path", None), ("label_smoothing_factor", 0.0))
    changes.update({k: v for k, v in off if k in field_names})
    return dataclasses.replace(training_args, **changes)


REFERENCE_SETTINGS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "seed",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
)
"""Training fields that change the reference checkpoints: a rerun with other values does not resume."""


def _reference_settings(
    model: str, use_peft: bool, training_args: Any, epochs: float, num_checkpoints: int
) -> dict:
    settings = {name: getattr(training_args, name, None) for name in REFERENCE_SETTINGS}
    settings.update(
        model=model,
        use_peft=use_peft,
        epochs=epochs,
        num_checkpoints=num_checkpoints,
    )
    return json.loads(json.dumps(settings, default=str))  # JSON-comparable (enums as strings)


def train_reference(
    model: PreTrainedModel | str,
    dataset: Dataset,
    scoring_dataset: Dataset,
    tokenizer: Any,
    training_args: Any,
    reference_dir: Path,
    trainer_cls: type,
    fingerprint: str,
    model_name: str,
    peft_config: Any = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Train the reference model with plain NTP, scoring it in-process at C steps; return ``[N, C]`` perplexities
    and the steps.

    Args:
        model: The reference model, or its name or path (loaded with ``dtype`` / ``attn_implementation``).
        dataset: The rows trained on, as the trainer takes them.
        scoring_dataset: ``input_ids`` and unshifted ``labels`` of the same rows (`sftmix.stage1.files.with_training_labels`),
            with an ``id`` column: what is scored.
        tokenizer: The reference model's tokenizer.
        training_args: The run's `SFTMixConfig`: copied with ``output_dir=reference_dir``, ``reference_epochs``,
            ``mixup_weight=0`` and no saves but the C steps (``keep_reference_checkpoints``). ``num_checkpoints``,
            ``scoring_batch_size`` and ``head_chunk_size`` apply; so does ``max_steps``.
        reference_dir: The run's directory (its marker, logs, and the checkpoints when kept); the scores files go to
            ``reference_dir/../scores``.
        trainer_cls: The trainer class (`sftmix.SFTMixTrainer`; with ``mixup_weight=0``, TRL's NTP training).
        fingerprint: `sftmix.data.dataset.dataset_fingerprint` of ``scoring_dataset``.
        model_name: The reference model's name, for the marker.
        peft_config: Train a PEFT adapter as the reference (the target run's ``peft_config``).

    A rerun after a crash keeps the checkpoints already scored (their scores files); the run itself starts again
    (deterministically) unless ``keep_reference_checkpoints`` saved a checkpoint to resume from. A finished run is
    not trained again.
    """
    marker = reference_dir / "sftmix_reference.json"
    num_checkpoints, epochs = training_args.num_checkpoints, training_args.reference_epochs
    settings = _reference_settings(
        model_name, peft_config is not None, training_args, epochs, num_checkpoints
    )
    callback = ScoreAtStepsCallback(
        lambda horizon: checkpoint_steps(horizon, num_checkpoints),
        lambda state: state.max_steps,
        scoring_dataset,
        scoring_dataset["id"],
        reference_dir.parent / SCORES_DIR,
        fingerprint,
        training_args.scoring_batch_size,
        getattr(training_args, "head_chunk_size", 1024),
        bool(getattr(training_args, "bf16", False)),
        save=training_args.keep_reference_checkpoints,
    )
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done.get("fingerprint") != fingerprint:
            raise SFTMixError(
                f"{reference_dir} holds a reference run on other data (or another max_length): "
                "use a new output_dir or delete that directory"
            )
        changed = sorted(k for k in settings if done.get("settings", {}).get(k) != settings[k])
        if changed:
            raise SFTMixError(
                f"{reference_dir} holds a reference run with other settings ({', '.join(changed)}): "
                "use a new output_dir or delete that directory"
            )
        steps = done.get("checkpoint_steps", [])
        if (
            done.get("complete")
            and len(steps) == num_checkpoints
            and all(callback.scored(s) is not None for s in steps)
        ):
            logger.info("The reference run in %s is complete and scored: not training again", reference_dir)
            callback.save_steps = steps
            return callback.perplexities(), steps
    state = PartialState()
    if state.is_main_process:
        atomic_write_json(marker, {"complete": False, "fingerprint": fingerprint, "settings": settings})

    if isinstance(model, str):
        model = load_model(model, dtype=dtype, attn_implementation=attn_implementation)
    trainer = trainer_cls(
        model=model,
        args=_reference_args(training_args, reference_dir, epochs),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
    )
    last = last_complete_checkpoint(reference_dir) if training_args.keep_reference_checkpoints else None
    if last is not None:
        logger.info("Resuming the reference run from %s", last)
    trainer.train(resume_from_checkpoint=last)
    steps = callback.save_steps
    perplexities = callback.perplexities()
    del trainer, model
    gc.collect()
    if state.is_main_process:
        record = {
            "checkpoint_steps": steps,
            "complete": True,
            "fingerprint": fingerprint,
            "settings": settings,
        }
        atomic_write_json(marker, record)
        if training_args.keep_reference_checkpoints and not training_args.keep_reference_optimizer:
            drop_optimizer_states([reference_dir / f"checkpoint-{step}" for step in steps])
    state.wait_for_everyone()
    return perplexities, steps


def drop_optimizer_states(checkpoints: list[Path]) -> None:
    """Delete the optimizer states of complete reference checkpoints (2/3 of their size with AdamW).

    Only a resume of the reference run reads them, and the run is complete (its marker says so, so a rerun
    does not train again); re-scoring reads the weights, which stay.
    """
    for checkpoint in checkpoints:
        for path in checkpoint.glob("optimizer*"):  # optimizer.pt; FSDP: optimizer_0/, sharded files
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
