"""The CPU-scale efficacy study: NTP vs SFTMix with the same data, steps and seeds, the paper's protocol scaled down.

Studies (each in ``--root/<study>``):

- ``alpaca``: a random subset of Alpaca-52K (``../shared/data/alpaca_52k_en_zh_parts``, English fields),
  evaluated with IFEval (``--ifeval_limit`` prompts) and held-out response perplexity;
- ``medical``: MedAlpaca WikiDoc patient information, evaluated on MedMCQA, PubMedQA and MMLU-medical.

Every step runs the real ``sftmix`` CLI and is resumable: re-running the same command skips finished runs and
evaluations and resumes unfinished ones from their last checkpoint. Stage 1 (the reference run and the
confidence split) is computed once per study and shared by every seed, as the paper computes the split once.
Arms: ``ntp`` (``mixup_weight=0``), ``sftmix`` (0.2); ablations: ``equal`` (1.0, Mixup as an equal loss),
``random`` (0.2 with a random split of the same sizes).

    python benchmarks/efficacy_study.py --study alpaca --seeds 1 2 3
    python benchmarks/efficacy_study.py --study alpaca --report   # tables from what has finished
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ARMS = {"ntp": 0.0, "sftmix": 0.2, "equal": 1.0, "random": 0.2}

STUDIES = {
    "alpaca": {
        "source": str(SHARED / "alpaca_52k_en_zh_parts"),
        "columns": "instruction=en_instruction,input=en_input,output=en_output",
        "evals": [("perplexity", "heldout"), ("ifeval", str(SHARED / "ifeval" / "ifeval.jsonl"))],
    },
    "medical": {
        "source": str(SHARED / "medalpaca_wikidoc_patient_info" / "medical_meadow_small.json"),
        "columns": None,
        "evals": [
            ("perplexity", "heldout"),
            ("medmcqa", str(SHARED / "medmcqa_dev" / "validation.jsonl")),
            ("pubmedqa", str(SHARED / "pubmedqa")),
            ("mmlu_medical", str(SHARED / "mmlu_medical")),
        ],
    },
}


def sh(cmd: list[str], log: Path) -> None:
    """Run a sftmix command, appending its output to ``log``; stop the study if it fails."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)} (see {log})")


def make_splits(study: dict, root: Path, n_train: int, n_heldout: int) -> tuple[Path, Path]:
    """Sample the train and held-out subsets (seed 0) into ``root`` as OpenAI-messages JSON lines."""
    from sftmix.data import load_sft_dataset
    from sftmix.io_utils import atomic_write_jsonl
    from sftmix.sftmix_config import DataArguments

    train, heldout = root / "train.jsonl", root / "heldout.jsonl"
    if train.exists() and heldout.exists():
        return train, heldout
    data = load_sft_dataset(DataArguments(dataset_name=study["source"], dataset_columns=study["columns"]))
    order = list(range(len(data)))
    random.Random(0).shuffle(order)
    rows = [{"messages": data[i]["messages"]} for i in order[: n_train + n_heldout]]
    atomic_write_jsonl(heldout, rows[n_train:])
    atomic_write_jsonl(train, rows[:n_train])
    return train, heldout


def random_split(dynamics: Path, out: Path, seed: int) -> Path:
    """The same dynamics file with the split drawn at random (same sizes): the random-split ablation."""
    rows = [json.loads(line) for line in dynamics.read_text().splitlines() if line.strip()]
    labels = [r["split"] for r in rows]
    random.Random(seed).shuffle(labels)
    out.write_text(
        "".join(
            json.dumps({**r, "split": s}, sort_keys=True) + "\n" for r, s in zip(rows, labels, strict=True)
        )
    )
    return out


def run_study(args: argparse.Namespace) -> None:
    study = STUDIES[args.study]
    root = Path(args.root) / args.study
    root.mkdir(parents=True, exist_ok=True)
    log = root / "study.log"
    train, heldout = make_splits(study, root, args.n_train, args.n_heldout)
    common = [
        "--model_name_or_path",
        args.model,
        "--dataset_name",
        str(train),
        "--max_length",
        str(args.max_length),
        "--per_device_train_batch_size",
        str(args.batch),
        "--gradient_accumulation_steps",
        str(args.grad_accum),
        "--learning_rate",
        str(args.lr),
        "--weight_decay",
        "0.1",
        "--lr_scheduler_type",
        "cosine",
        "--warmup_steps",
        "0.1",
        "--gradient_checkpointing",
        "false",
        "--logging_steps",
        "5",
        "--save_strategy",
        "steps",
        "--save_steps",
        "20",
        "--save_total_limit",
        "2",
        "--report_to",
        "tensorboard",
    ]
    dynamics_dir = root / "dynamics"
    if not (dynamics_dir / "dynamics.jsonl").exists():
        sh(
            [
                "sftmix",
                "dynamics",
                *common,
                "--output_dir",
                str(dynamics_dir),
                "--seed",
                "0",
                "--num_checkpoints",
                str(args.num_checkpoints),
            ],
            log,
        )
    for seed in args.seeds:
        for arm in args.arms:
            run = root / f"{arm}-s{seed}"
            if (
                not (run / "final" / "config.json").exists()
                and not (run / "final" / "adapter_config.json").exists()
            ):
                extra = ["--mixup_weight", str(ARMS[arm])]
                if ARMS[arm] > 0:
                    path = dynamics_dir / "dynamics.jsonl"
                    if arm == "random":
                        path = random_split(path, root / f"random_split-s{seed}.jsonl", seed)
                    extra += ["--dynamics_path", str(path)]
                sh(
                    [
                        "sftmix",
                        "train",
                        *common,
                        *extra,
                        "--num_train_epochs",
                        str(args.epochs),
                        "--seed",
                        str(seed),
                        "--output_dir",
                        str(run),
                    ],
                    log,
                )
            for task, data in study["evals"]:
                if args.evals and task not in args.evals:
                    continue
                out = run / "eval" / task
                if (out / "eval.json").exists():
                    continue
                data = str(heldout) if data == "heldout" else data
                limit = {"ifeval": args.ifeval_limit}.get(
                    task, args.mc_limit if task != "perplexity" else None
                )
                cmd = [
                    "sftmix",
                    "eval",
                    "--model_name_or_path",
                    str(run / "final"),
                    "--task",
                    task,
                    "--data_path",
                    data,
                    "--output_dir",
                    str(out),
                ]
                if limit:
                    cmd += ["--limit", str(limit)]
                if task == "ifeval":
                    cmd += ["--max_new_tokens", str(args.max_new_tokens)]
                sh(cmd, log)
    report(root)


def report(root: Path) -> None:
    """Mean, std and every per-seed figure of each metric, per arm, from the finished evaluations."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for run in sorted(root.glob("*-s*")):
        if not run.is_dir():
            continue
        arm, seed = run.name.rsplit("-s", 1)
        for result in run.glob("eval/*/eval.json"):
            for task, metrics in json.loads(result.read_text()).items():
                for metric, value in metrics.items():
                    if isinstance(value, int | float) and metric not in (
                        "n",
                        "tokens",
                    ):  # counts, not results
                        table.setdefault(f"{task}/{metric}", {}).setdefault(arm, {})[int(seed)] = value
    lines = [
        f"Efficacy study `{root.name}` ({time.strftime('%Y-%m-%d')}): mean ± std over seeds [per-seed]",
        "",
        "| metric | arm | mean | std | per seed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for metric in sorted(table):
        for arm, by_seed in sorted(table[metric].items()):
            values = [by_seed[s] for s in sorted(by_seed)]
            std = statistics.stdev(values) if len(values) > 1 else float("nan")
            seeds = ", ".join(f"s{s}: {by_seed[s]:.4f}" for s in sorted(by_seed))
            lines.append(f"| {metric} | {arm} | {statistics.mean(values):.4f} | {std:.4f} | {seeds} |")
    text = "\n".join(lines) + "\n"
    (root / "results.md").write_text(text)
    (root / "results.json").write_text(json.dumps(table, indent=2, sort_keys=True))
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", choices=sorted(STUDIES), default="alpaca")
    parser.add_argument("--root", default="runs/efficacy")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=["ntp", "sftmix"])
    parser.add_argument("--n_train", type=int, default=1024)
    parser.add_argument("--n_heldout", type=int, default=200)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--num_checkpoints", type=int, default=3)
    parser.add_argument("--ifeval_limit", type=int, default=100)
    parser.add_argument("--mc_limit", type=int, default=500)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--evals", nargs="+", default=None, help="only these evaluation tasks (default: all)")
    parser.add_argument("--report", action="store_true", help="only print the tables of what has finished")
    args = parser.parse_args()
    if args.report:
        report(Path(args.root) / args.study)
    else:
        run_study(args)


if __name__ == "__main__":
    main()
