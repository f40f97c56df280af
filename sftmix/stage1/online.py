"""The ``online`` scorer's measurements: each example's response NLL taken from the training forwards themselves.

`DynamicsCallback` records them during any ``transformers.Trainer`` / ``trl.SFTTrainer`` run (or is fed by
`sftmix.SFTMixTrainer`, whose fused head returns per-example sums) and writes ``dynamics.jsonl`` and the data map
with `sftmix.stage1.files.write_stage1`. `progress_corrected_confidence` compares each example with those seen at
neighbouring steps, because the model measuring them improves as it trains.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import TrainerCallback

from ..data.dataset import IGNORE_INDEX, content_id
from ..errors import SFTMixError
from ..io_utils import atomic_write_json
from ..preemption import stopped_early
from .files import write_stage1

RECORDS_FILE = "sftmix_nll_records.json"
"""`DynamicsCallback`'s records, saved in each Trainer checkpoint so a resumed run keeps them."""


class Measurement(NamedTuple):
    """One example's measurement in one epoch: saved in checkpoints as ``[step, nll_sum, tokens]``."""

    step: int
    """The optimizer step whose forward measured it (the model of that step)."""
    nll_sum: float
    """The summed NLL of its response tokens."""
    tokens: int

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll_sum / max(self.tokens, 1)))


def progress_corrected_confidence(
    steps: np.ndarray, log_perplexity: np.ndarray, method: str = "rank", window: int = 4
) -> np.ndarray:
    """Confidence from NLL measured while the model trains: each example against those of neighbouring steps.

    An example seen at step s was measured by the model of step s, which gets better as training goes on, so raw
    values favour late examples. ``rank``: minus the share of examples within ``window`` steps (either side) with
    a lower log-perplexity (ties count half); ``detrend``: minus the perplexity after subtracting the window's
    median log-perplexity and adding back the overall median; ``none``: minus the perplexity.

    >>> steps, logppl = np.array([0, 0, 1, 1]), np.log([2.0, 4.0, 1.0, 3.0])
    >>> progress_corrected_confidence(steps, logppl, "rank", window=1).round(3).tolist()
    [-0.333, -1.0, -0.0, -0.667]
    >>> progress_corrected_confidence(steps, logppl, "rank", window=0).tolist()  # each step on its own
    [-0.0, -1.0, -0.0, -1.0]
    >>> progress_corrected_confidence(steps, logppl, "none").round(6).tolist()
    [-2.0, -4.0, -1.0, -3.0]
    """
    steps, log_perplexity = np.asarray(steps), np.asarray(log_perplexity, dtype=np.float64)
    if method == "none":
        return -np.exp(log_perplexity)
    if method not in ("rank", "detrend"):
        raise SFTMixError(f"online_correction must be rank, detrend or none, got {method!r}")
    out = np.empty_like(log_perplexity)
    overall = np.median(log_perplexity)
    for step in np.unique(steps):
        here = steps == step
        near = log_perplexity[np.abs(steps - step) <= window]
        mine = log_perplexity[here]
        if method == "rank":
            below = (
                (near[None, :] < mine[:, None]).sum(1) + 0.5 * (near[None, :] == mine[:, None]).sum(1) - 0.5
            )
            out[here] = -below / max(len(near) - 1, 1)
        else:
            out[here] = -np.exp(mine - np.median(near) + overall)
    return out


def _token_key(ids: Sequence[int]) -> str:
    return content_id({"input_ids": ids})  # the id sftmix.data.dataset gives a tokenized row


def _per_row_nll(output: Any, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row summed response NLL and token count from whatever a training forward returned."""
    if getattr(output, "example_nll_sum", None) is not None:  # sftmix's fused head
        return output.example_nll_sum, output.example_tokens
    if (
        getattr(output, "log_probs", None) is not None and getattr(output, "label_mask", None) is not None
    ):  # TRL's
        mask = output.label_mask
        return -(output.log_probs.detach().float() * mask).sum(1), mask.sum(1)
    logits, labels = getattr(output, "logits", None), kwargs.get("labels")
    if logits is None or labels is None:
        return None
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].detach().float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.sum(1), (targets != IGNORE_INDEX).sum(1)


class DynamicsCallback(TrainerCallback):
    """Record every training example's response NLL during any ``transformers.Trainer`` / ``trl.SFTTrainer`` run
    and write ``dynamics.jsonl`` (one perplexity per epoch, `sftmix.stage1.splits`' format and median split) and the data
    map ``datamap.png`` to ``output_dir`` at the end of training.

    The NLL comes from the training forwards themselves (a forward hook reads TRL's per-token log-probabilities,
    sftmix's per-example sums, or the logits and labels), so it costs no extra pass. An example's perplexity in an
    epoch is measured by the model of the step it was seen at; ``correction`` (`progress_corrected_confidence`)
    compares it with the examples of neighbouring steps. Examples are named by their ``id`` column when the
    training data loader has one, else by a hash of their tokens. Packing and padding-free batches are not
    supported (rows must be whole examples).

    Example (a plain ``trl.SFTTrainer``):
        >>> from sftmix import DynamicsCallback  # doctest: +SKIP
        >>> trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="out"), train_dataset=dataset)  # doctest: +SKIP
        >>> trainer.add_callback(DynamicsCallback("out/dynamics"))  # doctest: +SKIP
        >>> trainer.train()  # writes out/dynamics/dynamics.jsonl and datamap.png  # doctest: +SKIP

    Args:
        output_dir: Where the files go (default: ``<args.output_dir>/dynamics``).
        correction: ``none`` (default), ``rank`` or ``detrend``.
        window: Neighbouring optimizer steps on each side for ``correction``.
        epochs: Record only the first ``epochs`` epochs and write the files at the end of the last of them.
        on_written: Called with the dynamics file's path once it is written.
        hook: Register the forward hook (False when the trainer feeds `record` itself, as `SFTMixTrainer` does).
        model_name, fingerprint, scorer: What the summary records (``scorer``: ``callback``; ``online`` inside
            `sftmix.SFTMixTrainer`).
        order: The training examples' ids in dataset order (the file's order; default: the data loader's ``id``
            column, else first sighting).
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        correction: str = "none",
        window: int = 4,
        epochs: int | None = None,
        on_written: Callable[[Path], None] | None = None,
        hook: bool = True,
        model_name: str | None = None,
        fingerprint: str | None = None,
        scorer: str = "callback",
        order: Sequence[str] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.correction, self.window, self.epochs, self.on_written = correction, window, epochs, on_written
        self.hook, self.model_name, self.fingerprint, self.scorer = hook, model_name, fingerprint, scorer
        self.order = [str(i) for i in order] if order is not None else None  # dataset order of the ids
        self.records: dict[int, dict[str, Measurement]] = {}  # epoch -> id -> its first measurement
        self.state: Any = None
        self.written: Path | None = None
        self._key_to_id: dict[str, str] = {}
        self._handle = None

    # -- recording --
    def record(self, ids: Sequence[str], nll_sums: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record one micro-batch of this process (the first sighting of an example in an epoch counts)."""
        if self.written is not None or self.state is None:
            return
        epoch = int(self.state.epoch or 0)
        if self.epochs is not None and epoch >= self.epochs:
            return
        seen = self.records.setdefault(epoch, {})
        for i, s, n in zip(ids, nll_sums.tolist(), tokens.tolist(), strict=True):
            seen.setdefault(str(i), Measurement(int(self.state.global_step), float(s), int(n)))

    def _forward_hook(self, module, args, kwargs, output) -> None:
        if not module.training:
            return
        found = _per_row_nll(output, kwargs)
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if found is None or input_ids is None:
            return
        rows = [
            r[m.bool()] if mask is not None else r
            for r, m in zip(input_ids, mask if mask is not None else input_ids, strict=True)
        ]
        keys = [_token_key(r.tolist()) for r in rows]
        self.record([self._key_to_id.get(k, k) for k in keys], found[0].detach().double(), found[1])

    # -- Trainer events --
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.state = state
        if self.output_dir is None:
            self.output_dir = Path(args.output_dir) / "dynamics"
        if self.hook:
            if getattr(args, "packing", False) or getattr(args, "padding_free", False):
                raise SFTMixError(
                    "DynamicsCallback needs whole examples per row: set packing=False and padding_free=False"
                )
            dataset = getattr(train_dataloader, "dataset", None)
            if dataset is not None and "id" in getattr(dataset, "column_names", []):
                self._key_to_id = {
                    _token_key(r): str(i) for r, i in zip(dataset["input_ids"], dataset["id"], strict=True)
                }
                self.order = self.order or [str(i) for i in dataset["id"]]
            self._handle = model.register_forward_hook(self._forward_hook, with_kwargs=True)
        if state.global_step > 0:  # resumed: the records up to the checkpoint
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / RECORDS_FILE
            if saved.is_file():
                loaded = json.loads(saved.read_text(encoding="utf-8"))
                self.records = {int(e): {i: Measurement(*v) for i, v in r.items()} for e, r in loaded.items()}

    def save_records(self, checkpoint_dir: Path) -> None:
        """Write the records so far into a checkpoint (every process calls it; the main one writes)."""
        if self.written is None and self.state is not None:
            merged = _merge(gather_object([self.records]))
            if PartialState().is_main_process:
                atomic_write_json(checkpoint_dir / RECORDS_FILE, merged)

    def on_save(self, args, state, control, **kwargs):
        if self.hook:  # SFTMixTrainer writes them before the checkpoint is complete (its _save_checkpoint)
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                self.save_records(checkpoint)

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch_complete = float(state.epoch or 0).is_integer()  # a stop (preemption) can end an epoch early
        if stopped_early(state, control) and not epoch_complete:  # its records are in the stop's checkpoint
            return
        if self.epochs is not None and self.written is None and round(state.epoch or 0) >= self.epochs:
            self.write()

    def on_train_end(self, args, state, control, **kwargs):
        if self.written is None and not stopped_early(state, control):
            self.write()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- the files --
    def write(self) -> Path:
        """Gather every process's records and write the files; every process returns the path."""
        records = _merge(gather_object([self.records]))
        epochs = sorted(records)
        if not epochs:
            raise SFTMixError("DynamicsCallback recorded no training forward: nothing to write")
        first = records[epochs[0]]
        order = self.order or sorted(first, key=lambda i: (first[i].step, i))
        ids = [i for i in order if all(i in records[e] for e in epochs)]  # seen in every recorded epoch
        if self.order is not None and len(ids) < len(order):
            raise SFTMixError(
                f"{len(order) - len(ids)} training examples were not seen in every recorded epoch (first: "
                f"{next(i for i in order if i not in ids)!r})"
            )
        ppl = np.array([[records[e][i].perplexity for e in epochs] for i in ids])
        tokens = [records[epochs[0]][i].tokens for i in ids]
        confidence = None
        if self.correction != "none":
            per_epoch = [
                progress_corrected_confidence(
                    np.array([records[e][i].step for i in ids]),
                    np.log(ppl[:, k]),
                    self.correction,
                    self.window,
                )
                for k, e in enumerate(epochs)
            ]
            confidence = np.mean(per_epoch, axis=0)
        self.written = write_stage1(
            self.output_dir,
            ids,
            ppl,
            tokens,
            scorer=self.scorer,
            checkpoints=[f"epoch-{e + 1}" for e in epochs],
            fingerprint=self.fingerprint,
            model_name=self.model_name,
            confidence=confidence,
            extra={"steps": [[records[e][i].step for e in epochs] for i in ids]},
        )
        if self.on_written is not None:
            self.on_written(self.written)
        return self.written


def _merge(parts: list[dict[int, dict[str, Measurement]]]) -> dict[int, dict[str, Measurement]]:
    """Every process's records in one: an example seen by several processes keeps its earliest measurement."""
    merged: dict[int, dict[str, Measurement]] = {}
    for part in parts:
        for epoch, rows in part.items():
            target = merged.setdefault(int(epoch), {})
            for i, value in rows.items():
                value = Measurement(*value)
                if i not in target or value.step < target[i].step:
                    target[i] = value
    return merged
