"""Stages 1 and 2 of SFTMix: training-dynamics confidence and the confident / unconfident split.

The path through this module, top to bottom:

1. `confidence_scores` and `median_split` are the method's arithmetic: ``Confidence(i) = -(1/C) sum_c
   Perp_c(i)`` over C reference checkpoints, then the top half by confidence is confident.
2. `score_checkpoint` measures ``Perp_c(i)``: the perplexity of each example's response tokens given its
   instruction, in no-grad batches grouped by length. Only the positions that carry loss go through the LM
   head, a chunk at a time, so no ``[batch, seq, vocab]`` tensor is ever built (`response_nll_sums`, which the
   held-out perplexity of `sftmix.evaluation.perplexity` uses too).
3. `run_dynamics` trains the reference model (`sftmix.reference.train_reference`, plain next-token prediction,
   C checkpoints evenly spaced through the run), then drives it all, resumably: it writes one scores file per checkpoint as soon as it is
   scored, then ``dynamics.jsonl``, ``dynamics_summary.json`` and the data map ``datamap.png``.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from trl.trainer.utils import maybe_gather_lm_head_ctx, pad

from .distributed import check_process_group
from .errors import SFTMixError
from .head import fused_linear_cross_entropy, lm_head_parameters, lm_head_transform
from .io_utils import atomic_write_json, atomic_write_jsonl

logger = logging.getLogger(__name__)

CONFIDENT, UNCONFIDENT = "confident", "unconfident"
SIGNIFICANT_DIGITS = 8
"""Floats in ``dynamics.jsonl`` are rounded to this many significant digits (fixed, byte-stable output)."""


# ---------------------------------------------------------------------------------------------------------
# 1. The arithmetic of stages 1 and 2


def confidence_scores(perplexities: Any) -> np.ndarray:
    """Confidence of each example: minus its perplexity averaged over the C checkpoints.

    Args:
        perplexities: ``[N, C]`` array-like, ``Perp_c(i)`` for example ``i`` at checkpoint ``c``.

    Returns:
        ``[N]`` float64 array, ``-(1/C) * sum_c Perp_c(i)``; higher means more confident.

    >>> confidence_scores([[2.0, 4.0], [1.5, 1.5], [10.0, 6.0]]).tolist()
    [-3.0, -1.5, -8.0]
    """
    perplexities = np.asarray(perplexities, dtype=np.float64)
    if perplexities.ndim != 2 or perplexities.shape[1] == 0:
        raise ValueError(f"perplexities must be [N, C] with C >= 1, got shape {perplexities.shape}")
    if not np.isfinite(perplexities).all():
        raise ValueError("perplexities must be finite")
    return -perplexities.mean(axis=1)


def median_split(confidences: Any) -> np.ndarray:
    """Split at the median: True for the confident half (``D^c``), False for the rest (``D^u``).

    Examples are sorted by confidence, highest first; the first ``N // 2`` are confident. Ties are broken by
    dataset order: of two examples with equal confidence the earlier one ranks higher (and is the one that
    lands in the confident half when the tie straddles the median). With odd ``N`` the extra example goes to
    the unconfident set, so exactly ``N // 2`` examples are confident.

    Args:
        confidences: ``[N]`` array-like of confidences (e.g. from `confidence_scores`).

    Returns:
        ``[N]`` boolean numpy array in dataset order.

    >>> median_split([-3.0, -1.5, -8.0, -2.0]).tolist()
    [False, True, False, True]
    >>> median_split([-1.0, -1.0, -1.0]).tolist()  # odd N, all tied: the earliest example wins
    [True, False, False]
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    if confidences.ndim != 1:
        raise ValueError(f"confidences must be 1-D, got shape {confidences.shape}")
    if np.isnan(confidences).any():
        raise ValueError("confidences must not be NaN")
    n = len(confidences)
    # lexsort sorts by the last key first: descending confidence, then ascending dataset index.
    ranking = np.lexsort((np.arange(n), -confidences))
    confident = np.zeros(n, dtype=bool)
    confident[ranking[: n // 2]] = True
    return confident


def variability_scores(perplexities: Any) -> np.ndarray:
    """Variability of each example across checkpoints: the standard deviation of ``Perp_c(i)`` over c.

    This is Dataset Cartography's variability (the population std, ``ddof=0``, of the per-epoch measure whose
    mean is the confidence), applied to the measure SFTMix averages: perplexity. It is the x axis of the data
    map; the split does not use it.

    >>> variability_scores([[2.0, 4.0], [1.5, 1.5]]).tolist()
    [1.0, 0.0]
    """
    perplexities = np.asarray(perplexities, dtype=np.float64)
    if perplexities.ndim != 2 or perplexities.shape[1] == 0:
        raise ValueError(f"perplexities must be [N, C] with C >= 1, got shape {perplexities.shape}")
    return perplexities.std(axis=1)


# ---------------------------------------------------------------------------------------------------------
# 2. Scoring a checkpoint


def length_grouped_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of ``batch_size``, longest first (ties by index), so padding stays minimal.

    >>> length_grouped_batches([3, 9, 5, 9, 1], 2)
    [[1, 3], [2, 0], [4]]
    """
    if batch_size < 1:
        raise SFTMixError(f"scoring_batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def response_token_counts(dataset: Dataset) -> np.ndarray:
    """Per example, the number of tokens whose NLL is scored: ``labels[t] != -100`` for ``t >= 1``.

    Position 0 is never predicted (nothing precedes it), as in the shifted SFT loss.
    """
    return np.array(
        [sum(label != -100 for label in labels[1:]) for labels in dataset["labels"]], dtype=np.int64
    )


class LMHead(NamedTuple):
    """What the fused head needs of a model's output layer, looked up once per model rather than per batch."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None

    @classmethod
    def of(cls, model: PreTrainedModel) -> LMHead:
        return cls(*lm_head_parameters(model), *lm_head_transform(model))


@torch.no_grad()
def response_nll_sums(
    model: PreTrainedModel,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    head: LMHead,
    chunk_size: int,
    device: torch.device,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of each row's response tokens and their number, for one batch; never builds ``[B, T, V]``.

    Args:
        model: The causal LM (its ``base_model`` gives the last hidden states).
        input_ids: ``B`` rows of token ids, right-padded here to the batch's own longest row.
        labels: The rows' unshifted labels (``-100`` where no loss): ``labels[t]`` is predicted at ``t - 1``.
        head: `LMHead.of` the model.
        chunk_size: Loss positions per LM-head chunk.
        device: Where the model's inputs go.
        pad_token_id: Id of the padding (masked and unlabelled, so its value does not change the result).

    Returns:
        ``[B]`` float64 NLL sums and ``[B]`` int64 token counts, on ``device``.
    """
    input_ids_t = pad([torch.tensor(row, dtype=torch.long) for row in input_ids], pad_token_id).to(device)
    attention_mask = pad([torch.ones(len(row), dtype=torch.long) for row in input_ids]).to(device)
    labels_t = pad([torch.tensor(row, dtype=torch.long) for row in labels], -100).to(device)

    # The backbone's last hidden state is the LM head's input; the head runs on loss positions only.
    hidden = model.base_model(
        input_ids=input_ids_t, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    targets = labels_t[:, 1:]
    mask = targets != -100
    hidden, targets = hidden[:, :-1][mask], targets[mask]  # [n_tokens, H], [n_tokens]
    example = mask.nonzero()[:, 0]
    # The fused head of training, without gradients: per-token NLL with the model's logit scaling / soft-capping
    weight = head.weight
    with maybe_gather_lm_head_ctx(weight, head.bias):
        nll = fused_linear_cross_entropy(
            hidden.to(weight.device),
            weight,
            targets.to(weight.device),
            torch.ones(len(targets), device=weight.device),
            head.bias,
            chunk_size=chunk_size,
            logit_scale=head.logit_scale,
            softcap=head.softcap,
        ).ce.to(device)
    rows = len(input_ids)
    sums = torch.zeros(rows, dtype=torch.float64, device=device).index_add_(0, example, nll.double())
    return sums, torch.bincount(example, minlength=rows)


def score_checkpoint(
    model: PreTrainedModel,
    dataset: Dataset,
    batch_size: int = 16,
    *,
    chunk_size: int = 1024,
    bf16: bool = False,
    show_progress: bool = True,
    desc: str = "Scoring",
) -> np.ndarray:
    """Perplexity of every example's response given its instruction: ``exp(mean NLL)`` over its loss tokens.

    Args:
        model: A causal LM (``get_output_embeddings`` and ``base_model`` with a ``last_hidden_state``).
            Put it on the device to score on first; it is used in eval mode and left as it was.
        dataset: Rows with ``input_ids`` and unshifted ``labels`` (``-100`` where no loss), as made by
            `sftmix.data.tokenize_sft_dataset`.
        batch_size: Examples per no-grad forward. Batches are grouped by length (longest first) and padded
            only to their own longest row.
        chunk_size: Loss positions per LM-head chunk: bounds the float32 ``[chunk, vocab]`` logits buffer.
        bf16: Run under bfloat16 autocast (as when the training config sets ``bf16``).
        show_progress: Show a tqdm bar (main process only).
        desc: The progress bar's label.

    Returns:
        ``[N]`` float64 array of perplexities in dataset order. NaN for an example with no scored token.

    Under ``accelerate launch`` each process scores every ``num_processes``-th batch and the results are
    gathered, so every process returns the same array, bit-identical to a single-process run (each example
    is computed in the same batch either way).
    """
    state = PartialState()
    batches = length_grouped_batches([len(ids) for ids in dataset["input_ids"]], batch_size)
    mine = batches[state.process_index :: state.num_processes]
    columns = dataset.select_columns(["input_ids", "labels"])  # read a batch at once, only what is scored
    device = next(model.parameters()).device
    head = LMHead.of(model)
    was_training = model.training
    model.eval()
    results: list[tuple[int, float]] = []
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for batch in tqdm(mine, desc=desc, disable=not show_progress or not state.is_local_main_process):
                rows = columns[batch]
                sums, counts = response_nll_sums(
                    model, rows["input_ids"], rows["labels"], head, chunk_size, device
                )
                # an example with no scored token gives NaN (0/0)
                perplexities = torch.exp(sums / counts.double()).cpu()
                results.extend(zip(batch, perplexities.tolist(), strict=True))
    finally:
        model.train(was_training)
    if state.num_processes > 1:
        results = gather_object(results)
    perplexities = np.full(len(dataset), np.nan)
    for index, value in results:
        perplexities[index] = value
    return perplexities


# ---------------------------------------------------------------------------------------------------------
# 3. The stage-1 driver


def dataset_fingerprint(dataset: Dataset) -> str:
    """SHA-256 (16 hex digits) of the ids, token ids and labels, in order: what a scores file was made from."""
    digest = hashlib.sha256()
    for row_id, ids, labels in zip(dataset["id"], dataset["input_ids"], dataset["labels"], strict=True):
        digest.update(row_id.encode())
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def _round(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def _checkpoint_names(checkpoints: Sequence[Path]) -> list[str]:
    """``ckpt-<step>`` for ``checkpoint-<step>`` dirs; ``ckpt-<k>`` (1-based position) when steps are not unique."""
    steps = [re.fullmatch(r"checkpoint-(\d+)", Path(c).name) for c in checkpoints]
    if all(steps) and len({m.group(1) for m in steps}) == len(steps):
        return [f"ckpt-{int(m.group(1))}" for m in steps]
    return [f"ckpt-{k}" for k in range(1, len(checkpoints) + 1)]


def _checkpoint_key(path: Path, output_dir: Path) -> str:
    """How a scores file names its checkpoint: relative to ``output_dir`` if inside it, else absolute."""
    try:
        return path.resolve().relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _load_for_scoring(path: Path, dtype: str | None) -> PreTrainedModel:
    """A checkpoint as a plain model; a LoRA checkpoint is merged into its base model (scoring only)."""
    from .models import load_model

    if (path / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        base = load_model(PeftConfig.from_pretrained(str(path)).base_model_name_or_path, dtype=dtype)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    return load_model(str(path), dtype=dtype)


def _scoring_dtype(dyn_args: Any, training_args: Any, dtype: str | None) -> str | None:
    """``scoring_dtype``; ``auto``: bf16 weights when training in bf16 (a no-grad forward in bf16 weights is 15-30%
    faster on CPU than under autocast, and ranking examples needs no more precision), else the model's dtype."""
    choice = getattr(dyn_args, "scoring_dtype", "auto")
    if choice != "auto":
        return choice
    return "bfloat16" if getattr(training_args, "bf16", False) else dtype


def _score_all(
    checkpoints: list[Path],
    dataset: Dataset,
    fingerprint: str,
    scores_dir: Path,
    dyn_args: Any,
    training_args: Any,
    dtype: str | None,
) -> np.ndarray:
    """``[N, C]`` perplexities; each checkpoint's scores are read from, or written to, ``scores_dir``.

    A scores file is reused only if it was made from the same data (``fingerprint``, the `dataset_fingerprint`
    of ``dataset``) and the same checkpoint: named relative to the output dir when it lies inside it (so a moved
    or copied run dir stays valid).
    """
    state = PartialState()
    columns = []
    for path, name in zip(checkpoints, _checkpoint_names(checkpoints), strict=True):
        checkpoint_key = _checkpoint_key(path, scores_dir.parent)
        scores_file = scores_dir / f"{name}.json"
        if scores_file.is_file():
            saved = json.loads(scores_file.read_text(encoding="utf-8"))
            if saved.get("fingerprint") == fingerprint and saved.get("checkpoint") == checkpoint_key:
                logger.info("Reusing the scores of %s from %s", path, scores_file)
                columns.append(np.asarray(saved["perplexities"], dtype=np.float64))
                continue
            logger.warning("%s was made from other data or another checkpoint: scoring again", scores_file)
        model = _load_for_scoring(path, _scoring_dtype(dyn_args, training_args, dtype)).to(state.device)
        perplexities = score_checkpoint(
            model,
            dataset,
            dyn_args.scoring_batch_size,
            chunk_size=getattr(training_args, "head_chunk_size", 1024),
            bf16=bool(getattr(training_args, "bf16", False)),
            desc=f"Scoring {name}",
        )
        del model
        gc.collect()
        if state.is_main_process:
            record = {"checkpoint": checkpoint_key, "fingerprint": fingerprint, "ids": list(dataset["id"])}
            atomic_write_json(scores_file, {**record, "perplexities": perplexities.tolist()})
        state.wait_for_everyone()
        columns.append(perplexities)
    return np.stack(columns, axis=1)


def build_dynamics_rows(
    ids: Sequence[str], indices: Sequence[int], perplexities: np.ndarray, num_tokens: Sequence[int]
) -> list[dict[str, Any]]:
    """The ``dynamics.jsonl`` rows. Perplexities are rounded first and everything else is computed from the
    rounded values, so `confidence_scores` and `median_split` on the file's own numbers reproduce its split."""
    bad = [ids[i] for i in np.flatnonzero(~np.isfinite(perplexities).all(axis=1))]
    if bad:
        raise SFTMixError(f"example {bad[0]} has no response token to score ({len(bad)} such examples)")
    rounded = np.vectorize(_round)(perplexities)
    confidence = np.array([_round(c) for c in confidence_scores(rounded)])
    confident = median_split(confidence)
    variability = variability_scores(rounded)
    return [
        {
            "id": ids[i],
            "index": int(indices[i]),
            "perplexities": rounded[i].tolist(),
            "confidence": float(confidence[i]),
            "variability": _round(variability[i]),
            "split": CONFIDENT if confident[i] else UNCONFIDENT,
            "num_response_tokens": int(num_tokens[i]),
        }
        for i in range(len(ids))
    ]


def summarize_dynamics(rows: list[dict[str, Any]], checkpoints: Sequence[Path | str]) -> dict[str, Any]:
    """Counts, checkpoint list and confidence statistics of a dynamics file (``dynamics_summary.json``)."""
    confidence = np.array([row["confidence"] for row in rows])
    perplexities = np.array([row["perplexities"] for row in rows])
    quantiles = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
    steps = [re.fullmatch(r"checkpoint-(\d+)", Path(c).name) for c in checkpoints]
    n_confident = sum(row["split"] == CONFIDENT for row in rows)
    return {
        "num_examples": len(rows),
        "num_checkpoints": len(checkpoints),
        "checkpoints": [str(c) for c in checkpoints],
        "checkpoint_steps": [int(m.group(1)) if m else None for m in steps],
        "num_confident": n_confident,
        "num_unconfident": len(rows) - n_confident,
        "confidence_mean": _round(confidence.mean()),
        "confidence_std": _round(confidence.std()),
        "confidence_quantiles": {
            f"q{round(q * 100):02d}": _round(np.quantile(confidence, q)) for q in quantiles
        },
        "mean_perplexity_per_checkpoint": [_round(p) for p in perplexities.mean(axis=0)],
        "variability_mean": _round(np.mean([row["variability"] for row in rows])),
    }


def run_dynamics(
    model_args: Any,
    data_args: Any,
    dyn_args: Any,
    training_args: Any,
    trainer_cls: type | None = None,
) -> Path:
    """Stage 1 and 2: confidence of every training example and the median split; returns ``dynamics.jsonl``.

    Args:
        model_args: `trl.ModelConfig`; ``model_name_or_path`` is the target (and, by default, the reference).
        data_args: `sftmix.sftmix_config.DataArguments` (dataset, format, ``max_examples``, ``selection``).
        dyn_args: `sftmix.sftmix_config.DynamicsArguments` (C, reference model, epochs, checkpoints to score).
        training_args: `sftmix.SFTMixConfig`: ``output_dir``, ``max_length`` and the reference run's settings.
        trainer_cls: The reference run's trainer class (default `SFTMixTrainer`, NTP only).

    Writes to ``output_dir``: ``reference/checkpoint-*`` (unless ``score_checkpoints`` is given),
    ``scores/ckpt-*.json`` (one per checkpoint, written as each is scored), ``dynamics.jsonl``,
    ``dynamics_summary.json`` and ``datamap.png``. Rerunning the same command after a crash resumes the
    reference run from its latest checkpoint, reuses the scores already written and ends with the same bytes.
    """
    from .data import load_sft_dataset, tokenize_sft_dataset
    from .models import load_tokenizer, resolve_model
    from .selection import apply_selection

    _ = training_args.device  # sets up accelerate's state as the Trainer will (CPU / backend / process group)
    state = PartialState()
    check_process_group(state, training_args.world_size)  # before anything is written
    output_dir = Path(training_args.output_dir)
    reference = dyn_args.reference_model_name_or_path or model_args.model_name_or_path
    given = [Path(p.strip()) for p in (dyn_args.score_checkpoints or "").split(",") if p.strip()]
    if not given and not reference:
        raise SFTMixError("set model_name_or_path (or reference_model_name_or_path, or score_checkpoints)")
    for path in given:
        if not path.is_dir():
            raise SFTMixError(f"score_checkpoints: {path} is not a checkpoint directory")
    if given:  # the tokenizer must be the checkpoints' own: use theirs when they carry one
        has_tokenizer = (given[0] / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(str(given[0]) if has_tokenizer or not reference else reference)
    else:
        reference = resolve_model(reference)
        tokenizer = load_tokenizer(reference)

    loaded = load_sft_dataset(data_args)
    row_of = {row_id: i for i, row_id in enumerate(loaded["id"])}
    selected = apply_selection(loaded, data_args.selection, tokenizer=tokenizer)
    dataset = tokenize_sft_dataset(
        selected, tokenizer, training_args.max_length, getattr(training_args, "truncation_mode", "keep_start")
    )
    fingerprint = dataset_fingerprint(dataset)  # hashed once: the reference run and the scores files use it

    if given:
        checkpoints = given
    else:
        reference_model_args = dataclasses.replace(model_args, model_name_or_path=reference)
        from .reference import train_reference

        checkpoints = train_reference(
            reference_model_args,
            dataset,
            tokenizer,
            dyn_args.num_checkpoints,
            training_args,
            output_dir / "reference",
            epochs=dyn_args.reference_epochs,
            trainer_cls=trainer_cls,
            fingerprint=fingerprint,
        )
    perplexities = _score_all(
        checkpoints, dataset, fingerprint, output_dir / "scores", dyn_args, training_args, model_args.dtype
    )

    ids = list(dataset["id"])
    rows = build_dynamics_rows(ids, [row_of[i] for i in ids], perplexities, response_token_counts(dataset))
    summary = summarize_dynamics(rows, checkpoints)
    summary["reference_model"] = (
        None if given else (dyn_args.reference_model_name_or_path or model_args.model_name_or_path)
    )
    dynamics_path = output_dir / "dynamics.jsonl"
    if state.is_main_process:
        atomic_write_jsonl(dynamics_path, rows)
        atomic_write_json(output_dir / "dynamics_summary.json", summary)
        logger.info("Stage 1-2 summary: %s", json.dumps(summary, sort_keys=True))
        from .datamap import draw_datamap

        name = Path(summary["reference_model"] or given[-1]).name
        draw_datamap(dynamics_path, output_dir / "datamap.png", title=f"SFTMix data map of {name}")
        if not given and not dyn_args.keep_reference_optimizer:
            _drop_optimizer_states(checkpoints)
    state.wait_for_everyone()
    return dynamics_path


def _drop_optimizer_states(checkpoints: list[Path]) -> None:
    """Delete the optimizer states of complete reference checkpoints (2/3 of their size with AdamW).

    Only a resume of the reference run reads them, and the run is complete (its marker says so, so a rerun
    does not train again); scoring reads the weights, which stay.
    """
    for checkpoint in checkpoints:
        for path in checkpoint.glob("optimizer*"):  # optimizer.pt; FSDP: optimizer_0/, sharded files
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
