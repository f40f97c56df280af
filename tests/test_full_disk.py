"""A full disk while a checkpoint is saved: one line, nothing half-written left, the rerun resumes to the same end.

On a real small file system (a size-limited tmpfs, mounted as root); skipped where the machine cannot mount one.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from conftest import ntp_train_argv
from safetensors.torch import load_file

from sftmix.cli import main
from sftmix.io_utils import complete_checkpoints


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _argv(model: str, out: Path) -> list[str]:
    steps = ("--num_train_epochs", "3", "--save_strategy", "steps", "--save_steps", "1", "--seed", "3")
    return ntp_train_argv(model, out, *steps)


def test_full_disk_while_saving_a_checkpoint(small_disk, tmp_path, tiny_llama_dir, capsys):
    out = small_disk / "run"
    assert main(_argv(tiny_llama_dir, out)) == 2  # 9 steps, a checkpoint after each: the disk fills up
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sftmix: error: ")]
    assert (
        len(errors) == 1
        and "disk full while writing" in errors[0]
        and "MB free on that file system" in errors[0]
    )
    complete = complete_checkpoints(out)
    assert complete and "resumes from " + complete[-1].name in errors[0]
    assert sorted(out.glob("checkpoint-*")) == sorted(complete)  # the half-written one is gone
    assert not list(out.rglob("*.tmp")) and not (out / ".sftmix.lock").exists()

    # more room (as a user would make it), the same command: it resumes and ends as an uninterrupted run does
    for old in complete[:-1]:
        shutil.rmtree(old)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(_argv(tiny_llama_dir, out)) == 0
    assert main(_argv(tiny_llama_dir, tmp_path / "uninterrupted")) == 0
    resumed = load_file(str(out / "final" / "model.safetensors"))
    for name, value in load_file(str(tmp_path / "uninterrupted" / "final" / "model.safetensors")).items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
