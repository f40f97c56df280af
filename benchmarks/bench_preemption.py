"""The grace period preemption needs: seconds from SIGTERM to the exit of a stopped `sftmix train`, and its parts.

Each round starts ``sftmix train`` on the default model (SmolLM2-135M-Instruct, the demo's) with ``--batch``
examples of ``--seq`` tokens a step, waits until step ``--at`` has been logged (the signal then lands at the
start of a step: the worst case, a whole step still to run), sends SIGTERM, and measures the time to exit. A
second figure: the time to exit when rank 1 of a 2-process run is SIGKILLed (how long rank 0 and the launcher
take to notice and end). The precision is the one sftmix picks for this CPU, and printed.

    python benchmarks/bench_preemption.py --rounds 3
    python benchmarks/bench_preemption.py --kill_rank  # the killed-rank figure (2 processes, torchrun)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def _data(path: Path, n: int, seq: int) -> Path:
    words = " ".join(f"w{i}" for i in range(seq))  # about seq tokens of response
    path.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "output": words}) + "\n" for i in range(n))
    )
    return path


def _watch(proc: subprocess.Popen, lines: list[tuple[float, str]]) -> threading.Thread:
    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic(), line))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def one_round(args: argparse.Namespace, root: Path, launcher: list[str], kill_rank: bool) -> dict:
    out = root / f"run-{time.monotonic_ns()}"
    data = _data(root / "data.jsonl", 64 * args.batch, args.seq)
    argv = [
        *launcher, "train", "--model_name_or_path", args.model, "--dataset_name", str(data), "--output_dir",
        str(out), "--per_device_train_batch_size", str(args.batch), "--max_length", str(args.seq + 32),
        "--max_steps", "64", "--mixup_weight", "0.2", "--confidence_scorer", "random", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--gradient_checkpointing", "false", "--seed", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    reader = _watch(proc, lines)
    logged = re.compile(r"'loss'|\"loss\"")
    while proc.poll() is None and sum(bool(logged.search(line)) for _, line in lines) < args.at:
        time.sleep(0.01)
    steps = [t for t, line in lines if logged.search(line)]
    if kill_rank:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ranks = {
            int(re.search(r"(?:^|\0)RANK=(\d+)", Path(f"/proc/{c}/environ").read_text()).group(1)): int(c)
            for c in children
        }
        os.kill(ranks[1], signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    proc.wait()
    took = time.monotonic() - sent
    reader.join(timeout=5)
    text = "".join(line for _, line in lines)
    saved = re.search(r"stopped by SIGTERM at step (\d+)", text)
    return {
        "exit_s": round(took, 2),
        "returncode": proc.returncode,
        "step_s": round((steps[-1] - steps[-2]), 2) if len(steps) > 1 else None,
        "stopped_at_step": int(saved.group(1)) if saved else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--at", type=int, default=2, help="send the signal once this many steps are logged")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kill_rank", action="store_true", help="2 processes (torchrun), SIGKILL rank 1")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    from sftmix.distributed import cpu_has_bf16

    if args.kill_rank:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "sftmix.cli",
        ]
        args.batch = max(2, args.batch // 2)
    else:
        launcher = [sys.executable, "-m", "sftmix.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        rounds = [one_round(args, Path(tmp), launcher, args.kill_rank) for _ in range(args.rounds)]
    result = {
        "what": "SIGKILL of rank 1 of 2 (torchrun) -> exit" if args.kill_rank else "SIGTERM -> exit",
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "precision": "bf16" if cpu_has_bf16() else "fp32",  # sftmix's own pick on this CPU
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "rounds": rounds,
    }
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
