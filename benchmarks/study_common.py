"""What the efficacy studies share (`efficacy_study`, `overfit_study`, `noisy_study`): the data sample, the
training flags, running a command, the random split and the paired bootstrap.

Each study is a script of its own (``python benchmarks/<study>.py --help``); this module is not run.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from sftmix.io_utils import atomic_write_jsonl, read_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SEEDS = (1, 2, 3)
"""The training seeds every study runs by default (``--seeds``)."""


def sh(cmd: list[str], log: Path) -> None:
    """Run a sftmix command, appending its output to ``log``; stop the study if it fails."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)} (see {log})")


def sample_rows(source: str, columns: str | None, start: int, stop: int) -> list[dict]:
    """Examples ``start:stop`` of a dataset in a fixed random order (seed 0), as OpenAI messages: a study's
    training set is the first ``n_train``, its held-out set the next ones, so they never overlap."""
    from sftmix.data.dataset import load_sft_dataset
    from sftmix.sftmix_config import DataArguments

    data = load_sft_dataset(DataArguments(dataset_name=source, dataset_columns=columns))
    order = list(range(len(data)))
    random.Random(0).shuffle(order)
    return [{"messages": data[i]["messages"]} for i in order[start:stop]]


def add_training_arguments(
    parser: argparse.ArgumentParser, *, grad_accum: int = 2, lr: float = 2e-5
) -> argparse.ArgumentParser:
    """The options every study's training takes (`training_flags` turns them into ``sftmix`` flags)."""
    parser.add_argument(
        "--root", default="runs/efficacy", help="working files: data, checkpoints, evaluations"
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grad_accum", type=int, default=grad_accum)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--num_checkpoints", type=int, default=3)
    return parser


def training_flags(args: argparse.Namespace) -> list[str]:
    """The ``sftmix`` flags every arm of a study trains with (the paper's optimiser settings, scaled down)."""
    flags = {
        "--model_name_or_path": args.model,
        "--max_length": args.max_length,
        "--per_device_train_batch_size": args.batch,
        "--gradient_accumulation_steps": args.grad_accum,
        "--learning_rate": args.lr,
        "--weight_decay": 0.1,
        "--lr_scheduler_type": "cosine",
        "--warmup_steps": 0.1,
        "--gradient_checkpointing": "false",
        "--logging_steps": 5,
        "--report_to": "tensorboard",
    }
    return [str(x) for pair in flags.items() for x in pair]


def random_split(dynamics: Path, out: Path, seed: int) -> Path:
    """The same dynamics file with the split drawn at random (same sizes): the random-split ablation."""
    rows = read_jsonl(dynamics)
    labels = [r["split"] for r in rows]
    random.Random(seed).shuffle(labels)
    atomic_write_jsonl(out, ({**r, "split": s} for r, s in zip(rows, labels, strict=True)))
    return out


Fields = Mapping[str, np.ndarray]
"""Per-item fields of one arm: ``{field: [seeds, items, ...]}``, the same items and seeds in both arms."""


def paired_bootstrap(
    a: Fields, b: Fields, stat: Callable[[Fields], np.ndarray], resamples: int = 10_000, chunk: int = 1000
) -> tuple[float, float, float, list[float]]:
    """Arm ``a`` minus arm ``b`` of ``stat`` on seed-averaged items, a 95% interval, and the per-seed differences.

    ``stat`` reduces the items axis of ``{field: [..., items, ...]}``, so one call evaluates a whole block of
    resamples. Each resample draws the training seeds and then the items with replacement, the same draw for
    both arms, so the interval holds the training-seed noise and the size of the evaluation set (with one seed,
    only the latter). The draws come ``chunk`` resamples at a time from a generator seeded 0: each study keeps
    the chunk its committed reports were made with, so they stay reproducible.

    >>> a = {"x": np.array([[1.0, 2.0, 3.0]])}
    >>> b = {"x": np.array([[0.0, 1.0, 2.0]])}
    >>> paired_bootstrap(a, b, lambda f: f["x"].mean(-1), resamples=100)
    (1.0, 1.0, 1.0, [1.0])
    """
    seeds, items = next(iter(a.values())).shape[:2]
    diff = float(stat({f: v.mean(0) for f, v in a.items()}) - stat({f: v.mean(0) for f, v in b.items()}))
    per_seed = [
        float(stat({f: v[i] for f, v in a.items()}) - stat({f: v[i] for f, v in b.items()}))
        for i in range(seeds)
    ]
    rng = np.random.default_rng(0)
    boot = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        seed_idx = rng.integers(0, seeds, (size, seeds))
        item_idx = rng.integers(0, items, (size, items))
        boot.append(
            stat({f: _draw(v, seed_idx, item_idx) for f, v in a.items()})
            - stat({f: _draw(v, seed_idx, item_idx) for f, v in b.items()})
        )
    low, high = np.percentile(np.concatenate(boot), [2.5, 97.5])
    return diff, float(low), float(high), per_seed


def _draw(values: np.ndarray, seed_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
    """Resamples of ``values`` [seeds, items, ...]: average the drawn seeds, then pick the drawn items."""
    averaged = values[seed_idx].mean(1)  # [resamples, items, ...]
    index = item_idx.reshape(item_idx.shape + (1,) * (averaged.ndim - 2))
    return np.take_along_axis(averaged, index, axis=1)
