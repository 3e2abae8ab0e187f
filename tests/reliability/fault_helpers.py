"""Small fault-injection helpers shared by the reliability tests (imported by name)."""
from __future__ import annotations

import contextlib
import resource
import signal
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from promptloop.rl.checkpoint import load_tensors, read_meta


@contextlib.contextmanager
def file_size_limit(max_bytes: int) -> Iterator[None]:
    """Writes past ``max_bytes`` fail with EFBIG in this process, as writes on a full disk do with ENOSPC: the real
    writers (torch.save, safetensors, json) hit a real failing ``write``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)


def load_whole_checkpoint(checkpoint: Path) -> dict:
    """Read every file of a checkpoint as resume does (fails loudly on any damage); returns its metadata."""
    meta = read_meta(checkpoint)
    assert checkpoint.name == f"step-{meta['step']:08d}"
    adapter = load_file(str(checkpoint / "policy" / "adapter_model.safetensors"))
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        load_tensors(checkpoint / name)
    return meta


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
