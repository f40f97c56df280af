"""Cost of stage 1: scoring the C reference checkpoints vs the reference run's NTP epoch on the same data.

Runs `sftmix.dynamics.run_dynamics` for real (default model, a slice of Alpaca) and times its two phases:

- ``train``: the one-epoch NTP reference run (``train_reference``), with the time spent saving the C
  checkpoints reported separately;
- ``score``: loading and scoring all C checkpoints (``_score_all``).

It prints a JSON summary (also written to ``<output_dir>/bench_dynamics.json``) and leaves the data map at
``<output_dir>/datamap.png``. Example (a few minutes on 2 CPU cores)::

    python benchmarks/bench_dynamics.py --num_examples 128 --max_length 256
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from trl import ModelConfig, SFTTrainer

import sftmix.dynamics as dynamics
from sftmix.sftmix_config import DEFAULT_MODEL, DataArguments, DynamicsArguments, SFTMixConfig

DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_en_demo" / "alpaca_en_demo.json"
)


def _timed(fn, bucket: list[float]):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket.append(time.perf_counter() - start)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--num_examples", type=int, default=128)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--num_checkpoints", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8, help="Training batch size.")
    parser.add_argument(
        "--scoring_batch_size", type=int, default=16, help="Scoring batch size (sftmix's default)."
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for training and scoring.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default="/tmp/sftmix_bench_dynamics")
    parser.add_argument("--keep", action="store_true", help="Keep the reference checkpoints.")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    shutil.rmtree(output_dir, ignore_errors=True)

    train_times: list[float] = []
    score_times: list[float] = []
    save_times: list[float] = []
    dynamics.train_reference = _timed(dynamics.train_reference, train_times)
    dynamics._score_all = _timed(dynamics._score_all, score_times)
    SFTTrainer._save_checkpoint = _timed(SFTTrainer._save_checkpoint, save_times)

    training_args = SFTMixConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=2e-5,
        bf16=args.bf16,
        use_cpu=True,
        gradient_checkpointing=False,  # TRL's default recomputes activations: it would flatter the ratio
        report_to="none",
        logging_steps=5,
        seed=0,
    )
    dynamics.run_dynamics(
        ModelConfig(model_name_or_path=args.model),
        DataArguments(dataset_name=args.data, max_examples=args.num_examples),
        DynamicsArguments(num_checkpoints=args.num_checkpoints, scoring_batch_size=args.scoring_batch_size),
        training_args,
    )
    summary = json.loads((output_dir / "dynamics_summary.json").read_text())
    rows = [json.loads(line) for line in (output_dir / "dynamics.jsonl").read_text().splitlines()]
    train_s, save_s, score_s = train_times[0], sum(save_times), score_times[0]
    result = {
        "model": args.model,
        "num_examples": summary["num_examples"],
        "num_response_tokens": sum(r["num_response_tokens"] for r in rows),
        "max_length": args.max_length,
        "num_checkpoints": args.num_checkpoints,
        "batch_size": args.batch_size,
        "scoring_batch_size": args.scoring_batch_size,
        "bf16": args.bf16,
        "threads": args.threads,
        "train_epoch_s": round(train_s, 1),
        "of_which_saving_checkpoints_s": round(save_s, 1),
        "score_all_checkpoints_s": round(score_s, 1),
        "score_per_checkpoint_s": round(score_s / args.num_checkpoints, 1),
        "score_over_epoch": round(score_s / train_s, 3),
        "score_over_epoch_without_saves": round(score_s / (train_s - save_s), 3),
        "mean_perplexity_per_checkpoint": summary["mean_perplexity_per_checkpoint"],
    }
    print(json.dumps(result, indent=2))
    (output_dir / "bench_dynamics.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(output_dir / "reference", ignore_errors=True)


if __name__ == "__main__":
    main()
