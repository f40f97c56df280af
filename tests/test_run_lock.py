"""sftmix.run_lock: one writer per output_dir, through the CLI as users run it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ntp_train_argv

from sftmix.cli import main
from sftmix.errors import SFTMixError
from sftmix.run_lock import LOCK_NAME, LockHolder, output_dir_lock

_train_argv = ntp_train_argv


def test_a_second_run_on_a_live_runs_output_dir_stops_at_once(tmp_path, tiny_llama_dir):
    """The first run holds the lock (stopped with SIGSTOP while the second tries), the second exits 2 with one
    line naming the holder, and the first, resumed, ends unharmed and releases the lock."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    first = subprocess.Popen(
        [sys.executable, "-m", "sftmix.cli", *_train_argv(tiny_llama_dir, out, "--num_train_epochs", "2")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "sftmix.cli",
                *_train_argv(tiny_llama_dir, out, "--num_train_epochs", "1"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2
        errors = [line for line in second.stderr.splitlines() if line.startswith("sftmix: error: ")]
        assert len(errors) == 1 and "Traceback" not in second.stderr
        assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}, since " in errors[0]
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert json.loads((out / "final" / "sftmix_train.json").read_text())["global_step"] == 6  # 2 epochs of 3
    assert not (out / LOCK_NAME).exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, tiny_llama_dir, caplog):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid of this host that no longer runs, as a run killed with SIGKILL leaves it
    out.mkdir()
    stale = LockHolder(socket.gethostname(), dead.pid, "1", "2026-01-01 00:00:00 UTC")
    (out / LOCK_NAME).write_text(json.dumps(stale.__dict__))
    assert main(_train_argv(tiny_llama_dir, out, "--max_steps", "1")) == 0
    assert f"its holder (host {socket.gethostname()}, pid {dead.pid}, since 2026-01-01" in caplog.text
    assert (out / "final").is_dir() and not (out / LOCK_NAME).exists()


def test_another_hosts_lock_is_never_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(
        json.dumps(LockHolder("node-7", 4242, "", "2026-12-07 10:00:00 UTC").__dict__)
    )
    with pytest.raises(SFTMixError, match=r"in use by another run \(host node-7, pid 4242, since 2026-12-07"):
        with output_dir_lock(out):
            pass
    assert (out / LOCK_NAME).exists()  # still the other host's


def test_only_the_main_process_holds_it_and_an_unused_dir_is_left_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with output_dir_lock(tmp_path / "a"):
        assert not (tmp_path / "a").exists()
    monkeypatch.setenv("RANK", "0")
    with output_dir_lock(tmp_path / "b"):
        holder = json.loads((tmp_path / "b" / LOCK_NAME).read_text())
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    assert not (tmp_path / "b").exists()  # created for the lock, nothing written: removed again


def test_a_half_written_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    """A run stopped while writing its lock (a signal between creating and filling it) leaves it unreadable: once
    it is older than a writer needs, the next run takes it over instead of refusing forever."""
    (tmp_path / LOCK_NAME).write_text('{"host": "vm", "pi')
    old = time.time() - 60
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with output_dir_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "Taking over" in caplog.text and not (tmp_path / LOCK_NAME).exists()
