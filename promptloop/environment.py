"""What a bug report needs to say about the machine: versions of Python, promptloop and the libraries it drives,
and the accelerators torch sees (``promptloop env``)."""
from __future__ import annotations

import platform
from importlib import metadata

from promptloop import __version__

LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors", "datasets",
             "trl", "vllm", "wandb", "open_clip_torch")
"""Distributions reported by :func:`environment` (``not installed`` where absent; none of them is imported)."""


def environment() -> dict[str, str]:
    """Name -> version or description, in a stable order."""
    info = {"promptloop": __version__, "python": platform.python_version(),
            "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    import torch

    info["cuda (torch build)"] = torch.version.cuda or "none"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpus"] = f"{len(names)}: " + ", ".join(names)
    else:
        info["gpus"] = "none (CPU only)"
    return info
