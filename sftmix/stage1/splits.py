"""The split file ``dynamics.jsonl``: the method's arithmetic, the one writer and the one reader.

SFTMix's stage 2, from the ``[N, C]`` perplexities ``Perp_c(i)`` of N examples at C reference checkpoints:

- `confidence_scores`: ``Confidence(i) = -(1/C) sum_c Perp_c(i)``;
- `median_split`: the top half by confidence is confident (`CONFIDENT`), the rest unconfident (`UNCONFIDENT`);
- `variability_scores`: the std of ``Perp_c(i)`` over c, the x axis of the data map (the split ignores it);
- `split_agreement`: how far two scorings put the same examples in the same half (comparing scorers).

`build_dynamics_rows` makes the file's rows (one JSON object per example: ``id``, ``index``, ``perplexities``,
``confidence``, ``variability``, ``split``, ``num_response_tokens``) and `write_dynamics` writes them atomically;
`read_dynamics` is the reader everything else uses (the trainer, the data map, the efficacy study), with
`read_dynamics_splits` / `align_split` / `load_split` for the ``{id: is_confident}`` view of stage 3, and
`drop_unconfident` for data cleaning with the data map (``selection: drop_unconfident:F``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from ..errors import SFTMixError
from ..io_utils import atomic_write_jsonl, iter_jsonl

CONFIDENT, UNCONFIDENT = "confident", "unconfident"
SPLITS = (CONFIDENT, UNCONFIDENT)
SIGNIFICANT_DIGITS = 8
"""Floats in ``dynamics.jsonl`` are rounded to this many significant digits (fixed, byte-stable output)."""


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


def split_agreement(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """How far two scorings of the same examples agree, over their common ids (``{id: confidence}`` each).

    ``same_half``: the share of examples that `median_split` of each scoring's confidences puts in the same half
    (0.5 by chance); ``spearman``: Spearman's rho of the confidences (ranks of ties by order); ``n``: common ids.
    The halves are recomputed over the common ids in ``a``'s order, so for two ``dynamics.jsonl`` files of one
    dataset read in file order they are the files' own splits, ties included.

    >>> split_agreement({"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}, {"a": 2.0, "b": 3.0, "c": 0.0, "d": 1.0})
    {'same_half': 1.0, 'spearman': 0.6, 'n': 4}
    """
    ids = [i for i in a if i in b]
    if len(ids) < 2:
        raise ValueError(f"split_agreement needs at least 2 common ids, got {len(ids)}")
    x, y = (np.array([d[i] for i in ids], dtype=np.float64) for d in (a, b))
    same = float((median_split(x) == median_split(y)).mean())
    ranks = [np.argsort(np.argsort(v, kind="stable"), kind="stable") for v in (x, y)]
    rho = float(np.corrcoef(*ranks)[0, 1])
    return {"same_half": round(same, 4), "spearman": round(rho, 4), "n": len(ids)}


def _round(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def build_dynamics_rows(
    ids: Sequence[str],
    indices: Sequence[int],
    perplexities: np.ndarray,
    num_tokens: Sequence[int],
    confidence: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The ``dynamics.jsonl`` rows. Perplexities are rounded first and everything else is computed from the
    rounded values, so `confidence_scores` and `median_split` on the file's own numbers reproduce its split.

    A scorer whose confidence is not ``-mean(perplexities)`` (``online``'s progress correction, ``random``) passes
    its own ``confidence``; ``perplexities`` may then have no column (``[N, 0]``)."""
    perplexities = np.asarray(perplexities, dtype=np.float64).reshape(len(ids), -1)
    bad = [ids[i] for i in np.flatnonzero(~np.isfinite(perplexities).all(axis=1))]
    if bad:
        raise SFTMixError(f"example {bad[0]} has no response token to score ({len(bad)} such examples)")
    rounded = np.vectorize(_round, otypes=[np.float64])(perplexities)
    scores = confidence_scores(rounded) if confidence is None else np.asarray(confidence, dtype=np.float64)
    confidence = np.array([_round(c) for c in scores])
    confident = median_split(confidence)
    variability = variability_scores(rounded) if rounded.shape[1] else np.zeros(len(ids))
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
        "mean_perplexity_per_checkpoint": [
            _round(p) for p in perplexities.reshape(len(rows), -1).mean(axis=0)
        ],
        "variability_mean": _round(np.mean([row["variability"] for row in rows])),
    }


def write_dynamics(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write `build_dynamics_rows` to ``path`` atomically (a reader never sees half a file)."""
    return atomic_write_jsonl(Path(path), rows)


def _check_finite(value: Any, field: str, where: str) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SFTMixError(f"{where}: field '{field}' must hold finite numbers, got {v!r}")


def read_dynamics(
    dynamics_path: str | Path, require: Sequence[str] = ("id", "split")
) -> list[dict[str, Any]]:
    """The rows of a ``dynamics.jsonl``, each validated: the fields of ``require`` present, ``split`` one of
    `SPLITS`, ``confidence`` and ``perplexities`` finite, ids unique. Any problem is a one-line `SFTMixError`
    naming the file and line."""
    path = Path(dynamics_path)
    if not path.is_file():
        raise SFTMixError(
            f"dynamics file not found: {path} (run `sftmix dynamics` first, or set dynamics_path)"
        )
    rows, seen = [], set()
    for lineno, row in iter_jsonl(path):
        where = f"{path}: line {lineno}"
        for key in require:
            if key not in row:
                raise SFTMixError(f"{where}: missing field '{key}'")
        if "split" in row and row["split"] not in SPLITS:
            raise SFTMixError(
                f"{where}: field 'split' must be 'confident' or 'unconfident', got {row['split']!r}"
            )
        for key in ("confidence", "perplexities"):
            if key in row:
                _check_finite(row[key], key, where)
        if "id" in row:
            if str(row["id"]) in seen:
                raise SFTMixError(f"{where}: duplicate id {str(row['id'])!r}")
            seen.add(str(row["id"]))
        rows.append(row)
    if not rows:
        raise SFTMixError(f"{path}: holds no examples")
    return rows


def read_dynamics_splits(dynamics_path: str | Path, among: Sequence[str] | None = None) -> dict[str, bool]:
    """``{id: is_confident}`` of a ``dynamics.jsonl`` (`read_dynamics`): the file's own split, or with ``among``
    the median split redone over those ids' confidences (the halves of the examples a selection kept)."""
    if among is None:
        return {str(row["id"]): row["split"] == CONFIDENT for row in read_dynamics(dynamics_path)}
    by_id = {str(row["id"]): row["confidence"] for row in read_dynamics(dynamics_path, ("id", "confidence"))}
    _check_covers(by_id, among, dynamics_path)
    confident = median_split([by_id[str(i)] for i in among])
    return {str(i): bool(c) for i, c in zip(among, confident, strict=True)}


def _check_covers(known: Mapping[str, Any], ids: Sequence[str], dynamics_path: str | Path) -> None:
    """A one-line error unless every training id is in the dynamics file (else it is of other data)."""
    missing = [i for i in ids if str(i) not in known]
    if missing and len(missing) == len(ids):
        raise SFTMixError(
            f"{dynamics_path} is for another dataset: none of the {len(ids)} training example ids is in it "
            f"(first: {missing[0]!r}); run `sftmix dynamics` on this dataset"
        )
    if missing:
        raise SFTMixError(
            f"{dynamics_path} has no entry for {len(missing)} of the {len(ids)} training examples (first: "
            f"{missing[0]!r}); run `sftmix dynamics` on the same dataset, selection and max_length"
        )


def least_confident(confidence: Sequence[float], fraction: float) -> np.ndarray:
    """Which of the examples `drop_unconfident` drops: the ``round(fraction * N)`` least confident, of equal
    confidences the later example first (as in `median_split`).

    >>> least_confident([-2.0, -9.0, -1.0, -3.0], 0.5).tolist()
    [False, True, False, True]
    """
    n = len(confidence)
    ranking = np.lexsort((np.arange(n), -np.asarray(confidence, dtype=np.float64)))  # most confident first
    dropped = np.zeros(n, dtype=bool)
    dropped[ranking[n - round(fraction * n) :]] = True
    return dropped


def drop_unconfident(dataset: Dataset, fraction: float, dynamics_path: str | Path) -> Dataset:
    """``dataset`` without the ``fraction`` of its examples least confident by the dynamics file: data cleaning
    with the data map (mislabeled and broken examples gather at low confidence, Swayamdipta et al. 2020).

    ``round(fraction * N)`` examples are dropped, lowest confidence first (of equal confidences the later
    example goes first, as in `median_split`); the rest keep their dataset order. Every id of ``dataset`` must
    be in the file.

    >>> import json, tempfile
    >>> path = Path(tempfile.mkdtemp()) / "dynamics.jsonl"
    >>> _ = path.write_text("".join(json.dumps({"id": i, "confidence": c, "split": "confident"}) + "\\n"
    ...                             for i, c in [("a", -2.0), ("b", -9.0), ("c", -1.0), ("d", -3.0)]))
    >>> list(drop_unconfident(Dataset.from_dict({"id": ["a", "b", "c", "d"]}), 0.5, path)["id"])
    ['a', 'c']
    """
    if not 0 < fraction < 1:
        raise SFTMixError(f"drop_unconfident: the fraction must be between 0 and 1, got {fraction}")
    by_id = {str(row["id"]): row["confidence"] for row in read_dynamics(dynamics_path, ("id", "confidence"))}
    ids = [str(i) for i in dataset["id"]]
    _check_covers(by_id, ids, dynamics_path)
    kept = np.flatnonzero(~least_confident([by_id[i] for i in ids], fraction)).tolist()
    if len(kept) < 2:
        raise SFTMixError(
            f"drop_unconfident:{fraction} leaves {len(kept)} of {len(ids)} examples to train on"
        )
    return dataset.select(kept)


def load_split(dynamics_path: str | Path, ids: Sequence[str]) -> np.ndarray:
    """The confident/unconfident split of the training examples ``ids``, from a ``dynamics.jsonl``.

    Args:
        dynamics_path: The file written by ``sftmix dynamics`` (one JSON object per example with ``id`` and
            ``split``; ``confidence`` and ``perplexities`` are checked to be finite when present).
        ids: The ``id`` column of the training dataset, in dataset order. The file may hold more ids (e.g.
            examples dropped by truncation), but never fewer.

    Returns:
        ``np.ndarray[bool]`` aligned with ``ids``: True for confident examples.

    Raises:
        SFTMixError: the file is missing or malformed, misses ids of the dataset, belongs to another dataset, or
            leaves one half empty.
    """
    return align_split(read_dynamics_splits(dynamics_path), ids, dynamics_path)


def align_split(splits: Mapping[str, bool], ids: Sequence[str], dynamics_path: str | Path) -> np.ndarray:
    """`load_split` from the ``{id: is_confident}`` of `read_dynamics_splits`, so a caller that needs both
    reads the file once; ``dynamics_path`` (where ``splits`` came from) is named in the errors."""
    _check_covers(splits, ids, dynamics_path)
    confident = np.array([splits[str(i)] for i in ids], dtype=bool)
    if confident.all() or not confident.any():
        half = "confident" if confident.all() else "unconfident"
        raise SFTMixError(
            f"{dynamics_path}: all {len(ids)} training examples are {half}; Mixup needs both halves"
        )
    return confident
