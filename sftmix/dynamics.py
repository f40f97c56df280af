"""Stages 1 and 2 driver (``sftmix dynamics``): reference run, scoring, ``dynamics.jsonl`` and the data map.

`run_dynamics`, resumably: trains the reference model (`sftmix.reference.train_reference`, plain next-token
prediction, C checkpoints evenly spaced through the run), scores every checkpoint (`sftmix.scoring`) into one
scores file per checkpoint as soon as it is scored, then computes confidence and the median split
(`sftmix.splits`) and writes ``dynamics.jsonl``, ``dynamics_summary.json`` and the data map ``datamap.png``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState
from datasets import Dataset
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel

from .data import dataset_fingerprint, load_sft_dataset, tokenize_sft_dataset
from .datamap import draw_datamap
from .distributed import check_process_group
from .errors import SFTMixError
from .io_utils import atomic_write_json
from .models import load_model, load_tokenizer, resolve_model
from .reference import train_reference
from .scoring import response_token_counts, score_checkpoint
from .selection import apply_selection
from .splits import build_dynamics_rows, summarize_dynamics, write_dynamics

logger = logging.getLogger(__name__)


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
    if (path / "adapter_config.json").is_file():
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
        write_dynamics(dynamics_path, rows)
        atomic_write_json(output_dir / "dynamics_summary.json", summary)
        logger.info("Stage 1-2 summary: %s", json.dumps(summary, sort_keys=True))
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
