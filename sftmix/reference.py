"""Stage 1's reference run: plain next-token prediction that saves C checkpoints evenly spaced through it.

The reference model (the target itself by default, or a smaller one: the paper's weak-to-strong result) is
trained on the SFT data for ``reference_epochs`` epochs with `SFTMixTrainer` at ``mixup_weight=0`` (exactly
TRL's NTP training). `CheckpointScheduleCallback` saves at steps ``round(k * T / C)``, k = 1..C, and nowhere
else. A marker file records the data fingerprint and the settings: a rerun resumes from the last complete
checkpoint, skips a finished run, and refuses a directory trained on other data or settings.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_utils import SaveStrategy
from trl import get_peft_config

from .data import dataset_fingerprint
from .errors import SFTMixError
from .io_utils import atomic_write_json, last_complete_checkpoint
from .models import load_model
from .sftmix_trainer import SFTMixTrainer

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


class CheckpointScheduleCallback(TrainerCallback):
    """Save exactly at `checkpoint_steps` ``(T, C)``, where ``T`` is the run's total number of optimizer steps.

    Use it with ``save_strategy="no"``; the steps are computed when training (or a resumed run) begins.
    """

    def __init__(self, num_checkpoints: int) -> None:
        self.num_checkpoints = num_checkpoints
        self.save_steps: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.save_steps = checkpoint_steps(state.max_steps, self.num_checkpoints)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.save_steps:
            control.should_save = True
        return control


def stage1_args(training_args: Any) -> Any:
    """Stage 1's config inside ``sftmix run``: the run's config in ``output_dir/dynamics``, without stage 3's step
    budget (``max_steps``). `_reference_args` derives the reference run from it, as for ``sftmix dynamics``."""
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
    # Plain NTP: if the config is an SFTMixConfig, switch the regulariser off (no dynamics exist yet).
    changes.update({k: v for k, v in (("mixup_weight", 0.0), ("dynamics_path", None)) if k in field_names})
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


def _reference_settings(model_args: Any, training_args: Any, epochs: float, num_checkpoints: int) -> dict:
    settings = {name: getattr(training_args, name, None) for name in REFERENCE_SETTINGS}
    settings.update(
        model=model_args.model_name_or_path,
        use_peft=bool(getattr(model_args, "use_peft", False)),
        epochs=epochs,
        num_checkpoints=num_checkpoints,
    )
    return json.loads(json.dumps(settings, default=str))  # JSON-comparable (enums as strings)


def train_reference(
    model_args: Any,
    dataset: Dataset,
    tokenizer: Any,
    num_checkpoints: int,
    training_args: Any,
    reference_dir: Path,
    epochs: float = 1.0,
    trainer_cls: type | None = None,
    fingerprint: str | None = None,
) -> list[Path]:
    """Train the reference model with plain NTP and return its C checkpoint directories, in step order.

    Args:
        model_args: `trl.ModelConfig`; ``model_name_or_path`` is the reference model, ``dtype`` /
            ``attn_implementation`` / ``use_peft`` (LoRA) apply.
        dataset: Tokenized rows (``input_ids``, ``labels``), trained on as is.
        tokenizer: The reference model's tokenizer (saved with each checkpoint).
        num_checkpoints: C.
        training_args: The run's `SFTMixConfig`; copied with ``output_dir=reference_dir``, ``epochs`` and
            ``save_strategy="no"`` (the callback forces the C saves). ``max_steps`` applies if set.
        reference_dir: Where the checkpoints go. A rerun resumes from its latest checkpoint.
        epochs: ``num_train_epochs`` of the reference run.
        trainer_cls: Trainer class taking ``trl.SFTTrainer``'s arguments (default `SFTMixTrainer` with
            ``mixup_weight=0``: TRL's NTP training with sftmix's faster fused head).
        fingerprint: `sftmix.data.dataset_fingerprint` of ``dataset`` if the caller has it (it hashes every
            token); computed here otherwise.
    """
    # A marker file records which data the run is on and, once finished, its checkpoint steps: a rerun of a
    # finished run skips training, and a run dir trained on other data is never silently mixed with this one.
    marker = reference_dir / "sftmix_reference.json"
    if fingerprint is None:
        fingerprint = dataset_fingerprint(dataset)
    settings = _reference_settings(model_args, training_args, epochs, num_checkpoints)
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
        checkpoints = [reference_dir / f"checkpoint-{step}" for step in done.get("checkpoint_steps", [])]
        if (
            done.get("complete")
            and len(checkpoints) == num_checkpoints
            and all(c.is_dir() for c in checkpoints)
        ):
            logger.info("The reference run in %s is complete: not training again", reference_dir)
            return checkpoints
    state = PartialState()
    if state.is_main_process:
        atomic_write_json(marker, {"complete": False, "fingerprint": fingerprint, "settings": settings})

    args = _reference_args(training_args, reference_dir, epochs)
    model = load_model(
        model_args.model_name_or_path,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
    )
    schedule = CheckpointScheduleCallback(num_checkpoints)
    trainer = (trainer_cls or SFTMixTrainer)(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[schedule],
    )
    last = last_complete_checkpoint(reference_dir)
    if last is not None:
        logger.info("Resuming the reference run from %s", last)
    trainer.train(resume_from_checkpoint=last)
    steps = schedule.save_steps
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
    state.wait_for_everyone()
    return [reference_dir / f"checkpoint-{step}" for step in steps]
