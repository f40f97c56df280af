"""The files stage 1 writes, whichever scorer (`sftmix.stage1.scorers`) made the split.

Every scorer writes the same ``dynamics/`` directory (`write_stage1`): ``dynamics.jsonl`` (`sftmix.stage1.splits`' format and median
split), ``dynamics_summary.json`` naming the scorer and the data's fingerprint, and ``datamap.png``.
`existing_stage1` finds a finished one again, so a rerun reuses it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState

from ..errors import SFTMixError
from ..io_utils import atomic_write_json
from .datamap import draw_datamap
from .splits import build_dynamics_rows, summarize_dynamics, write_dynamics

logger = logging.getLogger(__name__)

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
