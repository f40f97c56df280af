"""The efficacy study's bookkeeping: the random-split ablation and the weak-to-strong split agreement."""

from __future__ import annotations

import sys
from pathlib import Path

from sftmix.io_utils import atomic_write_jsonl, read_jsonl

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import efficacy_study  # noqa: E402  (a script directory, not a package)


def _dynamics(path: Path, confidences: list[float]) -> None:
    order = sorted(range(len(confidences)), key=lambda i: -confidences[i])
    confident = set(order[: len(order) // 2])
    atomic_write_jsonl(
        path,
        (
            {"id": f"e{i}", "confidence": c, "split": "confident" if i in confident else "unconfident"}
            for i, c in enumerate(confidences)
        ),
    )


def test_random_split_keeps_sizes_and_ids_and_depends_on_seed(tmp_path):
    _dynamics(tmp_path / "d.jsonl", [float(i) for i in range(40)])
    one = read_jsonl(efficacy_study.random_split(tmp_path / "d.jsonl", tmp_path / "r1.jsonl", 1))
    two = read_jsonl(efficacy_study.random_split(tmp_path / "d.jsonl", tmp_path / "r2.jsonl", 2))
    for rows in (one, two):
        assert [r["id"] for r in rows] == [f"e{i}" for i in range(40)]
        assert sum(r["split"] == "confident" for r in rows) == 20
    assert [r["split"] for r in one] != [r["split"] for r in two]


def test_split_agreement_of_weak_and_own_reference(tmp_path):
    root = tmp_path / "alpaca"
    assert efficacy_study.split_agreement(root) == []  # no weak run: nothing to report
    for name in ("dynamics", "dynamics-weak"):
        (root / name).mkdir(parents=True)
    _dynamics(root / "dynamics" / "dynamics.jsonl", [1.0, 2.0, 3.0, 4.0])
    # The same halves, the ranks swapped inside the low one.
    _dynamics(root / "dynamics-weak" / "dynamics.jsonl", [2.0, 1.0, 3.0, 4.0])
    (line,) = [s for s in efficacy_study.split_agreement(root) if s]
    assert "100.0% in the same half" in line and "rho of confidence 0.800" in line
    _dynamics(root / "dynamics-weak" / "dynamics.jsonl", [4.0, 3.0, 2.0, 1.0])  # reversed ranking
    (line,) = [s for s in efficacy_study.split_agreement(root) if s]
    assert "0.0% in the same half" in line and "rho of confidence -1.000" in line
