"""The efficacy study's bookkeeping: the random-split ablation and the weak-to-strong split agreement."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sftmix.io_utils import atomic_write_jsonl, read_jsonl

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import efficacy_study  # noqa: E402  (a script directory, not a package)
import overfit_study  # noqa: E402


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


def _fake_eval(run: Path, epoch: int, name: str, shift: float) -> None:
    """An eval dir as `sftmix eval --task perplexity` writes it: 20 items, bins of 15."""

    import numpy as np

    rng = np.random.default_rng(epoch)
    rows = []
    for i in range(20):
        count = rng.integers(0, 3, 15).astype(float)
        conf = count * (np.arange(15) + 0.5) / 15
        rows.append(
            {
                "id": f"x{i}",
                "tokens": int(count.sum()) + 1,
                "nll": float(rng.uniform(1, 3) + shift),
                "bins": {
                    "count": count.tolist(),
                    "confidence": conf.tolist(),
                    "correct": (count * 0.5).tolist(),
                },
            }
        )
    out = run / "eval" / f"e{epoch}" / name
    out.mkdir(parents=True)
    atomic_write_jsonl(out / "predictions.jsonl", rows)
    metrics = dict.fromkeys(overfit_study.METRICS, 1.0 + shift)
    (out / "eval.json").write_text(json.dumps({"perplexity": metrics}))


def test_overfit_report_compares_each_arm_with_ntp_and_lists_missing_cells(tmp_path):
    root = tmp_path / "overfit"
    for arm, shift in (("ntp", 0.0), ("sftmix", 0.5)):
        for seed in (1, 2):
            for epoch in overfit_study.EVAL_EPOCHS:
                for name in overfit_study.EVAL_SETS:
                    _fake_eval(root / f"{arm}-s{seed}", epoch, name, shift)
    overfit_study.report_overfit(root)
    text = (root / "results.md").read_text()
    # every item's NLL is 0.5 higher: perplexity up, ECE unchanged (the bins are the same)
    row = next(line for line in text.splitlines() if line.startswith("| indomain/perplexity | sftmix (last)"))
    diff, interval = row.split(" | ")[4], row.split(" | ")[5]
    assert float(diff) > 0 and float(interval.strip("[]").split(",")[0]) > 0
    ece = next(line for line in text.splitlines() if line.startswith("| ood/ece | sftmix (last)"))
    assert float(ece.split(" | ")[4]) == 0.0
    assert "ntp-s3" in text and "sftmix-s1" not in text.split("Missing")[1]
    overfit_study.draw_figure(root, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    overfit_study.export(root, tmp_path / "exported")
    assert (tmp_path / "exported.md").read_text() == text
    assert json.loads((tmp_path / "exported.json").read_text())["missing"]


def test_overfit_report_gives_the_cheap_splits_agreement(tmp_path):
    root = tmp_path / "overfit"
    paper = [{"id": f"x{i}", "split": "confident" if i < 4 else "unconfident"} for i in range(8)]
    cheap = [{**r, "split": "confident" if i in (0, 1, 2, 7) else "unconfident"} for i, r in enumerate(paper)]
    for path, rows in ((root / "dynamics", paper), (root / "cheap-s2" / "dynamics", cheap)):
        path.mkdir(parents=True)
        atomic_write_jsonl(path / "dynamics.jsonl", rows)
    assert "- seed 2: 75.0% of 8 examples" in "\n".join(overfit_study._cheap_split_agreement(root))
