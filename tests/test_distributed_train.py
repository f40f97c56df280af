"""Two CPU processes (torchrun, DDP over gloo) train SFTMix: every rank's micro-batches are balanced pairs.

That they train the same model as one process is tested through the CLI in test_distributed_cli.py.
"""

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
