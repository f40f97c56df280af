"""Stage 1's reference run (the ``reference`` scorer): plain next-token prediction, scored at C steps in-process.

The reference model (the target itself by default, or a smaller one: the paper's weak-to-strong result) is
trained on the SFT data for ``reference_epochs`` epochs with `sftmix.SFTMixTrainer` at ``mixup_weight=0``
(exactly TRL's NTP training). At steps ``round(k * T / C)``, k = 1..C (`checkpoint_steps`), the model being
trained is scored where it is (`ScoreAtStepsCallback`): no checkpoint is saved and reloaded unless
``keep_reference_checkpoints`` asks for it. A marker file records the data fingerprint and the settings: a rerun
reuses the scored checkpoints, skips a finished run, and refuses a directory trained on other data or settings.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState
from datasets import Dataset
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_utils import SaveStrategy

from ..data.models import load_model
from ..errors import SFTMixError
from ..io_utils import atomic_write_json, last_complete_checkpoint
from .files import SCORES_DIR, read_scores, write_scores
from .scoring import ScoringSettings, unwrap_for_scoring

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


@dataclass(frozen=True)
class StepScoring:
    """What `ScoreAtStepsCallback` scores, how, and where each step's scores file goes."""

    dataset: Dataset
    """``input_ids`` and unshifted ``labels`` of every training example (`sftmix.stage1.scoring.with_training_labels`)."""
    ids: Sequence[str]
    fingerprint: str
    """The data's `sftmix.data.dataset.dataset_fingerprint`: a scores file of other data is not reused."""
    scores_dir: Path
    settings: ScoringSettings


class ScoreAtStepsCallback(TrainerCallback):
    """Score the model being trained at C evenly spaced optimizer steps, in-process, and write one scores file each.

    Used by the ``reference`` run and by ``warmup`` (the target's first epochs). A step whose scores file exists
    (same data, same step) is not scored again, so a rerun after a crash reuses them.

    Args:
        scoring: What is scored, how, and where the files go (`StepScoring`).
        num_checkpoints: C: the steps are `checkpoint_steps` of the horizon.
        horizon: ``TrainerState -> T``, the last step of the reference run, computed when training begins.
        save: Also save a Trainer checkpoint at each of those steps.
        on_done: Called with the ``[N, C]`` perplexities and the steps once the last one is scored.
    """

    def __init__(
        self,
        scoring: StepScoring,
        num_checkpoints: int,
        horizon: Callable[[Any], int],
        save: bool = False,
        on_done: Callable[[np.ndarray, list[int]], None] | None = None,
    ) -> None:
        self.scoring, self.num_checkpoints, self._horizon = scoring, num_checkpoints, horizon
        self.save, self.on_done = save, on_done
        self.save_steps: list[int] = []
        self.columns: dict[int, np.ndarray] = {}

    def key(self, step: int) -> str:
        return f"step-{step}"

    def file(self, step: int) -> Path:
        return self.scoring.scores_dir / f"ckpt-{step}.json"

    def scored(self, step: int) -> np.ndarray | None:
        return read_scores(self.file(step), self.scoring.fingerprint, self.key(step))

    def on_train_begin(self, args, state, control, **kwargs):
        self.save_steps = checkpoint_steps(self._horizon(state), self.num_checkpoints)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step not in self.save_steps:
            return control
        if self.save:
            control.should_save = True
        values = self.scored(step)
        if values is None:
            s = self.scoring
            values = s.settings.score(unwrap_for_scoring(model), s.dataset, desc=f"Scoring step {step}")
            write_scores(self.file(step), s.fingerprint, self.key(step), s.ids, values)
        self.columns[step] = values
        if step == self.save_steps[-1] and self.on_done is not None:
            self.on_done(self.perplexities(), self.save_steps)
        return control

    def perplexities(self) -> np.ndarray:
        return np.stack(
            [self.columns[s] if s in self.columns else self.scored(s) for s in self.save_steps], axis=1
        )


def train_reference(
    model: PreTrainedModel | str,
    dataset: Dataset,
    scoring_dataset: Dataset,
    tokenizer: Any,
    training_args: Any,
    reference_dir: Path,
    make_trainer: Callable[..., Any],
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
        scoring_dataset: ``input_ids`` and unshifted ``labels`` of the same rows (`sftmix.stage1.scoring.with_training_labels`),
            with an ``id`` column: what is scored.
        tokenizer: The reference model's tokenizer.
        training_args: The run's `SFTMixConfig`: copied with ``output_dir=reference_dir``, ``reference_epochs``,
            ``mixup_weight=0`` and no saves but the C steps (``keep_reference_checkpoints``). ``num_checkpoints``,
            ``scoring_batch_size`` and ``head_chunk_size`` apply; so does ``max_steps``.
        reference_dir: The run's directory (its marker, logs, and the checkpoints when kept); the scores files go to
            ``reference_dir/../scores``.
        make_trainer: Makes the reference run's trainer from ``Trainer`` keyword arguments: `sftmix.SFTMixTrainer`
            (with ``mixup_weight=0``, TRL's NTP training), or `SFTMixTrainer.reference_trainer` inside a run.
        fingerprint: `sftmix.data.dataset.dataset_fingerprint` of ``scoring_dataset``.
        model_name: The reference model's name, for the marker.
        peft_config: Train a PEFT adapter as the reference (the target run's ``peft_config``).

    A rerun after a crash keeps the checkpoints already scored (their scores files); the run itself starts again
    (deterministically) unless a checkpoint exists to resume from: one ``keep_reference_checkpoints`` saved, or
    the one a SIGTERM/SIGINT saved (`sftmix.preemption`). A finished run is not trained again.
    """
    marker = reference_dir / "sftmix_reference.json"
    num_checkpoints, epochs = training_args.num_checkpoints, training_args.reference_epochs
    settings = _reference_settings(
        model_name, peft_config is not None, training_args, epochs, num_checkpoints
    )
    scoring = StepScoring(
        scoring_dataset,
        list(scoring_dataset["id"]),
        fingerprint,
        reference_dir.parent / SCORES_DIR,
        ScoringSettings.of(training_args),
    )
    callback = ScoreAtStepsCallback(
        scoring, num_checkpoints, lambda state: state.max_steps, save=training_args.keep_reference_checkpoints
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
    trainer = make_trainer(
        model=model,
        args=_reference_args(training_args, reference_dir, epochs),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
    )
    # A kept checkpoint, or the one a SIGTERM/SIGINT saved (`sftmix.preemption`), is a resume point
    last = last_complete_checkpoint(reference_dir)
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
        # A preempted run's resume point is used now: only the C scored checkpoints stay, when asked to
        kept = {f"checkpoint-{step}" for step in steps} if training_args.keep_reference_checkpoints else set()
        for checkpoint in reference_dir.glob("checkpoint-*"):
            if checkpoint.name not in kept:
                shutil.rmtree(checkpoint)
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
