"""The CPU-scale efficacy study: NTP vs SFTMix with the same data, steps and seeds, the paper's protocol scaled down.

Studies (each in ``--root/<study>``):

- ``alpaca``: a random subset of Alpaca-52K (``../shared/data/alpaca_52k_en_zh_parts``, English fields),
  evaluated with IFEval (``--limit ifeval=N`` prompts) and held-out response perplexity;
- ``medical``: MedAlpaca WikiDoc patient information, evaluated on MedMCQA, PubMedQA and MMLU-medical.

Every step runs the real ``sftmix`` CLI and is resumable: re-running the same command skips finished runs and
evaluations and resumes unfinished ones from their last checkpoint. Stage 1 (the reference run and the
confidence split) is computed once per study and shared by every seed, as the paper computes the split once.
Arms: ``ntp`` (``mixup_weight=0``), ``sftmix`` (0.2); ablations: ``equal`` (1.0, Mixup as an equal loss),
``random`` (0.2 with a random split of the same sizes).

    python benchmarks/efficacy_study.py --study alpaca --seeds 1 2 3
    python benchmarks/efficacy_study.py --study alpaca --report   # tables from what has finished

``--study overfit`` runs `overfit_study` (256 examples x 8 epochs, evaluated after epochs 1, 2, 4, 8 in domain and
out of domain, against NEFTune and label smoothing), which also runs on its own. What the studies share (sampling,
training flags, the paired bootstrap) is `study_common`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import overfit_study
from study_common import (
    SHARED,
    add_training_arguments,
    paired_bootstrap,
    random_split,
    sample_rows,
    sh,
    training_flags,
)

from sftmix.io_utils import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from sftmix.stage1.splits import split_agreement

# Arm -> mixup_weight. ``base`` is the untrained model (evaluated once, as seed 0); ``weak`` is SFTMix with the
# split measured by ``--weak_reference`` (a smaller model with the same tokenizer): the weak-to-strong ablation.
ARMS = {"base": None, "ntp": 0.0, "sftmix": 0.2, "equal": 1.0, "random": 0.2, "weak": 0.2}

STUDIES = {
    "alpaca": {
        "source": str(SHARED / "alpaca_52k_en_zh_parts"),
        "columns": "instruction=en_instruction,input=en_input,output=en_output",
        "evals": [
            ("perplexity", "heldout", []),
            ("ifeval", str(SHARED / "ifeval" / "ifeval.jsonl"), ["--batch_size", "40"]),
        ],
    },
    "medical": {
        "source": str(SHARED / "medalpaca_wikidoc_patient_info" / "medical_meadow_small.json"),
        "columns": None,
        "evals": [
            ("perplexity", "heldout", []),
            # Cloze scoring (the option texts): with letter scoring SmolLM2-135M answers "A" to every question.
            ("medmcqa", str(SHARED / "medmcqa_dev" / "validation.jsonl"), []),
            ("pubmedqa", str(SHARED / "pubmedqa"), []),
            ("mmlu_medical", str(SHARED / "mmlu_medical"), []),
        ],
    },
}


# Items per evaluation task (per subject for MMLU); ``--limit task=N`` overrides, ``task=0`` means all.
DEFAULT_LIMITS = {"ifeval": 100, "medmcqa": 500, "pubmedqa": 200, "mmlu_medical": 20}


def _task_limit(text: str) -> tuple[str, int]:
    """``"medmcqa=100"`` -> ``("medmcqa", 100)`` (an argparse type)."""
    task, _, n = text.partition("=")
    tasks = {task for study in STUDIES.values() for task, _, _ in study["evals"]}
    if task not in tasks or not n.isdigit():
        raise argparse.ArgumentTypeError(f"expected TASK=N with TASK in {sorted(tasks)}, got {text!r}")
    return task, int(n)


def sample_study_rows(name: str, start: int, stop: int) -> list[dict]:
    """Examples ``start:stop`` of the study's source in a fixed random order (seed 0), as OpenAI messages.

    The training set is ``0:n_train``, the held-out set the ``n_heldout`` after it; anything beyond is unused
    by the study (the weak reference heals on it).
    """
    study = STUDIES[name]
    return sample_rows(study["source"], study["columns"], start, stop)


def make_splits(name: str, root: Path, n_train: int, n_heldout: int) -> tuple[Path, Path]:
    """Sample the train and held-out subsets into ``root`` as OpenAI-messages JSON lines."""
    train, heldout = root / "train.jsonl", root / "heldout.jsonl"
    if train.exists() and heldout.exists():
        return train, heldout
    rows = sample_study_rows(name, 0, n_train + n_heldout)
    atomic_write_jsonl(heldout, rows[n_train:])
    atomic_write_jsonl(train, rows[:n_train])
    return train, heldout


def run_study(args: argparse.Namespace) -> None:
    study = STUDIES[args.study]
    root = Path(args.root) / args.study
    root.mkdir(parents=True, exist_ok=True)
    log = root / "study.log"
    train, heldout = make_splits(args.study, root, args.n_train, args.n_heldout)
    common = [
        *training_flags(args),
        *("--dataset_name", str(train)),
        *("--save_strategy", "steps", "--save_steps", "20", "--save_total_limit", "2"),
    ]

    def dynamics(out: Path, reference: list[str]) -> Path:
        """Stage 1 once per study (and reference): the split every seed shares, as in the paper."""
        if not (out / "dynamics.jsonl").exists():
            cmd = ["sftmix", "dynamics", *common, *reference, "--output_dir", str(out), "--seed", "0"]
            sh([*cmd, "--num_checkpoints", str(args.num_checkpoints)], log)
        return out / "dynamics.jsonl"

    if {"sftmix", "equal", "random"} & set(args.arms):
        split = dynamics(root / "dynamics", [])
    if "weak" in args.arms:
        weak_split = dynamics(root / "dynamics-weak", ["--reference_model_name_or_path", args.weak_reference])
    limits = {**DEFAULT_LIMITS, **dict(args.limit)}
    for seed in args.seeds:
        for arm in args.arms:
            run = root / f"{arm}-s{0 if arm == 'base' else seed}"
            model = args.model if arm == "base" else str(run / "final")
            if arm != "base" and not (run / "final" / "config.json").exists():
                extra = ["--mixup_weight", str(ARMS[arm])]
                if arm in ("sftmix", "equal"):
                    extra += ["--dynamics_path", str(split)]
                elif arm == "random":
                    extra += [
                        "--dynamics_path",
                        str(random_split(split, root / f"random_split-s{seed}.jsonl", seed)),
                    ]
                elif arm == "weak":
                    extra += ["--dynamics_path", str(weak_split)]
                cmd = ["sftmix", "train", *common, *extra, "--num_train_epochs", str(args.epochs)]
                sh([*cmd, "--seed", str(seed), "--output_dir", str(run)], log)
            for task, data, options in study["evals"]:
                if args.evals and task not in args.evals:
                    continue
                out = run / "eval" / task
                data = str(heldout) if data == "heldout" else data
                cmd = ["sftmix", "eval", "--model_name_or_path", model, "--task", task, "--data_path", data]
                cmd += [*options, "--output_dir", str(out)]
                if limits.get(task):
                    cmd += ["--limit", str(limits[task])]
                if task == "ifeval":
                    cmd += ["--max_new_tokens", str(args.max_new_tokens)]
                # An evaluation is reused only if it ran with these options (other limits or options: re-run).
                marker = out / "study_command.json"
                if (out / "eval.json").exists() and (
                    not marker.exists() or json.loads(marker.read_text()) == cmd
                ):
                    continue
                sh(cmd, log)
                atomic_write_json(marker, cmd)
    report(root)


def _runs(root: Path) -> list[tuple[str, int, Path]]:
    """``(arm, seed, run dir)`` of every ``<arm>-s<seed>`` directory of a study."""
    runs = []
    for run in sorted(root.glob("*-s*")):
        if run.is_dir():
            arm, seed = run.name.rsplit("-s", 1)
            runs.append((arm, int(seed), run))
    return runs


def report(root: Path) -> None:
    """Mean, std and every per-seed figure of each metric, per arm, from the finished evaluations."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for arm, seed, run in _runs(root):
        for result in run.glob("eval/*/eval.json"):
            for task, metrics in json.loads(result.read_text()).items():
                for metric, value in metrics.items():
                    if isinstance(value, int | float) and metric not in (
                        "n",
                        "tokens",
                    ):  # counts, not results
                        table.setdefault(f"{task}/{metric}", {}).setdefault(arm, {})[seed] = value
    arms = sorted(
        {arm for by_arm in table.values() for arm in by_arm}, key=lambda a: (list(ARMS).index(a), a)
    )
    lines = [
        f"Efficacy study `{root.name}` ({time.strftime('%Y-%m-%d')}): mean ± std over seeds (per seed)",
        "",
        "| metric | " + " | ".join(arms) + " |",
        "| --- |" + " --- |" * len(arms),
    ]
    for metric in sorted(table):
        if "/acc." in metric or "/top_prediction_share" in metric or metric.endswith("/nll_per_token"):
            continue  # per-subject accuracies and diagnostics stay in results.json
        cells = []
        for arm in arms:
            by_seed = table[metric].get(arm, {})
            values = [by_seed[s] for s in sorted(by_seed)]
            if not values:
                cells.append("")
            elif len(values) == 1:
                cells.append(f"{values[0]:.4f} (s{next(iter(by_seed))})")
            else:
                seeds = ", ".join(f"s{s}: {by_seed[s]:.4f}" for s in sorted(by_seed))
                cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} ({seeds})")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += ["", *paired_comparison(root), *weak_split_agreement(root)]
    text = "\n".join(lines) + "\n"
    atomic_write_text(root / "results.md", text)
    atomic_write_json(root / "results.json", table)
    print(text)


def weak_split_agreement(root: Path) -> list[str]:
    """How far the weak reference's split agrees with the target's own (the weak-to-strong premise)."""
    own, weak = root / "dynamics" / "dynamics.jsonl", root / "dynamics-weak" / "dynamics.jsonl"
    if not (own.exists() and weak.exists()):
        return []
    agree = split_agreement(*({r["id"]: r["confidence"] for r in read_jsonl(path)} for path in (own, weak)))
    return [
        "",
        f"Weak reference vs the target's own stage 1, {agree['n']} examples: {agree['same_half']:.1%} in the same "
        f"half (50% expected by chance), Spearman's rho of confidence {agree['spearman']:.3f}.",
    ]


# Per-item statistics of the paired comparison: task -> {metric: (per-item fields, statistic)}. Each statistic
# reduces the last axis, so one call evaluates a whole block of bootstrap resamples.
PAIRED_METRICS = {
    "perplexity": {
        "perplexity": (("nll", "tokens"), lambda f: np.exp(f["nll"].sum(-1) / f["tokens"].sum(-1))),
        "mean_example_perplexity": (("perplexity",), lambda f: f["perplexity"].mean(-1)),
    },
    "ifeval": {
        name: ((name,), lambda f, name=name: f[name].mean(-1))
        for name in ("prompt_level_strict_acc", "prompt_level_loose_acc")
    },
    **{
        task: {
            "acc": (("correct",), lambda f: f["correct"].mean(-1)),
            "acc_norm": (("correct_norm",), lambda f: f["correct_norm"].mean(-1)),
        }
        for task in ("medmcqa", "pubmedqa", "mmlu_medical", "medqa")
    },
}


def _item_fields(run: Path, task: str) -> dict[str, dict[str, float]] | None:
    """``{item id: {field: value}}`` from a run's ``predictions.jsonl`` for ``task``, or None if not evaluated."""
    path = run / "eval" / task / "predictions.jsonl"
    if not path.exists():
        return None
    items = {}
    for row in read_jsonl(path):
        key = str(row.get("id", row.get("key")))
        items[key] = {k: float(v) for k, v in row.items() if isinstance(v, bool | int | float)}
    return items


def paired_comparison(root: Path, baseline: str = "ntp", resamples: int = 10_000) -> list[str]:
    """Each trained arm minus ``baseline`` on the same items and seeds, with a paired bootstrap 95% interval.

    The difference is the statistic of the seed-averaged per-item scores (perplexity: of the seed-averaged
    NLL). Each resample draws the training seeds and then the items with replacement, the same draw for both
    arms, so the interval holds both the training-seed noise and the size of the evaluation set; with one
    seed it holds only the latter. The per-seed differences are listed beside it.
    """
    runs: dict[str, dict[int, Path]] = {}
    for arm, seed, run in _runs(root):
        runs.setdefault(arm, {})[seed] = run
    lines = [
        f"Each arm minus `{baseline}` (perplexity: lower is better; accuracy: higher is better), on the items and "
        f"seeds both have; 95% paired bootstrap interval over seeds and items ({resamples} resamples):",
        "",
        f"| metric | arm − {baseline} | seeds | items | difference | 95% interval | per-seed differences |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    arms = sorted(set(runs) - {baseline, "base"}, key=lambda a: (list(ARMS).index(a), a))
    for task, metrics in PAIRED_METRICS.items():
        for arm in arms:
            seeds, arm_items, base_items = [], [], []
            for seed in sorted(set(runs[arm]) & set(runs.get(baseline, {}))):
                pair = _item_fields(runs[arm][seed], task), _item_fields(runs[baseline][seed], task)
                if None not in pair:
                    seeds.append(seed)
                    arm_items.append(pair[0])
                    base_items.append(pair[1])
            if not seeds:
                continue
            keys = sorted(set.intersection(*(set(items) for items in arm_items + base_items)))
            if not keys:
                lines.append(f"| {task} | {arm} | {seeds} | 0 | no common items | | |")
                continue
            for metric, (fields, stat) in metrics.items():
                if any(f not in items[keys[0]] for items in arm_items + base_items for f in fields):
                    continue
                # [seeds, items] per field
                a = {f: np.array([[items[k][f] for k in keys] for items in arm_items]) for f in fields}
                b = {f: np.array([[items[k][f] for k in keys] for items in base_items]) for f in fields}
                diff, low, high, per_seed_diffs = paired_bootstrap(a, b, stat, resamples, chunk=1000)
                per_seed = ", ".join(f"s{s}: {d:+.4f}" for s, d in zip(seeds, per_seed_diffs, strict=True))
                lines.append(
                    f"| {task}/{metric} | {arm} | {','.join(map(str, seeds))} | {len(keys)} | {diff:+.4f} "
                    f"| [{low:+.4f}, {high:+.4f}] | {per_seed} |"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", choices=[*sorted(STUDIES), "overfit"], default="alpaca")
    add_training_arguments(parser)
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=sorted({*ARMS, *overfit_study.ARMS}),
        default=None,
        help="default: ntp sftmix",
    )
    parser.add_argument("--n_train", type=int, default=1024)
    parser.add_argument("--n_heldout", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument(
        "--limit",
        nargs="+",
        type=_task_limit,
        default=[],
        metavar="TASK=N",
        help=f"items per task, 0 for all (default {DEFAULT_LIMITS})",
    )
    parser.add_argument(
        "--weak_reference",
        default=None,
        help="reference model of the weak arm (a smaller model, same tokenizer)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--evals", nargs="+", default=None, help="only these evaluation tasks (default: all)")
    parser.add_argument(
        "--report",
        action="store_true",
        help="only print the tables of what has finished (overfit: after recording --root's finished evaluations)",
    )
    parser.add_argument("--figure", default=None, help="overfit: also draw the per-epoch figure to this file")
    parser.add_argument(
        "--record",
        default=str(overfit_study.RECORD),
        help="overfit: where every finished evaluation is kept and the report is written (<record>.md / .json)",
    )
    args = parser.parse_args()
    if args.study == "overfit":  # the same as `python benchmarks/overfit_study.py` with these options
        args.arms = args.arms or list(overfit_study.ARMS)
        overfit_study.run(args)
        return
    args.arms = args.arms or ["ntp", "sftmix"]
    if "weak" in args.arms and not args.weak_reference and not args.report:
        parser.error("the weak arm needs --weak_reference (a smaller model with the same tokenizer)")
    if args.report:
        report(Path(args.root) / args.study)
    else:
        run_study(args)


if __name__ == "__main__":
    main()
