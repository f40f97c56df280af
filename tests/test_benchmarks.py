"""The efficacy study's bookkeeping: the random-split ablation and the weak-to-strong split agreement."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sftmix.io_utils import atomic_write_jsonl, read_jsonl

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import efficacy_study  # noqa: E402  (a script directory, not a package)
import noisy_study  # noqa: E402
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
    assert efficacy_study.weak_split_agreement(root) == []  # no weak run: nothing to report
    for name in ("dynamics", "dynamics-weak"):
        (root / name).mkdir(parents=True)
    _dynamics(root / "dynamics" / "dynamics.jsonl", [1.0, 2.0, 3.0, 4.0])
    # The same halves, the ranks swapped inside the low one.
    _dynamics(root / "dynamics-weak" / "dynamics.jsonl", [2.0, 1.0, 3.0, 4.0])
    (line,) = [s for s in efficacy_study.weak_split_agreement(root) if s]
    assert "100.0% in the same half" in line and "rho of confidence 0.800" in line
    _dynamics(root / "dynamics-weak" / "dynamics.jsonl", [4.0, 3.0, 2.0, 1.0])  # reversed ranking
    (line,) = [s for s in efficacy_study.weak_split_agreement(root) if s]
    assert "0.0% in the same half" in line and "rho of confidence -1.000" in line


def _fake_eval(out: Path, shift: float, seed: int = 0) -> None:
    """An eval dir as `sftmix eval --task perplexity` writes it: 20 items, bins of 15."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(20):
        count = rng.integers(0, 3, 15).astype(float)
        conf = count * (np.arange(15) + 0.5) / 15
        rows.append(
            {
                "id": f"x{i}",
                "tokens": int(count.sum()) + 1,
                "nll": float(rng.uniform(1, 3) + shift),
                "perplexity": 1.0,
                "bins": {
                    "count": count.tolist(),
                    "confidence": conf.tolist(),
                    "correct": (count * 0.5).tolist(),
                },
            }
        )
    out.mkdir(parents=True)
    atomic_write_jsonl(out / "predictions.jsonl", rows)
    metrics = dict.fromkeys(overfit_study.METRICS, 1.0 + shift)
    (out / "eval.json").write_text(json.dumps({"perplexity": metrics}))


def _fake_sh(
    commands: list[list[str]],
    shift: Callable[[str], float] = lambda model: 0.0,
    precision: Callable[[str], str | None] = lambda run: None,
) -> Callable[[list[str], Path], None]:
    """A study's ``sh`` that runs nothing: it keeps each command and leaves what the command would (stage 1: a
    split of 8 examples, confidence -i; training: checkpoints of epochs 1, 2, 4 and a final model, with
    ``precision(run name)`` recorded when given; an evaluation: ``_fake_eval`` with ``shift(model path)``)."""

    def sh(cmd: list[str], log: Path) -> None:
        commands.append(cmd)
        out = Path(cmd[cmd.index("--output_dir") + 1])
        if cmd[1] == "dynamics":
            rows = [
                {
                    "id": f"x{i}",
                    "confidence": -i,
                    "variability": i % 3,
                    "split": "confident" if i < 4 else "unconfident",
                }
                for i in range(8)
            ]
            out.mkdir(parents=True)
            atomic_write_jsonl(out / "dynamics.jsonl", rows)
        elif cmd[1] == "train":
            for epoch in (1, 2, 4):
                (out / f"checkpoint-{epoch}").mkdir(parents=True)
                (out / f"checkpoint-{epoch}" / "trainer_state.json").write_text(
                    json.dumps({"epoch": float(epoch)})
                )
            (out / "final").mkdir()
            (out / "final" / "config.json").write_text("{}")
            if (trained_in := precision(out.name)) is not None:  # what record_precision reads
                (out / "final" / "sftmix_train.json").write_text(json.dumps({"precision": trained_in}))
        else:
            _fake_eval(out, shift(cmd[cmd.index("--model_name_or_path") + 1]))

    return sh


@pytest.fixture
def fast_bootstrap(monkeypatch) -> None:
    """The studies' paired bootstrap with 200 resamples: the tests check its bookkeeping, not its precision."""
    full = overfit_study.paired_bootstrap
    monkeypatch.setattr(overfit_study, "paired_bootstrap", lambda a, b, stat: full(a, b, stat, resamples=200))


def test_overfit_report_is_made_from_the_record_and_compares_each_arm_with_ntp(tmp_path):
    root, record = tmp_path / "overfit", tmp_path / "results" / "efficacy_overfit"
    for arm, shift in (("ntp", 0.0), ("sftmix", 0.5), ("random", 0.2)):
        for seed in (1, 2):
            for epoch in overfit_study.EVAL_EPOCHS:
                for name in overfit_study.EVAL_SETS:
                    _fake_eval(root / f"{arm}-s{seed}" / "eval" / f"e{epoch}" / name, shift, epoch)
    overfit_study.sync_record(root, record)
    assert len(list(record.glob("*/*.npz"))) == 3 * 2 * 4 * 2
    shutil.rmtree(root)  # a fresh machine: the report needs the record only
    overfit_study.report_overfit(record)
    text = (tmp_path / "results" / "efficacy_overfit.md").read_text()
    # every item's NLL is 0.5 higher: perplexity up, ECE unchanged (the bins are the same)
    row = next(line for line in text.splitlines() if line.startswith("| indomain/perplexity | sftmix (last)"))
    diff, interval = row.split(" | ")[4], row.split(" | ")[5]
    assert float(diff) > 0 and float(interval.strip("[]").split(",")[0]) > 0
    ece = next(line for line in text.splitlines() if line.startswith("| ood/ece | sftmix (last)"))
    assert float(ece.split(" | ")[4]) == 0.0
    # the split ablation, sftmix minus random directly: NLL 0.3 higher on every item
    ablation = next(
        line for line in text.splitlines() if line.startswith("| ood/perplexity | sftmix − random (last)")
    )
    assert 0 < float(ablation.split(" | ")[4]) < float(row.split(" | ")[4])
    assert "sftmix − cheap" not in text
    assert "ntp-s3" in text and "sftmix-s1" not in text.split("Missing")[1]
    assert "| sftmix | 1.5000 [1.5000, 1.5000] (s1,2) |" in text
    assert json.loads((tmp_path / "results" / "efficacy_overfit.json").read_text())["missing"]
    overfit_study.draw_figure(record, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000


def test_overfit_record_without_items_is_tabulated_but_not_compared(tmp_path):
    record = tmp_path / "efficacy_overfit"
    for arm in ("ntp", "random"):
        for epoch in overfit_study.EVAL_EPOCHS:
            for name in overfit_study.EVAL_SETS:
                metrics = np.full(len(overfit_study.METRICS), 2.0)
                (record / f"{arm}-s1").mkdir(parents=True, exist_ok=True)
                np.savez_compressed(record / f"{arm}-s1" / f"e{epoch}-{name}.npz", metrics=metrics)
    overfit_study.report_overfit(record)
    text = (tmp_path / "efficacy_overfit.md").read_text()
    assert "| random | 2.0000 (s1) |" in text
    assert "| random (last)" not in text
    assert (
        "without per-item fields (in the tables, not in the comparisons; a rerun trains them again): ntp-s1, random-s1."
        in text
    )
    assert "random-s1" in text.split("Missing")[1]  # to be redone


def test_overfit_report_gives_the_cheap_splits_agreement(tmp_path):
    root, record = tmp_path / "overfit", tmp_path / "efficacy_overfit"

    def rows(confidence: list[float]) -> list[dict]:
        top = sorted(range(8), key=lambda i: -confidence[i])[:4]
        return [
            {"id": f"x{i}", "confidence": c, "split": "confident" if i in top else "unconfident"}
            for i, c in enumerate(confidence)
        ]

    paper = rows([8.0, 7, 6, 5, 4, 3, 2, 1])
    cheap = rows([8.0, 7, 6, 3, 2, 1, 0, 5])  # x3 and x7 swap halves
    for path, dynamics in ((root / "dynamics", paper), (root / "cheap-s2" / "dynamics", cheap)):
        path.mkdir(parents=True)
        atomic_write_jsonl(path / "dynamics.jsonl", [{**r, "perplexities": [1.0]} for r in dynamics])
    overfit_study.sync_record(root, record)
    assert read_jsonl(record / "dynamics.jsonl") == paper  # kept slim: what a split file needs
    (line,) = [s for s in overfit_study._cheap_split_agreement(record) if s.startswith("- ")]
    assert line.startswith("- seed 2: 75.0% of 8 examples in the paper split's half")


def test_overfit_study_continues_from_the_record_on_a_fresh_machine(tmp_path, monkeypatch):
    """A rerun skips what the record holds; a lost evaluation retrains its run on the recorded split."""
    commands: list[list[str]] = []
    sh = _fake_sh(commands)

    def make_sets(root: Path) -> dict[str, Path]:
        return {name: root / f"{name}.jsonl" for name in ("train", "indomain", "ood")}

    monkeypatch.setattr(overfit_study, "make_sets", make_sets)
    monkeypatch.setattr(overfit_study, "sh", sh)
    args = efficacy_study.argparse.Namespace(
        root=str(tmp_path / "runs"), record=str(tmp_path / "record"), arms=["ntp", "sftmix"], seeds=[1],
        model="m", max_length=64, batch=2, grad_accum=1, lr=1e-5, num_checkpoints=2,
    )  # fmt: skip
    overfit_study.run_overfit(args)
    assert [c[1] for c in commands] == ["dynamics", "train", *["eval"] * 8, "train", *["eval"] * 8]
    assert len(list((tmp_path / "record").glob("*/*.npz"))) == 16
    assert not list((tmp_path / "runs").glob("*/checkpoint-*"))  # recorded: checkpoints deleted

    shutil.rmtree(tmp_path / "runs")  # a fresh machine with the committed record
    (tmp_path / "record.md").unlink()
    commands.clear()
    overfit_study.run_overfit(args)
    assert commands == []
    assert (tmp_path / "record.md").exists()  # reported though nothing was left to do

    # A run the record holds in part (one evaluation lost, one without per-item fields) is trained again here,
    # on the recorded split, and every epoch of it is evaluated from this training.
    shutil.rmtree(tmp_path / "runs")
    run = tmp_path / "record" / "sftmix-s1"
    (run / "e8-ood.npz").unlink()
    np.savez_compressed(run / "e1-indomain.npz", metrics=np.zeros(len(overfit_study.METRICS)))
    overfit_study.run_overfit(args)
    train, *evaluations = commands
    assert train[1] == "train" and train[train.index("--output_dir") + 1].endswith("sftmix-s1")
    assert train[train.index("--dynamics_path") + 1] == str(tmp_path / "record" / "dynamics.jsonl")
    assert len(evaluations) == 8 and all(c[1] == "eval" for c in evaluations)
    assert (run / "e8-ood.npz").exists()
    assert "nll" in np.load(run / "e1-indomain.npz").files


def test_roc_auc_matches_its_definition():
    rng = np.random.default_rng(0)
    scores, positive = rng.normal(size=40).round(1), rng.random(40) < 0.3
    pairs = [(p, n) for p in scores[positive] for n in scores[~positive]]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert noisy_study.roc_auc(scores, positive) == expected


def test_noisy_study_runs_each_arm_as_asked_and_reports_detection(tmp_path, monkeypatch, fast_bootstrap):
    """The arms' commands (the filter's selection, the clean arm's data, the random arm's shuffled split), the
    detection table from stage 1 alone, and a rerun on a fresh machine that does nothing but report."""
    commands: list[list[str]] = []
    bad = {"x0": "mismatched", "x1": "truncated", "x2": "wrong_language", "x7": "truncated"}

    # confidence -i: x0 is the most confident, so it is found late; every item's NLL 0.3 above ntp's
    sh = _fake_sh(commands, shift=lambda model: 0.0 if "/ntp-" in model else 0.3)

    def make_noisy_sets(root: Path, model: str) -> dict[str, Path]:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_jsonl(root / "noise.jsonl", [{"id": i, "kind": k} for i, k in bad.items()])
        names = ("train", "indomain", "ood", "noisy", "clean", "noise")
        return {name: root / (f"{name}.jsonl" if name != "noise" else "noise.jsonl") for name in names}

    monkeypatch.setattr(noisy_study, "make_noisy_sets", make_noisy_sets)
    monkeypatch.setattr(noisy_study, "sh", sh)
    args = efficacy_study.argparse.Namespace(
        root=str(tmp_path / "runs"), record=str(tmp_path / "record"), model="m", max_length=64, batch=2,
        grad_accum=1, lr=1e-5, seeds=[1], arms=["ntp", "random", "filter", "clean"], detect=["reference", "base"],
    )  # fmt: skip
    noisy_study.run_noisy(args)
    trains = {Path(c[c.index("--output_dir") + 1]).name: c for c in commands if c[1] == "train"}
    assert list(trains) == ["ntp-s1", "random-s1", "filter-s1", "clean-s1"]
    assert trains["filter-s1"][trains["filter-s1"].index("--selection") + 1] == "drop_unconfident:0.25"
    assert trains["filter-s1"][trains["filter-s1"].index("--dynamics_path") + 1].endswith(
        "dynamics-reference.jsonl"
    )
    assert trains["clean-s1"][trains["clean-s1"].index("--dataset_name") + 1].endswith("clean.jsonl")
    assert trains["random-s1"][trains["random-s1"].index("--dynamics_path") + 1].endswith(
        "random_split-s1.jsonl"
    )
    assert [
        c[c.index("--confidence_scorer") + 1]
        for c in commands
        if c[1] == "dynamics" and "--confidence_scorer" in c
    ] == ["base"]

    text = (tmp_path / "record.md").read_text()
    # 4 bad (x0, x1, x2, x7) among 8, confidence -i: only x7 is less confident than the good ones (all 4 of
    # them), so the AUC of low confidence is 4 / (4 * 4); x7 is the only bad one in the unconfident half (x4-x7)
    # and among the two that the filter drops (x6, x7): 25% of the bad, precision 50%.
    row = next(line for line in text.splitlines() if line.startswith("| reference | all |"))
    assert row.split(" | ")[3:7] == [f"{4 / 16:.3f}", "25.0%", "25.0%", "50.0% |"]
    assert "| variability (reference) | truncated | 2 |" in text
    comparison = next(
        line for line in text.splitlines() if line.startswith("| indomain/perplexity | filter − ntp (last)")
    )
    assert float(comparison.split(" | ")[4]) > 0  # every item's NLL 0.3 higher than ntp's
    assert "| ood/perplexity | ntp − clean (last)" in text

    shutil.rmtree(tmp_path / "runs")  # a fresh machine with the committed record: nothing to run again
    commands.clear()
    noisy_study.run_noisy(args)
    assert commands == []


def test_overfit_bema_arm_evaluates_the_bema_weights_and_dft_trains_with_trls_loss(
    tmp_path, monkeypatch, fast_bootstrap
):
    commands: list[list[str]] = []

    sh = _fake_sh(commands, precision=lambda run: "bf16" if "bema" in run else "fp32")

    monkeypatch.setattr(
        overfit_study,
        "make_sets",
        lambda root: {n: root / f"{n}.jsonl" for n in ("train", "indomain", "ood")},
    )
    args = efficacy_study.argparse.Namespace(
        root=str(tmp_path / "runs"), record=str(tmp_path / "record"), arms=["dft", "bema"], seeds=[1],
        model="m", max_length=64, batch=2, grad_accum=1, lr=1e-5, num_checkpoints=2,
    )  # fmt: skip
    monkeypatch.setattr(overfit_study, "sh", sh)
    overfit_study.run_overfit(args)
    trains = [c for c in commands if c[1] == "train"]
    assert trains[0][trains[0].index("--loss_type") + 1] == "dft" and "--bema" in trains[1]
    evaluated = [c[c.index("--model_name_or_path") + 1] for c in commands if c[1] == "eval"]
    assert all(p.endswith("/bema") for p in evaluated if "/bema-s1/" in p)
    assert sum(p.endswith("/bema") for p in evaluated) == 8 and sum("/dft-s1/" in p for p in evaluated) == 8
    assert json.loads((tmp_path / "record" / "dft-s1" / "precision.json").read_text()) == {
        "precision": "fp32"
    }
    assert "dft-s1: fp32" in (tmp_path / "record.md").read_text()
    assert (
        "bema-s1: bf16, dft-s1: fp32 (MIXED: compare only runs of one precision)"
        in (tmp_path / "record.md").read_text()
    )
    # the rivals' figure draws the arms the record has (no ntp or sftmix here), on a log scale
    overfit_study.draw_figure(tmp_path / "record", tmp_path / "rivals.png", overfit_study.RIVALS, log_y=True)
    assert (tmp_path / "rivals.png").stat().st_size > 10_000
