"""kill -9 at several points of `sftmix run`, then the same command: the result equals an uninterrupted run.

The commands run as real processes killed with SIGKILL (no cleanup code runs), when the output directory shows
that the run has reached a given point: a reference checkpoint saved, a checkpoint scored, a stage-3 checkpoint
saved. A checkpoint left half-written by a kill during saving is simulated exactly (its files cut short, no
``trainer_state.json``) since a real kill rarely lands inside a save that lasts milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import write_addition_data
from safetensors.torch import load_file

from sftmix.io_utils import complete_checkpoints, last_complete_checkpoint

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def _argv(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "sftmix.cli", "run", "--model_name_or_path", model, "--dataset_name", str(data),
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
        "--num_checkpoints", "3", "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "2",
        "--logging_steps", "1", "--report_to", "none", "--bf16", "false", "--use_cpu", "true",
        "--gradient_checkpointing", "false", "--max_length", "128", "--seed", "7", *extra,
    ]  # fmt: skip


def _run(argv: list[str], kill_when: Callable[[], bool] | None = None, timeout: float = 300) -> int:
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while kill_when is not None and proc.poll() is None and time.monotonic() < deadline:
        if kill_when():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    try:
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
    return proc.returncode


def _final_loss(out: Path) -> float:
    state = json.loads((Path(last_complete_checkpoint(out)) / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e][-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("uninterrupted")
    data = write_addition_data(root / "data.jsonl")
    assert _run(_argv(tiny_llama_dir, data, root / "out")) == 0
    return data, root / "out"


KILL_POINTS = {
    "reference_training": lambda out: (out / "dynamics" / "reference" / "sftmix_reference.json").is_file(),
    "scoring": lambda out: any((out / "dynamics" / "scores").glob("*.json")),
    "stage3_training": lambda out: bool(complete_checkpoints(out)),
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_kill_9_then_rerun_gives_the_uninterrupted_result(point, reference, tiny_llama_dir, tmp_path):
    data, expected = reference
    out = tmp_path / "out"
    argv = _argv(tiny_llama_dir, data, out)
    assert _run(argv, kill_when=lambda: KILL_POINTS[point](out)) == -signal.SIGKILL
    assert not (out / "final").exists()
    assert _run(argv) == 0
    _assert_same_result(out, expected)


def test_half_written_checkpoints_are_not_resume_points(reference, tiny_llama_dir, tmp_path):
    """A kill while saving leaves a checkpoint without trainer_state.json (written last): it is skipped."""
    data, expected = reference
    out = tmp_path / "out"
    argv = _argv(tiny_llama_dir, data, out)
    assert _run(argv, kill_when=lambda: len(complete_checkpoints(out)) >= 1) == -signal.SIGKILL
    last = Path(last_complete_checkpoint(out))
    step = int(last.name.split("-")[1])
    half = out / f"checkpoint-{step + 2}"
    shutil.rmtree(half, ignore_errors=True)
    shutil.copytree(last, half)
    (half / "trainer_state.json").unlink()
    for name in ("model.safetensors", "optimizer.pt"):
        blob = (half / name).read_bytes()
        (half / name).write_bytes(blob[: len(blob) // 3])  # cut short, as by a kill mid-write
    assert last_complete_checkpoint(out) == str(last)
    assert _run(argv) == 0
    _assert_same_result(out, expected)


def _assert_same_result(out: Path, expected: Path) -> None:
    assert (out / "dynamics" / "dynamics.jsonl").read_bytes() == (
        expected / "dynamics" / "dynamics.jsonl"
    ).read_bytes()
    assert _final_loss(out) == pytest.approx(_final_loss(expected), rel=1e-5)
    got, want = (
        load_file(out / "final" / "model.safetensors"),
        load_file(expected / "final" / "model.safetensors"),
    )
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not list(out.glob("**/*.tmp")) and not (out / "final.tmp").exists()


# Stage 1 of every scorer, killed while it is under way (48 examples, batch 4: 12 steps an epoch, 2 epochs, C = 2).
# reference: after its first checkpoint is scored; warmup: the same, inside the target's first epoch; online: once
# the target has saved a checkpoint in epoch 1; base and random (one pass, one atomic write): as soon as the
# stage-1 directory appears.
SCORER_KILL_POINTS = {
    "reference": lambda out: any((out / "dynamics" / "scores").glob("*.json")),
    "warmup": lambda out: any((out / "dynamics" / "scores").glob("*.json")),
    "online": lambda out: bool(complete_checkpoints(out)),
    "base": lambda out: (out / "dynamics").exists(),
    "random": lambda out: (out / "dynamics").exists(),
}


@pytest.fixture(scope="module")
def scorer_data(tmp_path_factory) -> Path:
    return write_addition_data(tmp_path_factory.mktemp("scorers") / "data.jsonl")


@pytest.mark.parametrize("scorer", sorted(SCORER_KILL_POINTS))
def test_kill_9_in_stage_1_of_each_scorer_then_rerun(scorer, scorer_data, tiny_llama_dir, tmp_path):
    extra = ("--confidence_scorer", scorer, "--num_train_epochs", "2", "--num_checkpoints", "2")
    expected, out = tmp_path / "uninterrupted", tmp_path / "out"
    assert _run(_argv(tiny_llama_dir, scorer_data, expected, *extra)) == 0
    summary = json.loads((expected / "dynamics" / "dynamics_summary.json").read_text())
    assert summary["scorer"] == scorer and summary["num_examples"] == 48
    argv = _argv(tiny_llama_dir, scorer_data, out, *extra)
    assert _run(argv, kill_when=lambda: SCORER_KILL_POINTS[scorer](out)) == -signal.SIGKILL
    if scorer in ("reference", "warmup", "online"):
        assert not (out / "dynamics" / "dynamics.jsonl").exists()  # killed inside stage 1
    assert _run(argv) == 0
    _assert_same_result(out, expected)
