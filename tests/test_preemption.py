"""SIGTERM/SIGINT (preemption, Ctrl-C) and a killed rank, through the CLI as real processes.

A signal stops the run at the end of the optimizer step with a complete checkpoint, exits with 128 + the
signal's number and one line; the same command then ends with the uninterrupted run's weights (within 1e-6) and
its ``dynamics.jsonl`` byte for byte. `tests/signal_at_step.py` sends the signal at a chosen step or while a
chosen checkpoint is scored; the other tests send it from outside, as a scheduler does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_addition_data
from safetensors.torch import load_file

from sftmix.io_utils import complete_checkpoints

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
SIGNAL_AT = str(Path(__file__).with_name("signal_at_step.py"))
BOUND_S = (
    120  # a stopped run must be gone by then (a hang check on a loaded 2-core machine, not a speed figure)
)


def _args(command: str, model: str, data: Path, out: Path, *extra: str) -> list[str]:
    # save_strategy "no": the checkpoint a signal leaves is the stop's own
    return [
        command, "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--num_checkpoints", "3",
        "--learning_rate", "1e-3", "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none",
        "--bf16", "false", "--use_cpu", "true", "--gradient_checkpointing", "false", "--max_length", "128",
        "--seed", "7", *extra,
    ]  # fmt: skip


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=timeout)


def _assert_same_result(out: Path, expected: Path) -> None:
    if (expected / "dynamics" / "dynamics.jsonl").exists():
        assert (out / "dynamics" / "dynamics.jsonl").read_bytes() == (
            expected / "dynamics" / "dynamics.jsonl"
        ).read_bytes()
    got, want = (
        load_file(out / "final" / "model.safetensors"),
        load_file(expected / "final" / "model.safetensors"),
    )
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    assert not list(out.glob("**/*.tmp")) and not (out / "final.tmp").exists()


def _stopped_line(stderr: str, signame: str = "SIGTERM") -> str:
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"sftmix: stopped by {signame}") and "run the same command again" in line, stderr[
        -3000:
    ]
    return line


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir) -> dict:
    root = tmp_path_factory.mktemp("preemption")
    data = write_addition_data(root / "data.jsonl")
    uninterrupted = root / "uninterrupted"
    proc = _run([sys.executable, "-m", "sftmix.cli", *_args("run", tiny_llama_dir, data, uninterrupted)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "data": data, "model": tiny_llama_dir, "expected": uninterrupted}


# 48 examples, batch 4: 12 steps in the reference run (C = 3: scored at steps 4, 8, 12) and 12 in stage 3
POINTS = {
    "reference": ("reference", 6, "dynamics/reference"),  # mid reference run, between two scored steps
    "scoring": ("scoring", 8, "dynamics/reference"),  # while the step-8 checkpoint is scored
    "train": ("train", 5, "."),  # mid stage 3
}


@pytest.mark.parametrize(
    ("point", "signame"), [("reference", "TERM"), ("scoring", "TERM"), ("train", "TERM"), ("train", "INT")]
)
def test_a_signal_in_each_stage_saves_a_resume_point_and_the_rerun_is_identical(
    point, signame, setup, tmp_path
):
    where, step, subdir = POINTS[point]
    out = tmp_path / "out"
    args = _args("run", setup["model"], setup["data"], out)
    proc = _run([sys.executable, SIGNAL_AT, where, str(step), signame, "0", *args])
    assert proc.returncode == 128 + signal.Signals[f"SIG{signame}"], proc.stderr[-3000:]
    line = _stopped_line(proc.stderr, f"SIG{signame}")
    checkpoint = out / subdir / f"checkpoint-{step}"
    assert f"at step {step}, checkpoint saved in {checkpoint}" in line
    assert [str(c) for c in complete_checkpoints(out / subdir)] == [str(checkpoint)]
    assert not (out / "final").exists()
    if point != "train":
        assert not (out / "dynamics" / "dynamics.jsonl").exists()
        scored = sorted(p.name for p in (out / "dynamics" / "scores").glob("*.json"))
        assert scored == [f"ckpt-{s}.json" for s in (4, 8) if s <= step]  # what was scored is kept

    rerun = _run([sys.executable, "-m", "sftmix.cli", *args])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming the reference run from {checkpoint}" in rerun.stderr or point == "train"
    _assert_same_result(out, setup["expected"])
    assert not list((out / "dynamics" / "reference").glob("checkpoint-*"))  # the used resume point is gone


def test_the_stop_checkpoint_goes_once_used_while_the_kept_reference_checkpoints_stay(setup, tmp_path):
    """With ``keep_reference_checkpoints``, a stop between scored steps leaves a resume point (step 6) next to the
    kept checkpoint of step 4; once stage 1 is complete, only the C scored checkpoints remain."""
    out = tmp_path / "out"
    args = _args("dynamics", setup["model"], setup["data"], out, "--keep_reference_checkpoints", "true")
    proc = _run([sys.executable, SIGNAL_AT, "reference", "6", "TERM", "0", *args])
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert [c.name for c in complete_checkpoints(out / "reference")] == ["checkpoint-4", "checkpoint-6"]
    rerun = _run([sys.executable, "-m", "sftmix.cli", *args])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(c.name for c in (out / "reference").glob("checkpoint-*")) == [
        "checkpoint-12", "checkpoint-4", "checkpoint-8",
    ]  # fmt: skip
    want = (setup["expected"] / "dynamics" / "dynamics.jsonl").read_bytes()
    assert (out / "dynamics.jsonl").read_bytes() == want


def test_sigterm_from_outside_stops_stage_3_and_the_rerun_is_identical(setup, tmp_path):
    """As a scheduler sends it: to the running process, at whatever stage 3 is doing once it has saved its first
    checkpoint (every 2 steps here; saving does not change the training)."""
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "sftmix.cli",
        *_args("run", setup["model"], setup["data"], out, "--save_strategy", "steps", "--save_steps", "2"),
    ]  # fmt: skip
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not complete_checkpoints(out):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=BOUND_S)
    assert time.monotonic() - sent < BOUND_S
    assert proc.returncode == 143, err[-3000:]
    line = _stopped_line(err)
    step = int(line.split(" at step ")[1].split(",")[0])
    assert complete_checkpoints(out)[-1].name == f"checkpoint-{step}" and not (out / "final").exists()
    assert _run(args).returncode == 0
    _assert_same_result(out, setup["expected"])


def test_a_signal_as_training_ends_still_leaves_a_resume_point(setup, tmp_path):
    """A signal after the last step's check (while training ends) stops the run before ``final/`` is written,
    with a checkpoint of the finished training; the rerun writes ``final/`` from it."""
    out = tmp_path / "out"
    args = _args("run", setup["model"], setup["data"], out)
    proc = _run([sys.executable, SIGNAL_AT, "train_end", "0", "TERM", "0", *args])
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert f"at step 12, checkpoint saved in {out / 'checkpoint-12'}" in _stopped_line(proc.stderr)
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-12"] and not (out / "final").exists()
    assert _run([sys.executable, "-m", "sftmix.cli", *args]).returncode == 0
    _assert_same_result(out, setup["expected"])


@pytest.mark.parametrize("step", [8, 12])
def test_a_signal_while_the_online_scorer_measures(step, setup, tmp_path_factory, tmp_path):
    """The ``online`` scorer records epoch 1 of the target's training (12 steps) and makes the split at its end:
    a stop inside it (step 8) keeps the records in the checkpoint; a stop at its last step (12) writes the split
    too. Either way the rerun ends as an uninterrupted run does."""
    extra = ("--confidence_scorer", "online", "--num_train_epochs", "2")
    expected = tmp_path_factory.getbasetemp() / "online_uninterrupted"
    if not (expected / "final").exists():
        proc = _run(
            [
                sys.executable,
                "-m",
                "sftmix.cli",
                *_args("run", setup["model"], setup["data"], expected, *extra),
            ]
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    args = _args("run", setup["model"], setup["data"], out, *extra)
    proc = _run([sys.executable, SIGNAL_AT, "train", str(step), "TERM", "0", *args])
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert f"at step {step}" in _stopped_line(proc.stderr)
    assert (out / "dynamics" / "dynamics.jsonl").exists() == (step == 12)
    rerun = _run([sys.executable, "-m", "sftmix.cli", *args])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same_result(out, expected)


def test_a_second_signal_exits_at_once(tmp_path):
    """The first signal only asks for the stop at the step's end; the second one kills with its default action."""
    script = tmp_path / "twice.py"
    script.write_text(
        "import os, signal, time\n"
        "from sftmix.preemption import StopOnSignal\n"
        "stop = StopOnSignal()\n"
        "stop.on_train_begin(None, None, None)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.1)\n"
        "assert stop.signum == signal.SIGTERM\n"
        "print('asked', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "print('still alive', flush=True)\n"
    )
    proc = _run([sys.executable, str(script)], timeout=60)
    assert proc.stdout.split() == ["asked"] and proc.returncode == -signal.SIGTERM, proc.stderr


def test_a_signal_outside_training_exits_with_one_line(setup, tmp_path):
    """Stage 1 of the ``base`` scorer does not train (one scoring pass): the signal stops the command at once."""
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "sftmix.cli",
        *_args("dynamics", setup["model"], setup["data"], out, "--confidence_scorer", "base"),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not out.exists():  # the lock is taken: the command is under way
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=BOUND_S)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "sftmix: stopped by SIGTERM; run the same command again to resume"
    assert not (out / "dynamics.jsonl").exists() and not list(out.glob("**/*.tmp"))
    assert _run(argv).returncode == 0
    assert (out / "dynamics.jsonl").is_file()


# ---- several processes ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_process_reference(setup) -> Path:
    out = setup["root"] / "two_uninterrupted"
    argv = [*TORCHRUN, "--master_port", "29561", "-m", "sftmix.cli"]
    proc = _run([*argv, *_two_process_args(setup, out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _two_process_args(setup: dict, out: Path) -> list[str]:
    dynamics = setup["expected"] / "dynamics" / "dynamics.jsonl"
    return _args(
        "train", setup["model"], setup["data"], out, "--per_device_train_batch_size", "2",
        "--dynamics_path", str(dynamics), "--num_train_epochs", "4",  # 48 steps: time for a signal mid-run
    )  # fmt: skip


def test_a_signal_on_one_rank_stops_both_at_the_same_step(setup, two_process_reference, tmp_path):
    """Only rank 1 gets SIGTERM (at step 5): the ranks agree at the step's end, both save and stop there."""
    out = tmp_path / "out"
    args = _two_process_args(setup, out)
    argv = [*TORCHRUN, "--master_port", "29562", SIGNAL_AT, "train", "5", "TERM", "1"]
    proc = _run([*argv, *args])
    assert proc.returncode != 0
    assert proc.stderr.count("sftmix: stopped by SIGTERM at step 5") == 2, proc.stderr[-4000:]  # both ranks
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-5"]
    rerun = _run([*TORCHRUN, "--master_port", "29563", "-m", "sftmix.cli", *args])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same_result(out, two_process_reference)


def test_a_signal_on_one_rank_in_the_reference_run_of_two_processes(setup, tmp_path):
    """Stage 1 on 2 processes: rank 1 alone gets SIGTERM in the reference run (step 4 of 12, the first
    scored step); both stop there, and the rerun writes the uninterrupted 2-process ``dynamics.jsonl`` byte for
    byte."""

    def args(out: Path) -> list[str]:
        return _args("dynamics", setup["model"], setup["data"], out, "--per_device_train_batch_size", "2")

    launch = [*TORCHRUN, "--master_port", "29566"]
    expected = _run([*launch, "-m", "sftmix.cli", *args(tmp_path / "expected")])
    assert expected.returncode == 0, expected.stderr[-3000:]
    out = tmp_path / "out"
    proc = _run([*launch, SIGNAL_AT, "reference", "4", "TERM", "1", *args(out)])
    assert proc.stderr.count("sftmix: stopped by SIGTERM at step 4") == 2, proc.stderr[-4000:]
    assert [c.name for c in complete_checkpoints(out / "reference")] == ["checkpoint-4"]
    assert not (out / "dynamics.jsonl").exists()
    rerun = _run([*launch, "-m", "sftmix.cli", *args(out)])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (out / "dynamics.jsonl").read_bytes() == (tmp_path / "expected" / "dynamics.jsonl").read_bytes()


def _worker_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (from their RANK environment variable)."""
    pids, todo = {}, [launcher]
    while todo:
        pid = todo.pop()
        children = Path(f"/proc/{pid}/task/{pid}/children")
        for child in (int(c) for c in (children.read_text().split() if children.exists() else [])):
            todo.append(child)
            try:
                env = dict(
                    kv.split("=", 1)
                    for kv in Path(f"/proc/{child}/environ").read_text().split("\0")
                    if "=" in kv
                )
            except OSError:
                continue
            if "LOCAL_RANK" in env and "TORCHELASTIC_RUN_ID" in env:
                pids[int(env["RANK"])] = child
    return pids


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_sigterm_to_the_launcher_then_a_killed_rank(launcher, setup, two_process_reference, tmp_path):
    """SIGTERM to the launcher reaches both ranks: they stop at one step. Then SIGKILL of rank 1 in the resumed
    run: rank 0 and the launcher end within the bound, the resume points stay, and a third run ends with the
    uninterrupted 2-process weights."""
    out = tmp_path / "out"
    args = [*_two_process_args(setup, out), "--save_strategy", "steps", "--save_steps", "2"]
    port = "29564" if launcher == "torchrun" else "29565"
    if launcher == "torchrun":
        argv = [*TORCHRUN, "--master_port", port, "-m", "sftmix.cli", *args]
    else:
        config = Path(__file__).parents[1] / "examples" / "accelerate" / "ddp.yaml"
        argv = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
            "2", "--mixed_precision", "no", "--main_process_port", port, "-m", "sftmix.cli", *args,
        ]  # fmt: skip

    def start_then(signum: int, rank: int | None, when) -> tuple[int, str, float]:
        proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and not when():
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before the signal"
        os.kill(proc.pid if rank is None else _worker_pids(proc.pid)[rank], signum)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=BOUND_S + 60)
        return proc.returncode, err, time.monotonic() - sent

    # 1. SIGTERM to the launcher once training is under way (its first checkpoint is saved)
    code, err, took = start_then(signal.SIGTERM, None, lambda: bool(complete_checkpoints(out)))
    assert code != 0 and took < BOUND_S, err[-4000:]
    stops = [line for line in err.splitlines() if line.startswith("sftmix: stopped by SIGTERM at step")]
    assert len(stops) == 2 and stops[0] == stops[1], err[-4000:]  # both ranks, the same step and checkpoint
    assert not (out / "final").exists()

    # 2. SIGKILL of rank 1 once the resumed run has saved a checkpoint of its own
    first = complete_checkpoints(out)
    code, err, took = start_then(signal.SIGKILL, 1, lambda: len(complete_checkpoints(out)) > len(first))
    assert code != 0 and took < BOUND_S, err[-4000:]
    assert not (out / "final").exists()
    assert complete_checkpoints(out)[: len(first)] == first  # the earlier resume points are untouched

    # 3. the rerun ends as if nothing had happened
    rerun = _run(argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same_result(out, two_process_reference)
