"""Data that crosses the boundary between the sampler and whoever rewrites prompts.

The sampler (``backbones``) produces :class:`Observation` objects and consumes prompts from a
:data:`RefineFn`. It never imports the policy: anything with the ``RefineFn`` signature can drive it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from PIL import Image


@dataclass
class SamplerSettings:
    """Sampler settings shared by every row of a rollout.

    ``None`` means "the pipeline's own default" (resolved by the backbone adapter), so that a rollout with
    default settings reproduces a stock ``pipe(prompt)`` call.
    """

    num_inference_steps: int = 50
    guidance_scale: Optional[float] = None
    negative_prompt: Optional[Union[str, list[str]]] = None
    """One negative prompt for every row, or a list with one per row (as diffusers takes one per prompt); ``None``
    keeps the pipeline's default."""
    height: Optional[int] = None
    width: Optional[int] = None
    preview_size: Optional[int] = 256
    """Longest side, in pixels, of the x0 preview shown to ``refine``; ``None`` keeps the decoder's size."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Family-specific options (e.g. ``guidance_rescale`` for SD/SDXL, ``true_cfg_scale`` for FLUX)."""


def negative_prompt_rows(negative_prompt: Optional[Union[str, list[str]]], batch: int) -> Optional[list[str]]:
    """``SamplerSettings.negative_prompt`` as one str per row of a ``batch``-row run (``None`` stays ``None``).

    Raises TypeError/ValueError unless it is ``None``, a str, or a list/tuple of ``batch`` strs.
    """
    if negative_prompt is None:
        return None
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch
    if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(n, str) for n in negative_prompt):
        raise TypeError(f"negative_prompt must be a str or a list of str (one per prompt), got {negative_prompt!r}.")
    if len(negative_prompt) != batch:
        raise ValueError(f"negative_prompt holds {len(negative_prompt)} prompts for {batch} prompts; give one per "
                         "prompt, or one str for all.")
    return list(negative_prompt)


@dataclass
class Observation:
    """What ``refine`` sees for one row at one decision step.

    The preview is the x0 (Tweedie) estimate of the latest completed denoising step, decoded to RGB. The prompt
    returned for this observation is in force from sampler step ``step`` onwards.
    """

    row: int
    query: str
    """The user's original query (rewards are scored against it)."""
    prompt: str
    """The prompt in force until now."""
    history: list[str]
    """Every prompt in force so far, oldest first (``history[-1] == prompt``)."""
    preview: Optional[Image.Image]
    """Decoded x0 estimate; ``None`` when no image is shown (a-priori / one-shot / feedback ablation)."""
    step: int
    """Sampler step index (0-based) from which the new prompt applies."""
    num_steps: int
    """Sampler steps of the run: solver steps (``num_inference_steps``), not denoiser evaluations."""
    refinement_index: int
    """0-based index k of this refinement among the row's ``num_refinements``."""
    num_refinements: int
    noise_level: float
    """Fraction of noise left at ``step`` in [0, 1] (1 = pure noise), from the scheduler's sigmas."""
    metadata: dict[str, Any] = field(default_factory=dict)


RefineFn = Callable[[list[Observation]], list[str]]
"""``refine(observations) -> prompts``: exactly one ``str`` per observation, in order."""


def blind_observations(queries: list[str], num_refinements: int, num_steps: int) -> list[Observation]:
    """One observation per query before sampling, without an image (one-shot and a-priori policy calls)."""
    return [
        Observation(row=i, query=q, prompt=q, history=[q], preview=None, step=0, num_steps=num_steps,
                    refinement_index=0, num_refinements=num_refinements, noise_level=1.0)
        for i, q in enumerate(queries)
    ]


def withhold_preview(refine: RefineFn) -> RefineFn:
    """``refine`` that never sees the x0 preview (``Observation.preview = None``): the feedback ablation.

    The schedule, the history and the progress information stay the same; the sampler is not changed (it still
    decodes the preview and records it in the trajectory, but the policy is not shown it).
    """

    def blind(observations: list[Observation]) -> list[str]:
        return refine([dataclasses.replace(o, preview=None) for o in observations])

    return blind


@dataclass
class PhaseTimes:
    """Wall-clock seconds spent in each phase of a rollout (summed over the batch)."""

    encode: float = 0.0
    denoise: float = 0.0
    preview: float = 0.0
    refine: float = 0.0
    decode: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class Trajectory:
    """The record of one row of a rollout."""

    query: str
    seed: int
    num_steps: int
    """Solver steps (``num_inference_steps``), as in :class:`Observation`."""
    decision_steps: list[int]
    """Sampler steps at which a new prompt took effect (sorted)."""
    timesteps: list[float]
    """Scheduler timestep at each decision step."""
    prompts: list[str]
    """Prompts in force, in order: ``prompts[0]`` before the first decision, ``prompts[k+1]`` after decision k."""
    raw_prompts: list[str]
    """What ``refine`` returned before fitting to the text budget (``raw_prompts[0]`` is the initial prompt)."""
    truncated: list[bool]
    """Whether ``prompts[k]`` had to be cut to the backbone's text budget."""
    previews: list[Optional[Image.Image]]
    """The preview shown at each decision step (``None`` where none was shown)."""
    step_prompt_index: list[int]
    """For each sampler step, the index into ``prompts`` of the prompt in force."""
    times: PhaseTimes = field(default_factory=PhaseTimes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (previews are left out; save them as images)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("previews", "times")}
        out["has_preview"] = [p is not None for p in self.previews]
        out["times"] = self.times.as_dict()
        return out


@dataclass
class RolloutOutput:
    """Final images and one :class:`Trajectory` per row."""

    images: torch.Tensor
    """``(B, 3, H, W)`` float in [0, 1], as ``pipe(..., output_type="pt")`` returns."""
    trajectories: list[Trajectory]
    times: PhaseTimes = field(default_factory=PhaseTimes)

    def pil(self) -> list[Image.Image]:
        arr = (self.images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
