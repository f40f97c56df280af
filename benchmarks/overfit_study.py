"""The overfitting study: many epochs on little data, where a regulariser should matter.

    python benchmarks/overfit_study.py --root runs/efficacy --figure docs/efficacy_overfit.png   # + _rivals.png
    python benchmarks/overfit_study.py --arms neftune --seeds 2   # one arm-seed at a time
    python benchmarks/overfit_study.py --report                   # the report, from the record alone

(``efficacy_study.py --study overfit`` runs the same.)

256 Alpaca examples (``alpaca_52k_en_zh_parts``, English fields, outside both held-out sets), 8 epochs, the
first study's optimiser settings otherwise. After epochs 1, 2, 4 and 8 every run is evaluated with
``sftmix eval --task perplexity`` (one pass: response perplexity and calibration) on

- ``indomain``: 300 held-out Alpaca examples (the next 300 of the same shuffled order);
- ``ood``: 200 GPTeacher Roleplay-Instruct examples (``../shared/data/gpteacher``), a set training never sees.

Arms (same data, steps and seeds): ``ntp``; ``sftmix`` (mixup_weight 0.2, the paper's stage 1 split);
``random`` (0.2, the split's labels shuffled per seed); ``neftune`` (TRL's ``neftune_noise_alpha=5``,
mixup_weight 0); ``label_smoothing`` (0.1, mixup_weight 0); ``dft`` (TRL's ``loss_type="dft"``); ``bema`` (TRL's
``BEMACallback``, its weights evaluated, updated every step); ``cheap`` (SFTMix with the cheapest stage-1
scorer that agrees with the paper's split: ``confidence_scorer=online``, measured during the run's own first
epoch at no extra cost, Mixup from epoch 2; its split's agreement with the paper's is in the report).

Two places: ``--root`` holds the working files (data, checkpoints, eval dirs), the *record*
(``benchmarks/results/efficacy_overfit/``, committed) keeps every finished (arm, seed, epoch, set) evaluation as
one small ``.npz``: its metrics and the per-item fields the paired bootstrap resamples, written atomically as
soon as the evaluation exists. The report is made from the record alone, and a rerun, on this machine or a
fresh one, skips what the record has: training resumes from its last checkpoint, finished evaluations are
kept. A run's epoch checkpoints are deleted once its evaluations are recorded (the final model stays).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from study_common import (
    SEEDS,
    SHARED,
    add_training_arguments,
    random_split,
    sample_rows,
    sh,
    training_flags,
)
from study_common import paired_bootstrap as _paired_bootstrap

from sftmix.evaluation.calibration import ece_from_bins
from sftmix.io_utils import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    read_jsonl,
)
from sftmix.stage1.splits import split_agreement

RECORD = Path(__file__).resolve().parent / "results" / "efficacy_overfit"
ALPACA = (
    str(SHARED / "alpaca_52k_en_zh_parts"),
    "instruction=en_instruction,input=en_input,output=en_output",
)
OOD = (
    str(SHARED / "gpteacher" / "Roleplay" / "roleplay-simple-deduped-roleplay-instruct.json"),
    "instruction=instruction,input=input,output=response",
)
N_TRAIN, N_INDOMAIN, N_OOD = 256, 300, 200
EPOCHS, EVAL_EPOCHS = 8, (1, 2, 4, 8)
# Arm -> extra `sftmix train` flags; "split"/"random" arms get their dynamics file added.
ARMS = {
    "ntp": ["--mixup_weight", "0"],
    "sftmix": ["--mixup_weight", "0.2"],
    "random": ["--mixup_weight", "0.2"],
    "neftune": ["--mixup_weight", "0", "--neftune_noise_alpha", "5"],
    "label_smoothing": ["--mixup_weight", "0", "--label_smoothing_factor", "0.1"],
    "cheap": ["--mixup_weight", "0.2", "--confidence_scorer", "online"],
    # TRL's own rivals: DFT's loss, and BEMA's weights (evaluated instead of the trained ones). BEMA updates
    # every step: with TRL's update_freq=400 a 128-step run never updates them (tests/test_bema.py).
    "dft": ["--mixup_weight", "0", "--loss_type", "dft"],
    "bema": ["--mixup_weight", "0", "--bema", "true", "--bema_update_freq", "1"],
}
ORDER = (("ntp", "sftmix"), ("random", "neftune", "label_smoothing"), ("cheap",), ("dft", "bema"))
EVALUATED_WEIGHTS = {"bema": "bema"}
"""Arm -> the subdirectory of each saved model that is evaluated (BEMA's weights, `sftmix.bema`)."""
EVAL_SETS = ("indomain", "ood")
METRICS = ("perplexity", "ece", "mean_confidence", "accuracy", "brier", "confidence_std")


def make_sets(root: Path) -> dict[str, Path]:
    paths = {"train": root / "train.jsonl", "indomain": root / "heldout.jsonl", "ood": root / "ood.jsonl"}
    if all(p.exists() for p in paths.values()):
        return paths
    rows = sample_rows(*ALPACA, 0, N_TRAIN + N_INDOMAIN)
    atomic_write_jsonl(paths["ood"], sample_rows(*OOD, 0, N_OOD))
    atomic_write_jsonl(paths["indomain"], rows[N_TRAIN:])
    atomic_write_jsonl(paths["train"], rows[:N_TRAIN])
    return paths


def _epoch_checkpoints(run: Path) -> dict[int, Path]:
    """Epoch -> the model after it: ``checkpoint-*`` saved at epoch ends, and ``final`` for the last."""
    found = {}
    for checkpoint in run.glob("checkpoint-*"):
        state = checkpoint / "trainer_state.json"
        if state.exists():
            found[round(json.loads(state.read_text())["epoch"])] = checkpoint
    if (run / "final" / "config.json").exists():
        found[EPOCHS] = run / "final"
    return found


def run_overfit(args: argparse.Namespace) -> None:
    """Train and evaluate every arm-seed of ``args`` the record does not hold yet, reporting as results come."""
    root, record = Path(args.root) / "overfit", Path(args.record)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "study.log"
    sync_record(root, record)
    sets = make_sets(root)
    common = [*training_flags(args), "--dataset_name", str(sets["train"])]
    arms = [arm for group in ORDER for arm in group if arm in args.arms]
    done = load_record(record)
    todo = [f"{a}-s{seed}" for a in arms for seed in args.seeds if not all_evaluated(done, f"{a}-s{seed}")]
    # The paper's split, one for every seed and machine: the recorded one (a split file too), else stage 1 here.
    split = record / "dynamics.jsonl"
    if not split.exists() and any(run.rsplit("-s", 1)[0] in ("sftmix", "random") for run in todo):
        if not (root / "dynamics" / "dynamics.jsonl").exists():
            cmd = ["sftmix", "dynamics", *common, "--output_dir", str(root / "dynamics"), "--seed", "0"]
            sh([*cmd, "--num_checkpoints", str(args.num_checkpoints)], log)
        sync_record(root, record)
    for group in ORDER:
        for seed in args.seeds:
            for arm in (a for a in group if a in arms):
                run = root / f"{arm}-s{seed}"
                if run.name in todo:
                    # Trained here: every epoch is evaluated from this training, replacing what the record holds
                    # of the run (an earlier machine's training, maybe without per-item fields).
                    trained_here = not (run / "final" / "config.json").exists()
                    if trained_here:
                        extra = list(ARMS[arm])
                        if arm == "sftmix":
                            extra += ["--dynamics_path", str(split)]
                        elif arm == "random":
                            extra += [
                                "--dynamics_path",
                                str(random_split(split, root / f"random_split-s{seed}.jsonl", seed)),
                            ]
                        cmd = ["sftmix", "train", *common, *extra, "--num_train_epochs", str(EPOCHS)]
                        sh(
                            [*cmd, "--save_strategy", "epoch", "--seed", str(seed), "--output_dir", str(run)],
                            log,
                        )
                    evaluate_run(run, record, sets, sh, log, replace=trained_here)
                    report_overfit(record, args.seeds)
                for checkpoint in run.glob("checkpoint-*"):  # recorded: the final model is enough
                    shutil.rmtree(checkpoint)
    report_overfit(record, args.seeds)


def evaluate_run(
    run: Path, record: Path, sets: dict[str, Path], sh, log: Path, replace: bool = False
) -> None:
    """Evaluate each epoch's model on each held-out set, recording each result as soon as it exists; with
    ``replace``, also the evaluations the record already holds (they came from another training of the run).
    ``sh`` runs the commands (`study_common.sh`; the noisy study passes its own)."""
    models, done = _epoch_checkpoints(run), {} if replace else load_record(record)
    weights = EVALUATED_WEIGHTS.get(run.name.rsplit("-s", 1)[0], "")
    for epoch in EVAL_EPOCHS:
        for name in EVAL_SETS:
            if _has_items(done, run.name, epoch, name):
                continue
            out = run / "eval" / f"e{epoch}" / name
            if not (out / "eval.json").exists():
                if epoch not in models:
                    raise SystemExit(
                        f"{run}: no checkpoint of epoch {epoch} to evaluate (found {sorted(models)})"
                    )
                model = str(models[epoch] / weights) if weights else str(models[epoch])
                cmd = ["sftmix", "eval", "--model_name_or_path", model, "--task", "perplexity"]
                sh([*cmd, "--data_path", str(sets[name]), "--batch_size", "8", "--output_dir", str(out)], log)
            record_eval(record, run, epoch, name)
    record_precision(run, record)
    sync_record(run.parent, record)  # the run's own split (`cheap`)


def record_precision(run: Path, record: Path) -> None:
    """Keep the precision the run trained in (figures move with it: compare only runs of one precision)."""
    info = run / "final" / "sftmix_train.json"  # `sftmix train` records the precision it trained in
    target = record / run.name / "precision.json"
    if info.exists() and not target.exists():
        atomic_write_json(target, {"precision": json.loads(info.read_text())["precision"]})


def precision_line(record: Path, which: str = "the recorded runs") -> str:
    """The report's line on the precision each run trained in, flagged when the record mixes precisions."""
    precisions = recorded_precisions(record)
    return (
        f"Precision of {which}: "
        + (", ".join(f"{r}: {p}" for r, p in precisions.items()) or "none yet")
        + (" (MIXED: compare only runs of one precision)." if len(set(precisions.values())) > 1 else ".")
    )


def recorded_precisions(record: Path) -> dict[str, str]:
    """``{run: precision}`` of the runs whose precision is recorded."""
    return {
        p.parent.name: json.loads(p.read_text())["precision"]
        for p in sorted(record.glob("*-s*/precision.json"))
    }


# ---- the record: what the report is made from ----------------------------------------------------------------
ITEM_FIELDS = ("nll", "tokens", "count", "confidence", "correct")


def record_eval(record: Path, run: Path, epoch: int, name: str) -> None:
    """Keep one finished evaluation: its metrics and, per item (sorted by id), the fields the bootstrap needs."""
    out = run / "eval" / f"e{epoch}" / name
    metrics = json.loads((out / "eval.json").read_text())["perplexity"]
    rows = sorted(read_jsonl(out / "predictions.jsonl"), key=lambda r: r["id"])
    arrays = {
        "metrics": np.array([metrics[m] for m in METRICS], dtype=np.float64),
        "ids": np.array([r["id"] for r in rows]),
        "nll": np.array([r["nll"] for r in rows], dtype=np.float64),
        "tokens": np.array([r["tokens"] for r in rows], dtype=np.int64),
        # float32 bins (counts exact, confidence sums to 1e-7): ~25 KB an evaluation of 300 items
        **{
            k: np.array([r["bins"][k] for r in rows], dtype=np.float32)
            for k in ("count", "confidence", "correct")
        },
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(record / run.name / f"e{epoch}-{name}.npz", buffer.getvalue())


def sync_record(root: Path, record: Path) -> None:
    """Record what ``root`` has finished and the record lacks: evaluations, the paper's split, each cheap split."""
    if not root.exists():
        return
    for result in root.glob("*-s*/eval/e*/*/eval.json"):
        run, epoch, name = result.parents[3], int(result.parent.parent.name[1:]), result.parent.name
        if name in EVAL_SETS and not (record / run.name / f"e{epoch}-{name}.npz").exists():
            record_eval(record, run, epoch, name)
    for source, target in [
        (root / "dynamics" / "dynamics.jsonl", record / "dynamics.jsonl"),
        *(
            (run / "dynamics" / "dynamics.jsonl", record / run.name / "dynamics.jsonl")
            for run in root.glob("cheap-s*")
        ),
    ]:
        if source.exists() and not target.exists():
            rows = ({k: r[k] for k in ("id", "confidence", "split")} for r in read_jsonl(source))
            atomic_write_jsonl(target, rows)


Loaded = dict[tuple[str, int, str], dict[str, np.ndarray]]


def load_record(record: Path) -> Loaded:
    """Every recorded evaluation, each file read once: ``{(run, epoch, set): arrays}``."""
    loaded = {}
    for path in sorted(record.glob("*-s*/e*-*.npz")):
        epoch, name = path.stem[1:].split("-", 1)
        with np.load(path, allow_pickle=False) as data:
            loaded[(path.parent.name, int(epoch), name)] = {k: data[k] for k in data.files}
    return loaded


def missing_runs(loaded: Loaded, arms: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """The arm-seeds of ``seeds`` whose 4 epochs the record does not all hold with per-item fields."""
    return [f"{a}-s{s}" for a in arms for s in seeds if not all_evaluated(loaded, f"{a}-s{s}")]


def recorded_seeds(loaded: Loaded, seeds: Sequence[int] = ()) -> list[int]:
    """``seeds`` and every seed the record holds, sorted: the seeds a report covers."""
    return sorted({*seeds, *(int(run.rsplit("-s", 1)[1]) for run, _, _ in loaded)})


def all_evaluated(loaded: Loaded, run: str) -> bool:
    """Every epoch and set recorded with its per-item fields (without them a run is redone: no intervals)."""
    return all(_has_items(loaded, run, e, s) for e in EVAL_EPOCHS for s in EVAL_SETS)


def result_table(loaded: Loaded) -> dict[str, dict[str, dict[int, dict[int, float]]]]:
    """``{set/metric: {arm: {epoch: {seed: value}}}}`` from every recorded evaluation."""
    table: dict = {}
    for (run, epoch, name), data in loaded.items():
        arm, seed = run.rsplit("-s", 1)
        for metric, value in zip(METRICS, data["metrics"], strict=True):
            table.setdefault(f"{name}/{metric}", {}).setdefault(arm, {}).setdefault(epoch, {})[int(seed)] = (
                float(value)
            )
    return table


def _has_items(loaded: Loaded, run: str, epoch: int, name: str) -> bool:
    """Whether one evaluation is recorded with its per-item fields (the first training of a run had none)."""
    return "nll" in loaded.get((run, epoch, name), {})


def _items(loaded: Loaded, run: str, epoch: int, name: str) -> dict[str, np.ndarray] | None:
    """Per-item fields of one evaluation, ``{field: [items, k]}``; None if not recorded or recorded without them."""
    if not _has_items(loaded, run, epoch, name):
        return None
    data = loaded[(run, epoch, name)]
    fields = {k: data[k].astype(np.float64) for k in ITEM_FIELDS}
    return {"ids": data["ids"], **{k: v[:, None] if v.ndim == 1 else v for k, v in fields.items()}}


# Statistics of the paired comparison: each reduces the items axis (-2) of [..., items, k] fields.
STATS = {
    "perplexity": lambda f: np.exp(f["nll"].sum(-2)[..., 0] / f["tokens"].sum(-2)[..., 0]),
    "ece": lambda f: ece_from_bins(f["count"].sum(-2), f["confidence"].sum(-2), f["correct"].sum(-2)),
}


def paired_bootstrap(
    a: list[dict], b: list[dict], stat, resamples: int = 10_000
) -> tuple[float, float, float, list[float]]:
    """Arm minus baseline of ``stat`` on seed-averaged items (`study_common.paired_bootstrap`), from one
    `_items` dict per seed of each arm."""
    fields = [k for k in a[0] if k != "ids"]
    stacked = [{f: np.stack([x[f] for x in arm]) for f in fields} for arm in (a, b)]  # [seeds, items, k]
    return _paired_bootstrap(*stacked, stat, resamples, chunk=500)


def _band(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def report_overfit(record: Path, seeds: Sequence[int] = SEEDS) -> None:
    """Tables, comparisons and missing cells, from the record alone, to ``<record>.md`` / ``<record>.json``;
    an arm-seed is missing if ``seeds`` or the record has the seed and the record does not hold all of it."""
    loaded = load_record(record)
    table = result_table(loaded)
    arms = [a for group in ORDER for a in group if any(a in table.get(m, {}) for m in table)]
    lines = [
        f"Efficacy study `overfit` ({time.strftime('%Y-%m-%d')}): {N_TRAIN} Alpaca examples x {EPOCHS} epochs; "
        f"held-out `indomain` ({N_INDOMAIN} Alpaca) and `ood` ({N_OOD} GPTeacher Roleplay). Each cell: mean over "
        "seeds [min, max] (seeds).",
        "",
    ]
    lines += result_tables(table, arms)
    lines += _comparisons(loaded, table, arms)
    lines += _cheap_split_agreement(record)
    without = sorted({run for (run, _, _), data in loaded.items() if "nll" not in data})
    if without:
        lines += [
            "",
            f"Recorded without per-item fields (in the tables, not in the comparisons; a rerun trains them "
            f"again): {', '.join(without)}.",
        ]
    lines += [
        "",
        precision_line(
            record, "the runs that record it (earlier ones trained in bf16 on CPUs with native bf16)"
        ),
    ]
    missing = missing_runs(loaded, ARMS, recorded_seeds(loaded, seeds))
    lines += [
        "",
        f"Missing (arm-seed, not all 4 epochs evaluated with per-item fields): {', '.join(missing) or 'none'}.",
    ]
    text = "\n".join(lines) + "\n"
    atomic_write_text(record.parent / f"{record.name}.md", text)
    atomic_write_json(record.parent / f"{record.name}.json", {"table": table, "missing": missing})
    print(text, flush=True)


def result_tables(table: dict, arms: list[str]) -> list[str]:
    """One markdown table per set/metric: each arm's mean over seeds [min, max] (seeds) at each evaluated epoch."""
    lines = []
    for key in sorted(table):
        lines += [f"### {key}", "", "| arm | " + " | ".join(f"epoch {e}" for e in EVAL_EPOCHS) + " |"]
        lines.append("| --- |" + " --- |" * len(EVAL_EPOCHS))
        for arm in arms:
            by_epoch = table[key].get(arm, {})
            cells = [
                f"{_band(list(by_epoch[e].values()))} (s{','.join(map(str, sorted(by_epoch[e])))})"
                if e in by_epoch
                else ""
                for e in EVAL_EPOCHS
            ]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _cheap_split_agreement(record: Path) -> list[str]:
    """How far each ``cheap`` run's own split (the ``online`` scorer's) agrees with the paper's stage 1."""
    paper = record / "dynamics.jsonl"
    if not paper.exists():
        return []
    want = {r["id"]: r["confidence"] for r in read_jsonl(paper)}
    lines = []
    for seed in recorded_seeds({(p.parent.name, 0, ""): {} for p in record.glob("cheap-s*/dynamics.jsonl")}):
        own = record / f"cheap-s{seed}" / "dynamics.jsonl"
        agree = split_agreement({r["id"]: r["confidence"] for r in read_jsonl(own)}, want)
        lines.append(
            f"- seed {seed}: {agree['same_half']:.1%} of {agree['n']} examples in the paper split's half "
            f"(Spearman's rho of confidence {agree['spearman']:.3f})"
        )
    if lines:
        lines = [
            "",
            "`cheap` (the `online` scorer, made during each run's first epoch) vs the paper's stage 1:",
            *lines,
        ]
    return lines


def _comparisons(loaded: Loaded, table: dict, arms: list[str]) -> list[str]:
    lines = [
        "Each arm minus `ntp` (lower is better for both), at the last epoch and at the arm's own best epoch (lowest "
        "mean in-domain perplexity over the compared seeds; `ntp` at its own best epoch then), on the seeds both "
        "have with per-item fields; 95% paired bootstrap interval over seeds and items (10,000 resamples):",
        "",
        "| set/metric | arm − ntp | epochs (arm / ntp) | seeds | difference | 95% interval | per-seed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += paired_rows(loaded, table, [(arm, "ntp") for arm in arms if arm != "ntp"], label="{arm}")
    # The split ablation asked directly: does the paper's split beat a random one, or the online scorer's?
    pairs = [
        ("sftmix", other)
        for other in ("random", "cheap", "dft", "bema")
        if "sftmix" in arms and other in arms
    ]
    rows = paired_rows(loaded, table, pairs, label="sftmix − {base}")
    if rows:
        lines += [
            "",
            "The split ablation: `sftmix` (the paper's split) minus `random` and minus `cheap` (the `online` "
            "scorer's split); and `sftmix` minus TRL's rivals `dft` and `bema`; same rules:",
            "",
            "| set/metric | comparison | epochs (sftmix / other) | seeds | difference | 95% interval | per-seed |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    return lines


def paired_rows(loaded: Loaded, table: dict, pairs: list[tuple[str, str]], label: str) -> list[str]:
    """One row per set, metric, (arm, base) pair and epoch choice (last, each one's best): arm minus base."""

    def paired(arm: str, base: str, epochs: tuple[int, ...]) -> list[int]:
        """Seeds where the arm and the base both have per-item fields at these epochs, on both sets."""
        return [
            seed
            for seed in recorded_seeds(loaded)
            if all(
                _has_items(loaded, f"{a}-s{seed}", e, name)
                for a in (arm, base)
                for e in epochs
                for name in EVAL_SETS
            )
        ]

    def best(arm: str, seeds: list[int]) -> int:
        by_epoch = table["indomain/perplexity"][arm]
        return min(EVAL_EPOCHS, key=lambda e: statistics.mean(by_epoch[e][s] for s in seeds))

    lines = []
    for name in EVAL_SETS:
        for metric, stat in STATS.items():
            for arm, base in pairs:
                last, whole = paired(arm, base, (EPOCHS,)), paired(arm, base, EVAL_EPOCHS)
                cases = [("last", EPOCHS, EPOCHS, last)]
                if whole:  # a best epoch among some of the epochs would not be the arm's best
                    cases.append(("best", best(arm, whole), best(base, whole), whole))
                for which, ea, eb, seeds in cases:
                    if not seeds:
                        continue
                    a = [_items(loaded, f"{arm}-s{seed}", ea, name) for seed in seeds]
                    b = [_items(loaded, f"{base}-s{seed}", eb, name) for seed in seeds]
                    diff, low, high, per_seed = paired_bootstrap(a, b, stat)
                    shown = ", ".join(f"s{s}: {d:+.4f}" for s, d in zip(seeds, per_seed, strict=True))
                    lines.append(
                        f"| {name}/{metric} | {label.format(arm=arm, base=base)} ({which}) | {ea} / {eb} "
                        f"| {','.join(map(str, seeds))} | {diff:+.4f} | [{low:+.4f}, {high:+.4f}] | {shown} |"
                    )
    return lines


RIVALS = ("ntp", "sftmix", "dft", "bema")
"""The arms of the rivals' figure: TRL's own answers to overfitting next to NTP and SFTMix."""


def draw_figure(
    record: Path,
    output: Path,
    arms: Sequence[str] = tuple(a for a in ARMS if a not in ("dft", "bema")),
    title: str = f"{N_TRAIN} Alpaca examples",
    log_y: bool = False,
) -> None:
    """Mean (band: min-max over seeds) perplexity and ECE per epoch of ``arms`` (the record's others left out:
    DFT's perplexity, 2-3x the others', would flatten them; it has `RIVALS`' figure, on a log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result_table(load_record(record))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for row, name in enumerate(EVAL_SETS):
        for col, metric in enumerate(("perplexity", "ece")):
            ax = axes[row][col]
            lines = table.get(f"{name}/{metric}", {})
            for arm in (a for a in arms if a in lines):
                by_epoch = lines[arm]
                epochs = sorted(by_epoch)
                values = [list(by_epoch[e].values()) for e in epochs]
                mean = [statistics.mean(v) for v in values]
                (line,) = ax.plot(
                    epochs, mean, marker="o", label=f"{arm} (seeds: {max(len(v) for v in values)})"
                )
                ax.fill_between(
                    epochs,
                    [min(v) for v in values],
                    [max(v) for v in values],
                    alpha=0.2,
                    color=line.get_color(),
                )
            ax.set_title(
                f"{'in-domain (Alpaca)' if name == 'indomain' else 'out-of-domain (GPTeacher Roleplay)'}: {metric}"
            )
            ax.set_xscale("log", base=2)
            if log_y:
                ax.set_yscale("log")
            ax.set_xticks(list(EVAL_EPOCHS), [str(e) for e in EVAL_EPOCHS])
            ax.grid(alpha=0.3)
    axes[1][0].set_xlabel("epoch")
    axes[1][1].set_xlabel("epoch")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, {title} x {EPOCHS} epochs (band: min-max over seeds)")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(output)


def run(args: argparse.Namespace) -> None:
    """The study as ``args`` asks: train and evaluate what is missing (or, with ``--report``, only record what
    ``--root`` has finished), report, and draw the figure if asked."""
    if args.report:
        sync_record(Path(args.root) / "overfit", Path(args.record))
        report_overfit(Path(args.record), args.seeds)
    else:
        run_overfit(args)
    if args.figure:
        figure = Path(args.figure)
        draw_figure(Path(args.record), figure)
        rivals = figure.with_name(f"{figure.stem}_rivals{figure.suffix}")
        draw_figure(Path(args.record), rivals, RIVALS, f"{N_TRAIN} Alpaca examples, TRL's rivals", log_y=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_training_arguments(parser)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument(
        "--record",
        default=str(RECORD),
        help="where every finished evaluation is kept and the report is written (<record>.md / .json)",
    )
    parser.add_argument(
        "--report", action="store_true", help="only record what --root has finished and write the report"
    )
    parser.add_argument(
        "--figure",
        default=None,
        help="also draw the per-epoch figure to this file, and TRL's rivals' figure next to it (<name>_rivals.png)",
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
