"""Stage 1's five ways to make the split, and the files every one of them writes.

`SFTMixConfig.confidence_scorer` picks one when no ``dynamics_path`` is given:

- ``reference`` (the paper): a separate plain-NTP reference run; `ScoreAtStepsCallback` scores each of its C
  checkpoints in-process when the run reaches it (`sftmix.stage1.reference.train_reference`).
- ``warmup``: the target's own first ``reference_epochs`` of plain NTP are the reference run (the same callback,
  on the target's trainer); Mixup is on from then on.
- ``online``: no extra pass: `sftmix.stage1.online.DynamicsCallback` records each example's response NLL from the training
  forwards of epoch 1, corrected for training progress; Mixup from epoch 2.
- ``base``: the response perplexity of the starting model, one no-grad pass (`sftmix.stage1.scoring.score_checkpoint`).
- ``random``: a seeded random half (`random_confidence`), the ablation.

All write the same ``dynamics/`` directory (`write_stage1`): ``dynamics.jsonl`` (`sftmix.stage1.splits`' format and median
split), ``dynamics_summary.json`` naming the scorer and the data's fingerprint, and ``datamap.png``.
`existing_stage1` finds a finished one again, so a rerun reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import TrainerCallback

from ..errors import SFTMixError
from ..io_utils import atomic_write_json
from .datamap import draw_datamap
from .scoring import score_checkpoint
from .splits import build_dynamics_rows, summarize_dynamics, write_dynamics

logger = logging.getLogger(__name__)

SCORERS = ("reference", "warmup", "online", "base", "random")
SCORES_DIR, DYNAMICS_FILE, SUMMARY_FILE, DATAMAP_FILE = (
    "scores",
    "dynamics.jsonl",
    "dynamics_summary.json",
    "datamap.png",
)


# ---- the files --------------------------------------------------------------------------------------------
def write_stage1(
    out_dir: Path,
    ids: Sequence[str],
    perplexities: np.ndarray,
    num_tokens: Sequence[int],
    *,
    scorer: str,
    checkpoints: Sequence[str],
    fingerprint: str | None,
    model_name: str | None,
    indices: Sequence[int] | None = None,
    confidence: np.ndarray | None = None,
    extra: dict[str, Sequence[Any]] | None = None,
) -> Path:
    """Write ``dynamics.jsonl``, ``dynamics_summary.json`` and ``datamap.png`` to ``out_dir`` (main process only)
    and return the dynamics file. ``confidence`` replaces ``-mean(perplexities)`` where a scorer has its own;
    ``extra`` adds per-example fields (``online``: the steps each example was measured at)."""
    path = out_dir / DYNAMICS_FILE
    if PartialState().is_main_process:
        rows = build_dynamics_rows(
            list(ids),
            list(indices if indices is not None else range(len(ids))),
            perplexities,
            num_tokens,
            confidence,
        )
        for name, values in (extra or {}).items():
            for row, value in zip(rows, values, strict=True):
                row[name] = value
        summary = summarize_dynamics(rows, checkpoints)
        summary.update(scorer=scorer, fingerprint=fingerprint, reference_model=model_name)
        write_dynamics(path, rows)
        atomic_write_json(out_dir / SUMMARY_FILE, summary)
        logger.info(
            "Stage 1 (%s): %s", scorer, json.dumps({k: summary[k] for k in ("num_examples", "num_confident")})
        )
        label = f" of {Path(model_name).name}" if model_name else ""
        draw_datamap(path, out_dir / DATAMAP_FILE, title=f"SFTMix data map{label} ({scorer} scorer)")
    PartialState().wait_for_everyone()
    return path


def existing_stage1(out_dir: Path, scorer: str, fingerprint: str) -> Path | None:
    """The ``dynamics.jsonl`` of a finished stage 1 in ``out_dir`` made by ``scorer`` from the same data, or None."""
    summary = out_dir / SUMMARY_FILE
    if not (summary.is_file() and (out_dir / DYNAMICS_FILE).is_file()):
        return None
    saved = json.loads(summary.read_text(encoding="utf-8"))
    if saved.get("scorer") == scorer and saved.get("fingerprint") == fingerprint:
        return out_dir / DYNAMICS_FILE
    raise SFTMixError(
        f"{out_dir} holds a stage 1 of another scorer or other data ({saved.get('scorer')}): use a new output_dir, "
        "delete that directory, or pass its dynamics.jsonl as dynamics_path"
    )


def read_scores(scores_file: Path, fingerprint: str, key: str) -> np.ndarray | None:
    """A checkpoint's perplexities from its scores file, if it was made from the same data and checkpoint."""
    if not scores_file.is_file():
        return None
    saved = json.loads(scores_file.read_text(encoding="utf-8"))
    if saved.get("fingerprint") == fingerprint and saved.get("checkpoint") == key:
        return np.asarray(saved["perplexities"], dtype=np.float64)
    logger.warning("%s was made from other data or another checkpoint: scoring again", scores_file)
    return None


def write_scores(
    scores_file: Path, fingerprint: str, key: str, ids: Sequence[str], values: np.ndarray
) -> None:
    if PartialState().is_main_process:
        record = {
            "checkpoint": key,
            "fingerprint": fingerprint,
            "ids": list(ids),
            "perplexities": values.tolist(),
        }
        atomic_write_json(scores_file, record)
    PartialState().wait_for_everyone()


# ---- the scorers ------------------------------------------------------------------------------------------
def random_confidence(ids: Sequence[str], seed: int) -> np.ndarray:
    """A seeded random confidence per example, drawn from the ids so it does not depend on the dataset's order.

    >>> a = random_confidence(["x", "y", "z"], seed=1)
    >>> bool((random_confidence(["z", "x"], seed=1) == a[[2, 0]]).all())
    True
    """
    digests = [hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8] for i in ids]
    return np.array([int.from_bytes(d, "little") / 2**64 for d in digests], dtype=np.float64)


def unwrap_for_scoring(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM to score: the PEFT model's base (its adapters stay active), else the model itself."""
    return model.get_base_model() if is_peft_model(model) else model


def with_training_labels(dataset: Dataset, collator: Callable[[list[dict]], dict]) -> Dataset:
    """``input_ids`` and unshifted ``labels`` of each example exactly as the trainer's collator makes them, so that
    scoring counts the tokens training counts (TRL's ``completion_mask`` / ``assistant_masks``, or sftmix's labels)."""
    columns = [c for c in dataset.column_names if c != "id"]
    input_ids, labels = [], []
    for row in dataset.select_columns(columns):
        batch = collator([row])
        input_ids.append(
            batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
            if "attention_mask" in batch
            else batch["input_ids"][0].tolist()
        )
        labels.append(batch["labels"][0][: len(input_ids[-1])].tolist())
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


class ScoreAtStepsCallback(TrainerCallback):
    """Score the model being trained at C evenly spaced optimizer steps, in-process, and write one scores file each.

    Used by the ``reference`` run and by ``warmup`` (the target's first epochs). A step whose scores file exists
    (same data, same step) is not scored again, so a rerun after a crash reuses them.

    Args:
        steps: ``horizon -> steps`` (`sftmix.stage1.reference.checkpoint_steps` of the run's horizon), and
        horizon: ``TrainerState -> T``, the last step of the reference run, computed when training begins.
        dataset: ``input_ids`` and unshifted ``labels`` of every training example (`with_training_labels`).
        scores_dir: Where ``ckpt-<step>.json`` go.
        fingerprint: The data's `sftmix.data.dataset.dataset_fingerprint`.
        batch_size, chunk_size, bf16: Of `sftmix.stage1.scoring.score_checkpoint`.
        save: Also save a Trainer checkpoint at each of those steps.
        on_done: Called with the ``[N, C]`` perplexities and the steps once the last one is scored.
    """

    def __init__(
        self,
        steps: Callable[[int], list[int]],
        horizon: Callable[[Any], int],
        dataset: Dataset,
        ids: Sequence[str],
        scores_dir: Path,
        fingerprint: str,
        batch_size: int,
        chunk_size: int,
        bf16: bool,
        save: bool = False,
        on_done: Callable[[np.ndarray, list[int]], None] | None = None,
    ) -> None:
        self._steps, self._horizon = steps, horizon
        self.dataset, self.ids, self.scores_dir, self.fingerprint = (
            dataset,
            list(ids),
            scores_dir,
            fingerprint,
        )
        self.batch_size, self.chunk_size, self.bf16, self.save, self.on_done = (
            batch_size,
            chunk_size,
            bf16,
            save,
            on_done,
        )
        self.save_steps: list[int] = []
        self.columns: dict[int, np.ndarray] = {}

    def key(self, step: int) -> str:
        return f"step-{step}"

    def file(self, step: int) -> Path:
        return self.scores_dir / f"ckpt-{step}.json"

    def scored(self, step: int) -> np.ndarray | None:
        return read_scores(self.file(step), self.fingerprint, self.key(step))

    def on_train_begin(self, args, state, control, **kwargs):
        self.save_steps = self._steps(self._horizon(state))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step not in self.save_steps:
            return control
        if self.save:
            control.should_save = True
        values = self.scored(step)
        if values is None:
            values = score_checkpoint(
                unwrap_for_scoring(model), self.dataset, self.batch_size, chunk_size=self.chunk_size,
                bf16=self.bf16, desc=f"Scoring step {step}",
            )  # fmt: skip
            write_scores(self.file(step), self.fingerprint, self.key(step), self.ids, values)
        self.columns[step] = values
        if step == self.save_steps[-1] and self.on_done is not None:
            self.on_done(self.perplexities(), self.save_steps)
        return control

    def perplexities(self) -> np.ndarray:
        return np.stack(
            [self.columns[s] if s in self.columns else self.scored(s) for s in self.save_steps], axis=1
        )
