"""The five confidence scorers side by side: stage-1 cost, end-to-end cost against NTP, agreement with the paper's split.

Every arm is one ``sftmix run`` in a fresh process on the same data and settings (SmolLM2-135M-Instruct, a seeded
sample of Alpaca-52K, batch 8, max_length 256, 3 epochs by default; the precision sftmix picks, bf16 only where
the hardware computes it natively, recorded in the result):

- ``ntp``: ``--mixup_weight 0``, the baseline, run first and again last (``ntp_again``): the faster of the two
  is the NTP time, one NTP epoch is that / epochs;
- ``stage3``: SFTMix with the ``reference`` arm's dynamics file given (stage 3 alone);
- ``reference``, ``warmup``, ``online``, ``base``, ``random``: ``--confidence_scorer``, stage 1 included.

Reported per scorer: end-to-end wall time / the NTP run's; stage 1's own time (read from the run's log: loading
the data to the written split for reference, base and random; the scoring passes for warmup, whose reference
epoch is the target's own; none for online) in NTP epochs (the NTP run's training loop / epochs); agreement
with ``reference``: the share of examples in the same half and Spearman's rho of the confidences. For ``online``,
every progress correction and window is also scored against ``reference`` from the recorded training-time NLL
(``steps`` and ``perplexities`` of its dynamics file). Example (about 30 minutes on 2 CPU cores)::

    python benchmarks/bench_scorers.py --n_train 128 --output benchmarks/results/scorers_smollm2_128.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sftmix.io_utils import atomic_write_json, atomic_write_jsonl, read_jsonl
from sftmix.stage1.online import progress_corrected_confidence
from sftmix.stage1.splits import split_agreement

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = SHARED / "alpaca_52k_en_zh_parts"
SCORERS = ("reference", "warmup", "online", "base", "random")


def _sample(root: Path, n: int) -> Path:
    path = root / "train.jsonl"
    if not path.exists():
        from sftmix.data.dataset import load_sft_dataset
        from sftmix.sftmix_config import DataArguments

        data = load_sft_dataset(
            DataArguments(
                dataset_name=str(ALPACA),
                dataset_columns="instruction=en_instruction,input=en_input,output=en_output",
            )
        )
        order = list(range(len(data)))
        random.Random(0).shuffle(order)
        atomic_write_jsonl(path, [{"messages": data[i]["messages"]} for i in order[:n]])
    return path


def _run(argv: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        subprocess.run(
            argv, check=True, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"}
        )
    return time.perf_counter() - start


def _sections(log: Path) -> dict[str, str]:
    """The latest log section of each arm (sections start with the ``$ `` command line naming its output dir)."""
    found = {}
    for section in ("\n" + log.read_text(errors="replace")).split("\n$ ")[1:]:
        found[Path(section.split("--output_dir ")[1].split()[0]).name] = section
    return found


def _stamp(line: str) -> float:
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + float(line[20:23]) / 1000


def stage1_seconds(section: str, scorer: str) -> float:
    """Stage 1's own time in one run's log: from loading the data to the written split for the scorers that run
    before training; the scoring passes (tqdm's elapsed time) for warmup; nothing for online (no extra pass)."""
    if scorer == "online":
        return 0.0
    if scorer == "warmup":
        elapsed = re.findall(r"Scoring step (\d+): 100%[^\[]*\[(\d+):(\d+)<", section)
        per_step = {step: int(m) * 60 + int(s) for step, m, s in elapsed}  # the last bar of each step
        return float(sum(per_step.values()))
    lines = section.splitlines()
    start = next(line for line in lines if "sftmix.data.dataset: Loaded" in line)
    done = next(line for line in lines if f"Stage 1 ({scorer})" in line)
    return _stamp(done) - _stamp(start)


def train_runtime(section: str) -> float:
    return float(re.findall(r"'train_runtime': '([\d.]+)'", section)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--root", default="runs/bench_scorers")
    parser.add_argument("--n_train", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--num_checkpoints", type=int, default=3)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    data, log = _sample(root, args.n_train), root / "bench.log"
    common = [
        sys.executable, "-m", "sftmix.cli", "run", "--model_name_or_path", args.model, "--dataset_name", str(data),
        "--max_length", str(args.max_length), "--per_device_train_batch_size", str(args.batch),
        "--num_train_epochs", str(args.epochs), "--num_checkpoints", str(args.num_checkpoints), "--learning_rate",
        "2e-5", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1", "--save_strategy", "no", "--report_to",
        "none", "--logging_steps", "5", "--seed", "1",
    ]  # fmt: skip
    times: dict[str, float] = {}
    results_path = root / "times.json"
    if results_path.exists():
        times = json.loads(results_path.read_text())
    # NTP runs first and again last: other load on the machine only adds time, so the faster of the two is the
    # baseline (both are reported).
    arms = [("ntp", ["--mixup_weight", "0"]), *[(s, ["--confidence_scorer", s]) for s in SCORERS]]
    arms.insert(2, ("stage3", ["--dynamics_path", str(root / "reference" / "dynamics" / "dynamics.jsonl")]))
    arms.append(("ntp_again", ["--mixup_weight", "0"]))
    for name, extra in arms:
        if name not in times:  # a rerun continues with the arms not yet timed, each from scratch
            shutil.rmtree(root / name, ignore_errors=True)
            times[name] = _run([*common, *extra, "--output_dir", str(root / name)], log)
            atomic_write_json(results_path, times)
        print(f"{name}: {times[name]:.1f} s", flush=True)

    ntp = min(times["ntp"], times["ntp_again"])
    sections = _sections(log)
    # one NTP epoch: the faster NTP run's training loop (no start-up) over its epochs
    epoch = min(train_runtime(sections["ntp"]), train_runtime(sections["ntp_again"])) / args.epochs
    confidence = {
        s: {r["id"]: r["confidence"] for r in read_jsonl(root / s / "dynamics" / "dynamics.jsonl")}
        for s in SCORERS
    }
    table = {
        s: {
            "end_to_end_over_ntp": round(times[s] / ntp, 3),
            "stage1_seconds": round(stage1_seconds(sections[s], s), 1),
            "stage1_ntp_epochs": round(stage1_seconds(sections[s], s) / epoch, 3),
            "agreement_with_reference": split_agreement(confidence[s], confidence["reference"]),
        }
        for s in SCORERS
    }
    online_rows = read_jsonl(root / "online" / "dynamics" / "dynamics.jsonl")
    steps = np.array([r["steps"][0] for r in online_rows])
    log_ppl = np.log([r["perplexities"][0] for r in online_rows])
    corrections = {}
    for method in ("none", "rank", "detrend"):
        for window in (1, 2, 4, 8) if method != "none" else (0,):
            conf = progress_corrected_confidence(steps, log_ppl, method, window)
            found = dict(zip((r["id"] for r in online_rows), conf.tolist(), strict=True))
            corrections[f"{method}:{window}"] = split_agreement(found, confidence["reference"])
    result = {
        "settings": vars(args),
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": {k: round(v, 1) for k, v in times.items()},
        "ntp_epoch_seconds": round(epoch, 1),
        "precision": json.loads((root / "ntp" / "final" / "sftmix_train.json").read_text()).get("precision"),
        "scorers": table,
        "online_corrections_vs_reference": corrections,
    }
    print(json.dumps(result, indent=1))
    if args.output:
        atomic_write_json(args.output, result)


if __name__ == "__main__":
    main()
