"""Two CPU processes (torchrun, DDP over gloo) train SFTMix: every rank's micro-batches are balanced pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sftmix_train_script import make_dataset, write_dynamics

SCRIPT = Path(__file__).parent / "sftmix_train_script.py"


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_run_is_balanced_on_every_rank(tmp_path, tiny_llama_dir):
    write_dynamics(tmp_path / "dynamics.jsonl", make_dataset(num_examples=16))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        str(SCRIPT), tiny_llama_dir, str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    split = {json.loads(line)["id"]: json.loads(line)["split"] for line in open(tmp_path / "dynamics.jsonl")}
    seen_ids = []
    for result in results:
        assert result["world"] == 2 and result["all_changed"]
        assert len(result["seen"]) == 4  # 2 steps x 2 micro-batches
        for batch in result["seen"]:
            assert sorted(batch["roles"]) == [0, 1]
            assert [split[i] == "confident" for i in batch["ids"]] == [r == 1 for r in batch["roles"]]
            seen_ids.append(tuple(batch["ids"]))
        assert result["logs"] and all(entry["loss_mixup"] > 0 for entry in result["logs"])
    assert len(set(seen_ids)) == len(seen_ids)  # the ranks train on different pairs
    # the gathered metrics are the same on both ranks
    assert results[0]["logs"] == results[1]["logs"]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_llama_dir):
    import torch
    from safetensors.torch import load_file

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    two, one = tmp_path / "two", tmp_path / "one"
    for out in (two, one):
        out.mkdir()
        write_dynamics(out / "dynamics.jsonl", make_dataset(num_examples=16))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
        str(SCRIPT), tiny_llama_dir, str(two), "2",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29535",
        str(SCRIPT), tiny_llama_dir, str(one), "4",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the same pairs: the global micro-batch of 2 processes is the single process's micro-batch
    single = json.loads((one / "rank0.json").read_text())
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)]
    for k, batch in enumerate(single["seen"]):
        assert batch["ids"] == ranks[0]["seen"][k]["ids"] + ranks[1]["seen"][k]["ids"]
    for key in ("loss", "loss_ntp", "loss_mixup", "mixup_lambda"):
        got = [entry[key] for entry in ranks[0]["logs"]]
        want = [entry[key] for entry in single["logs"]]
        assert got == pytest.approx(want, rel=1e-4), key
    a, b = load_file(two / "weights.safetensors"), load_file(one / "weights.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
