"""Frozen diffusers pipelines as step-wise environments, and the closed-loop rollout that drives them."""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional

import torch

from .base import Backbone, PromptEmbeds, SamplerState, StepResult
from .rollout import check_feedback_delay, fit_prompt, rollout
from .schedule import RefinementSchedule
from .sdxl import StableDiffusionXLBackbone
from .stable_diffusion import StableDiffusionBackbone, saved_pipeline_class
from .types import (Observation, PhaseTimes, RefineFn, RolloutOutput, SamplerSettings, Trajectory, blind_observations,
                    withhold_preview)

ADAPTERS: dict[str, str] = {
    "StableDiffusionPipeline": "promptloop.backbones.stable_diffusion:StableDiffusionBackbone",
    "StableDiffusionXLPipeline": "promptloop.backbones.sdxl:StableDiffusionXLBackbone",
    "StableDiffusion3Pipeline": "promptloop.backbones.sd3:SD3Backbone",
    "FluxPipeline": "promptloop.backbones.flux:FluxBackbone",
}
"""diffusers pipeline class name -> ``module:Class`` of its adapter (imported lazily)."""


def adapter_for(pipeline_class_name: str) -> type[Backbone]:
    """The adapter class for a diffusers pipeline class name."""
    if pipeline_class_name not in ADAPTERS:
        raise ValueError(
            f"No promptloop backbone for {pipeline_class_name}; supported pipelines: {sorted(ADAPTERS)}."
        )
    module, cls = ADAPTERS[pipeline_class_name].split(":")
    return getattr(importlib.import_module(module), cls)


HUB_DOWNLOAD_KWARGS = ("revision", "token", "cache_dir", "local_files_only")
"""The ``from_pretrained`` keywords that choose what to download from the hub (diffusers and transformers)."""


def auto_backbone(pipe_or_path: Any, preview_decoder: Optional[torch.nn.Module] = None, **kwargs: Any) -> Backbone:
    """Wrap a pipeline object, or load a local folder / hub id, with the adapter of its pipeline class.

    With a pipeline object, ``kwargs`` go to the adapter's ``from_pipeline``; with a path or id, to its
    ``from_pretrained`` (and from there to the diffusers ``from_pretrained``, e.g. ``dtype``, ``revision``).
    """
    if not isinstance(pipe_or_path, (str, os.PathLike)):
        return adapter_for(type(pipe_or_path).__name__).from_pipeline(
            pipe_or_path, preview_decoder=preview_decoder, **kwargs
        )
    path = os.fspath(pipe_or_path)
    class_name = saved_pipeline_class(path)
    if class_name is None:
        from diffusers import DiffusionPipeline

        hub = {key: kwargs[key] for key in HUB_DOWNLOAD_KWARGS if key in kwargs}
        try:
            class_name = DiffusionPipeline.load_config(path, **hub).get("_class_name")
        except OSError as e:
            raise OSError(f"{path!r} is not a local diffusers pipeline folder, and its model_index.json could not be "
                          f"read from the hub ({e}). Without network, download it first where there is one (`hf "
                          f"download {path}`, then HF_HUB_OFFLINE=1 reads the cache) or give a local folder.") from e
    return adapter_for(class_name).from_pretrained(path, preview_decoder=preview_decoder, **kwargs)


def diffusers_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype keyword of diffusers' ``from_pretrained`` for the installed version: ``dtype`` since diffusers
    0.40, ``torch_dtype`` before (0.40 and later still take it, with a deprecation warning)."""
    from importlib.metadata import version

    from packaging.version import Version

    return {"dtype" if Version(version("diffusers")) >= Version("0.40") else "torch_dtype": dtype}


def load_backbone(name_or_path: str | os.PathLike, dtype: str = "auto", device: torch.device | str = "cpu", *,
                  revision: Optional[str] = None, variant: Optional[str] = None) -> Backbone:
    """Load a saved pipeline (folder or hub id, at ``revision``; weight files of ``variant`` such as "fp16") with the
    adapter of its class, in ``dtype`` (a torch dtype name such as "float32"; "auto": bfloat16 on CUDA, float32
    elsewhere) and move it to ``device``."""
    device = torch.device(device)
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype name; use e.g. 'float32', 'bfloat16' or 'auto'.")
    chosen = {key: value for key, value in dict(revision=revision, variant=variant).items() if value is not None}
    backbone = auto_backbone(name_or_path, **diffusers_dtype_kwargs(getattr(torch, dtype)), **chosen)
    backbone.pipe.to(device)
    return backbone


__all__ = [
    "ADAPTERS", "Backbone", "Observation", "PhaseTimes", "PromptEmbeds", "RefineFn", "RefinementSchedule",
    "RolloutOutput", "SamplerSettings", "SamplerState", "StableDiffusionBackbone", "StableDiffusionXLBackbone",
    "StepResult", "Trajectory", "adapter_for", "auto_backbone", "blind_observations", "check_feedback_delay",
    "diffusers_dtype_kwargs", "fit_prompt", "load_backbone", "rollout", "withhold_preview",
]
