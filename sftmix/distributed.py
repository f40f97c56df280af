"""Where a run executes: the hardware probes, and the checks that several processes train one model.

accelerate forms a process group on a CPU-only machine (``DistributedType.MULTI_CPU`` over gloo) only when it
is told to run on the CPU (``use_cpu=True``); otherwise each of N launched processes finds no accelerator and
trains alone, every one writing the same ``output_dir``. `SFTMixConfig` therefore sets ``use_cpu`` itself on
such a machine, and `check_process_group` / `check_replicas_agree` make any remaining mismatch loud.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import SFTMixError


def accelerator_available() -> bool:
    """Whether torch sees a GPU-like device (CUDA, ROCm, XPU, MPS, NPU...)."""
    return torch.accelerator.is_available()


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX): bf16 autocast is then faster than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_native() -> bool:
    """Whether the device a run will use computes in bf16 natively."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate launch, mpirun) started."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def check_process_group(accelerator: Any, world_size: int) -> None:
    """Stop with one line unless the launched processes form one data-parallel group.

    Args:
        accelerator: The trainer's ``accelerate.Accelerator`` (or a ``PartialState``).
        world_size: ``TrainingArguments.world_size``.
    """
    from accelerate.utils import DistributedType

    launched = launched_world_size()
    distributed = accelerator.distributed_type != DistributedType.NO
    if launched > 1 and (not distributed or world_size != launched or accelerator.num_processes != launched):
        raise SFTMixError(
            f"{launched} processes were launched but they do not form one process group (accelerate: "
            f"{accelerator.distributed_type.value}, {accelerator.num_processes} processes, world_size "
            f"{world_size}): each would train its own model. On a machine without GPUs set use_cpu=True "
            "(SFTMixConfig does it when torch sees no accelerator)"
        )


def is_sharded(param: torch.Tensor) -> bool:
    """A parameter sharded over the processes (FSDP2 DTensor, DeepSpeed ZeRO-3)."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) or hasattr(param, "ds_id")  # FSDP2 / DeepSpeed ZeRO-3 shards


def check_replicas_agree(model: torch.nn.Module, accelerator: Any, rtol: float = 1e-6) -> None:
    """Stop with one line if the processes of a data-parallel run hold different weights.

    Every process sums each of its parameters in float64; the sums are gathered and compared. DDP (and ZeRO-1/2)
    keeps bitwise-identical replicas, so any difference means the gradients were not synchronised. Sharded
    parameters (FSDP2, ZeRO-3) are one model by construction and are not compared. Call it on every process.

    Args:
        model: The trained model (unwrapped or wrapped).
        accelerator: The trainer's ``accelerate.Accelerator``.
        rtol: Tolerance relative to ``1 + |sum|`` of each parameter.
    """
    if accelerator.num_processes < 2:
        return
    params = [p for p in model.parameters() if not is_sharded(p)]
    if not params:
        return
    sums = torch.stack([p.detach().double().sum() for p in params]).to(accelerator.device)
    every = accelerator.gather(sums[None]).reshape(accelerator.num_processes, -1).cpu()
    spread = (every - every[0]).abs().amax(0) / (1 + every[0].abs())
    if bool((spread > rtol).any()):
        worst = int(spread.argmax())
        names = [n for n, p in model.named_parameters() if not is_sharded(p)]
        raise SFTMixError(
            f"the {accelerator.num_processes} processes hold different weights after training (parameter "
            f"{names[worst]}: sums {every[:, worst].tolist()}): gradients were not synchronised, so the run "
            "trained one model per process; nothing was saved"
        )
