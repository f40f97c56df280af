"""``sftmix dynamics``: stages 1 and 2 as a program of their own, from a data file to ``dynamics.jsonl``.

`run_dynamics` loads and tokenizes the data with the reference model's tokenizer, then makes the split with the
``reference`` scorer (`sftmix.stage1.reference.train_reference`: a plain-NTP run scored in-process at C steps), ``base``
(one no-grad pass of the model) or ``random``, or scores existing checkpoints (``score_checkpoints``); every
checkpoint's scores go to a file of their own as soon as they exist, and `sftmix.stage1.files.write_stage1` writes
``dynamics.jsonl``, ``dynamics_summary.json`` and the data map. (``warmup`` and ``online`` make the split while the
target trains: `sftmix.SFTMixTrainer` runs them.)
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState
from datasets import Dataset
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel
from trl import get_peft_config

from ..data.dataset import dataset_fingerprint, load_sft_dataset, tokenize_sft_dataset
from ..data.models import load_model, load_tokenizer, resolve_model
from ..data.selection import apply_selection
from ..distributed import check_process_group
from ..errors import SFTMixError
from ..sftmix_trainer import SFTMixTrainer
from ..stage1.files import SCORES_DIR, random_confidence, read_scores, write_scores, write_stage1
from ..stage1.reference import train_reference
from ..stage1.scoring import response_token_counts, score_checkpoint

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


def _scoring_dtype(training_args: Any, dtype: str | None) -> str | None:
    """``scoring_dtype``; ``auto``: bf16 weights when training in bf16 (a no-grad forward in bf16 weights is 15-30%
    faster on CPU than under autocast, and ranking examples needs no more precision), else the model's dtype."""
    choice = getattr(training_args, "scoring_dtype", "auto")
    if choice != "auto":
        return choice
    return "bfloat16" if getattr(training_args, "bf16", False) else dtype


def _score_all(
    checkpoints: list[Path],
    dataset: Dataset,
    fingerprint: str,
    scores_dir: Path,
    training_args: Any,
    dtype: str | None,
) -> np.ndarray:
    """``[N, C]`` perplexities of saved checkpoints (``score_checkpoints``); each checkpoint's scores are read from,
    or written to, ``scores_dir``.

    A scores file is reused only if it was made from the same data (``fingerprint``, the `dataset_fingerprint`
    of ``dataset``) and the same checkpoint: named relative to the output dir when it lies inside it (so a moved
    or copied run dir stays valid).
    """
    state = PartialState()
    columns = []
    for path, name in zip(checkpoints, _checkpoint_names(checkpoints), strict=True):
        key = _checkpoint_key(path, scores_dir.parent)
        values = read_scores(scores_dir / f"{name}.json", fingerprint, key)
        if values is None:
            model = _load_for_scoring(path, _scoring_dtype(training_args, dtype)).to(state.device)
            values = score_checkpoint(
                model,
                dataset,
                training_args.scoring_batch_size,
                chunk_size=getattr(training_args, "head_chunk_size", 1024),
                bf16=bool(getattr(training_args, "bf16", False)),
                desc=f"Scoring {name}",
            )
            del model
            gc.collect()
            write_scores(scores_dir / f"{name}.json", fingerprint, key, dataset["id"], values)
        columns.append(values)
    return np.stack(columns, axis=1)


def run_dynamics(
    model_args: Any, data_args: Any, training_args: Any, trainer_cls: type | None = None
) -> Path:
    """Stages 1 and 2 (``sftmix dynamics``): confidence of every training example and the median split.

    Args:
        model_args: `trl.ModelConfig`; ``model_name_or_path`` is the target (and, by default, the reference).
        data_args: `sftmix.sftmix_config.DataArguments` (dataset, format, ``max_examples``, ``selection``).
        training_args: `sftmix.SFTMixConfig`: ``output_dir``, ``max_length``, the reference run's settings and
            stage 1's (``confidence_scorer``: ``reference``, ``base`` or ``random`` here; ``num_checkpoints``,
            ``reference_model_name_or_path``, ``score_checkpoints``...).
        trainer_cls: The reference run's trainer class (default `SFTMixTrainer`, NTP only).

    Writes to ``output_dir``: ``scores/ckpt-*.json`` (one per checkpoint, written as each is scored),
    ``dynamics.jsonl``, ``dynamics_summary.json`` and ``datamap.png`` (`sftmix.stage1.files.write_stage1`), and the
    reference run's marker and logs in ``reference/``. Rerunning the same command after a crash reuses the
    checkpoints already scored and ends with the same bytes. Returns the ``dynamics.jsonl`` path.
    """
    _ = training_args.device  # sets up accelerate's state as the Trainer will (CPU / backend / process group)
    state = PartialState()
    check_process_group(state, training_args.world_size)  # before anything is written
    output_dir = Path(training_args.output_dir)
    scorer = training_args.confidence_scorer
    if scorer in ("warmup", "online"):
        raise SFTMixError(
            f"confidence_scorer={scorer} makes the split while the target trains: use `sftmix train` or `sftmix run`"
        )
    reference = training_args.reference_model_name_or_path or model_args.model_name_or_path
    given = [Path(p.strip()) for p in (training_args.score_checkpoints or "").split(",") if p.strip()]
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
    ids = list(dataset["id"])
    confidence = None
    if given:
        scorer = "checkpoints"
        checkpoints = [str(p) for p in given]
        perplexities = _score_all(
            given, dataset, fingerprint, output_dir / SCORES_DIR, training_args, model_args.dtype
        )
    elif scorer == "reference":
        perplexities, steps = train_reference(
            reference, dataset, dataset, tokenizer, training_args, output_dir / "reference",
            trainer_cls or SFTMixTrainer, fingerprint, reference, peft_config=get_peft_config(model_args),
            dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        )  # fmt: skip
        checkpoints = [f"reference/checkpoint-{step}" for step in steps]
    elif scorer == "base":
        model = load_model(reference, dtype=_scoring_dtype(training_args, model_args.dtype)).to(state.device)
        perplexities = score_checkpoint(
            model, dataset, training_args.scoring_batch_size, chunk_size=training_args.head_chunk_size,
            bf16=bool(training_args.bf16), desc="Scoring the base model",
        )[:, None]  # fmt: skip
        checkpoints = [reference]
    else:  # random
        perplexities, checkpoints = np.zeros((len(ids), 0)), []
        confidence = random_confidence(ids, training_args.seed)
    return write_stage1(
        output_dir, ids, perplexities, response_token_counts(dataset), scorer=scorer, checkpoints=checkpoints,
        fingerprint=fingerprint, model_name=None if given else reference, indices=[row_of[i] for i in ids],
        confidence=confidence,
    )  # fmt: skip
