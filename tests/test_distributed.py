"""sftmix.distributed: the guards that stop N processes from silently training N models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from sftmix.distributed import check_process_group, check_replicas_agree, launched_world_size
from sftmix.errors import SFTMixError
from sftmix.sftmix_config import SFTMixConfig


def _state(kind: DistributedType, processes: int) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=kind, num_processes=processes)


def test_launched_processes_that_do_not_form_a_group_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_world_size() == 2
    # the symptom: a process group exists but accelerate says NO, so nothing is wrapped in DDP
    with pytest.raises(SFTMixError, match="2 processes were launched but they do not form one process group"):
        check_process_group(_state(DistributedType.NO, 2), 2)
    with pytest.raises(SFTMixError, match="do not form one process group"):
        check_process_group(_state(DistributedType.NO, 1), 1)  # each process alone
    check_process_group(_state(DistributedType.MULTI_CPU, 2), 2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_process_group(_state(DistributedType.NO, 1), 1)


class _FakeAccelerator:
    """Two processes: this one holds ``model``, the other the given parameter sums."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, other_sums: list[float] | None = None):
        self.other_sums = other_sums

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        other = (
            tensor.clone() if self.other_sums is None else torch.tensor([self.other_sums], dtype=tensor.dtype)
        )
        return torch.cat([tensor, other])


def test_replicas_that_differ_are_refused():
    model = torch.nn.Linear(3, 2)
    sums = [p.detach().double().sum().item() for p in model.parameters()]
    check_replicas_agree(model, _FakeAccelerator())  # identical replicas
    check_replicas_agree(model, _FakeAccelerator([sums[0] * (1 + 1e-9), sums[1]]))  # float noise
    with pytest.raises(SFTMixError, match=r"hold different weights after training \(parameter weight"):
        check_replicas_agree(model, _FakeAccelerator([sums[0] + 1e-3, sums[1]]))
    with pytest.raises(SFTMixError, match="parameter bias"):
        check_replicas_agree(model, _FakeAccelerator([sums[0], sums[1] - 0.5]))


def test_config_on_a_cpu_only_machine_runs_on_the_cpu(tmp_path):
    if torch.accelerator.is_available():
        pytest.skip("needs a machine without GPUs")
    # use_cpu is what makes accelerate group CPU processes: it must be set in fp32 as well as in bf16
    for bf16 in (False, None):
        args = SFTMixConfig(output_dir=str(tmp_path), bf16=bf16, report_to="none")
        assert args.use_cpu and args.ddp_backend is None
    # with WORLD_SIZE > 1 it also picks gloo: tests/test_distributed_cli.py launches without ddp_backend
