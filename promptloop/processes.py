"""The processes of a run started with ``accelerate launch`` (one process otherwise)."""
from __future__ import annotations

import os

import torch


def launched_without_cuda() -> bool:
    """True in one of several processes started by ``accelerate launch --multi_gpu`` (torchrun) on a machine
    without CUDA: accelerate must then be asked for the CPU to form a gloo process group (MULTI_CPU)."""
    launched = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return launched and not torch.cuda.is_available()


def process_state():
    """accelerate's ``PartialState`` of this process: rank, number of processes, device, barriers."""
    from accelerate import PartialState

    return PartialState(cpu=launched_without_cuda())
