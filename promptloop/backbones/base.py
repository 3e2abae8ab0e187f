"""The backbone contract: a frozen diffusers pipeline seen as a step-wise environment.

A :class:`Backbone` wraps a pipeline object the user already loaded (LoRA, fine-tuned UNet, scheduler, dtype,
device and offload stay in effect) and exposes the four things the closed loop needs: encode prompts, prepare
the initial state, run one denoising step (returning the x0 estimate), decode latents. The generic rollout in
``promptloop.backbones.rollout`` drives any family through this contract.
"""
from __future__ import annotations

import inspect
import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from .types import SamplerSettings

SAFE_WEIGHTS = {"use_safetensors": True}
"""The diffusers ``from_pretrained`` keywords of every pipeline promptloop loads: safetensors only, never pickle."""


@dataclass
class PromptEmbeds:
    """Encoded prompts, one row per prompt, as named tensors with the batch on dim 0 (no CFG concatenation)."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, rows: list[int] | torch.Tensor) -> "PromptEmbeds":
        return PromptEmbeds({k: v[rows] for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        keys = parts[0].tensors.keys()
        return PromptEmbeds({k: torch.cat([p.tensors[k] for p in parts]) for k in keys})


def solver_step_starts(scheduler: Any, num_evaluations: int) -> list[int]:
    """Index of each solver step's first denoiser evaluation among a scheduler's ``num_evaluations`` timesteps.

    First-order schedulers evaluate once per step. A scheduler of ``order`` k > 1 (Heun, KDPM2, DPM-Solver-SDE,
    FlowMatchHeun) evaluates k times per step and once in its last step. PNDM's warm-up steps evaluate 4 times
    (Runge-Kutta), or its first step twice with ``skip_prk_steps``. Any other count is a ValueError.
    """
    order = getattr(scheduler, "order", 1)
    if order > 1:
        sizes = [order] * ((num_evaluations - 1) // order) + [1]
    elif hasattr(scheduler, "prk_timesteps"):  # PNDM
        warm_up, per_step = (1, 2) if scheduler.config.skip_prk_steps else (scheduler.pndm_order - 1, 4)
        sizes = [per_step] * warm_up + [1] * (scheduler.num_inference_steps - warm_up)
    else:
        sizes = [1] * num_evaluations
    if sum(sizes) != num_evaluations:
        raise ValueError(
            f"{type(scheduler).__name__} (order {order}) has {num_evaluations} timesteps, which promptloop cannot "
            "split into solver steps; use a first-order scheduler such as EulerDiscreteScheduler or "
            "DPMSolverMultistepScheduler."
        )
    return list(itertools.accumulate([0] + sizes[:-1]))


@dataclass
class SamplerState:
    """Mutable state of one batched sampling run. ``scheduler`` is a private copy; ``extras`` holds
    family-specific tensors (time ids, image ids, guidance embedding, negative embeddings, ...).

    ``timesteps`` has one entry per denoiser evaluation (the ``i`` of :meth:`Backbone.step`). A solver step is one
    step of ``num_inference_steps``: several evaluations for second-order schedulers (Heun: predictor and
    corrector), see :func:`solver_step_starts`. Prompts change only at the start of a solver step.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    scheduler: Any
    settings: SamplerSettings
    guidance_scale: float
    negative: Optional[PromptEmbeds] = None
    extras: dict[str, Any] = field(default_factory=dict)
    step_starts: list[int] = field(init=False)
    """Index into ``timesteps`` of each solver step's first evaluation."""

    def __post_init__(self) -> None:
        self.step_starts = solver_step_starts(self.scheduler, len(self.timesteps))

    @property
    def num_steps(self) -> int:
        """Denoiser evaluations (``len(timesteps)``)."""
        return len(self.timesteps)

    @property
    def num_solver_steps(self) -> int:
        """Solver steps (``num_inference_steps``): the steps prompts and refinement schedules count."""
        return len(self.step_starts)

    def evaluations(self, k: int) -> range:
        """Indices into ``timesteps`` of the evaluations of solver step ``k``."""
        end = self.step_starts[k + 1] if k + 1 < self.num_solver_steps else self.num_steps
        return range(self.step_starts[k], end)


@dataclass
class StepResult:
    """Output of one denoising step for the whole batch."""

    latents: torch.Tensor
    """x_{t-1}, the state for the next step."""
    x0: torch.Tensor
    """The x0 (Tweedie) estimate from this step's model prediction, in the backbone's latent space."""


class Backbone(ABC):
    """A frozen text-to-image pipeline, one family per subclass."""

    family: ClassVar[str]
    pipeline_class_names: ClassVar[tuple[str, ...]]
    """diffusers pipeline class names this adapter accepts in :meth:`from_pipeline`."""

    def __init__(self, pipe: Any, preview_decoder: Optional[torch.nn.Module] = None):
        self.pipe = pipe
        self.preview_decoder = preview_decoder

    @classmethod
    def from_pipeline(cls, pipe: Any, preview_decoder: Optional[torch.nn.Module] = None) -> "Backbone":
        """Wrap a pipeline the user already has; nothing is copied or reloaded."""
        name = type(pipe).__name__
        if name not in cls.pipeline_class_names:
            raise TypeError(
                f"{cls.__name__} expects one of {cls.pipeline_class_names}, got {name}. "
                "Use promptloop.backbones.auto_backbone(pipe) to pick the adapter by pipeline class."
            )
        return cls(pipe, preview_decoder=preview_decoder)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    @abstractmethod
    def text_budget(self) -> int:
        """Content tokens the primary text encoder reads, compared with :meth:`count_tokens` (no special tokens):
        77 - 2 = 75 for CLIP, ``max_sequence_length - 1`` for T5 (SD3/FLUX)."""

    @abstractmethod
    def count_tokens(self, prompt: str) -> int:
        """Number of content tokens of ``prompt`` for the primary text encoder (no special tokens)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Encode prompts (already fitted to the text budget), one row each, in the pipeline's own way."""

    @abstractmethod
    def prepare(self, settings: SamplerSettings, generators: list[torch.Generator]) -> SamplerState:
        """Initial latents (one generator per row, as the pipeline draws them), timesteps, negatives, extras."""

    @abstractmethod
    def step(self, state: SamplerState, i: int, embeds: PromptEmbeds) -> StepResult:
        """Run denoising step ``i`` for the whole batch with per-row ``embeds``; updates ``state.latents``."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, size: Optional[int] = None, preview: bool = False,
               generators: Optional[list[torch.Generator]] = None) -> torch.Tensor:
        """Latents -> ``(B, 3, H, W)`` in [0, 1]. ``preview=True`` may use ``preview_decoder`` and resizes the
        longest side to ``size``; ``preview=False`` must match the pipeline's own output exactly. ``generators``
        (one per row) reach a VAE whose decode samples (``ConsistencyDecoderVAE``), as the pipeline passes its own."""

    @abstractmethod
    def noise_level(self, state: SamplerState, i: int) -> float:
        """Fraction of noise left before denoiser evaluation ``i`` (an index into ``state.timesteps``) in [0, 1]."""


def vae_decode_kwargs(vae: Any, generators: Optional[list[torch.Generator]]) -> dict[str, Any]:
    """``{"generator": generators}`` when given and ``vae.decode`` takes a ``generator``, else nothing."""
    if generators is None or "generator" not in inspect.signature(vae.decode).parameters:
        return {}
    return {"generator": generators}
