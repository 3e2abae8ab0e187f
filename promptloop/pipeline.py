"""Inference API: a trained policy plus any supported diffusers pipeline, called like a pipeline."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .backbones import Backbone, RefinementSchedule, SamplerSettings, auto_backbone, rollout
from .backbones.types import RolloutOutput, Trajectory, blind_observations, negative_prompt_rows
from .policy import PromptActions, PromptPolicy, PromptWriter, VLLMPromptPolicy

RefinementMode = Literal["closed", "apriori", "oneshot", "none"]
REFINEMENT_MODES = ("closed", "apriori", "oneshot", "none")
POLICY_BACKENDS = ("transformers", "vllm")
OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class PromptLoopOutput:
    """Final images and one trajectory per image (prompts in force, previews, timings)."""

    images: Union[list[Image.Image], np.ndarray, torch.Tensor]
    """As ``output_type`` asks: PIL images, a ``(B, H, W, 3)`` float32 array or a ``(B, 3, H, W)`` tensor in [0, 1]."""
    trajectories: list[Trajectory]
    rollout: RolloutOutput


@contextlib.contextmanager
def policy_mode(policy: PromptWriter, mode: str) -> Iterator[PromptWriter]:
    """Temporarily switch the policy's chat mode ("closed", "oneshot", "apriori")."""
    previous = policy.config.mode
    policy.config.mode = mode
    try:
        yield policy
    finally:
        policy.config.mode = previous


def blind_actions(policy: PromptWriter, mode: str, queries: Sequence[str], num_refinements: int, num_steps: int,
                  seed: Optional[int] = None, image_seeds: Optional[Sequence[int]] = None) -> PromptActions:
    """One ``mode`` policy call for the whole batch before sampling (no image). ``seed`` seeds the call; with
    ``image_seeds`` (one per query) row i's answer is drawn from ``image_row_seed(seed, image_seeds[i], 0)``, the
    same in any batch (:meth:`~promptloop.policy.PromptWriter.act_per_image`)."""
    observations = blind_observations(list(queries), num_refinements, num_steps)
    with policy_mode(policy, mode):
        if image_seeds is None:
            return policy.act(observations, seed=seed)
        return policy.act_per_image(observations, image_seeds, seed)


def apriori_prompts(
    policy: PromptWriter, queries: Sequence[str], num_refinements: int, num_steps: int, seed: Optional[int] = None,
    image_seeds: Optional[Sequence[int]] = None,
) -> list[list[str]]:
    """One policy call for the whole batch: each row's N_R + 1 prompts (the query, then the written schedule);
    ``seed`` and ``image_seeds`` as in :func:`blind_actions`."""
    actions = blind_actions(policy, "apriori", queries, num_refinements, num_steps, seed, image_seeds)
    return [[q] + list(s.prompts) for q, s in zip(queries, actions.schedules)]


def oneshot_prompts(
    policy: PromptWriter, queries: Sequence[str], num_steps: int, seed: Optional[int] = None,
    image_seeds: Optional[Sequence[int]] = None,
) -> list[str]:
    """One rewrite per query before sampling, without an image (the feed-forward rewriter baseline); ``seed`` and
    ``image_seeds`` as in :func:`blind_actions`."""
    return blind_actions(policy, "oneshot", queries, 0, num_steps, seed, image_seeds).prompts


def seeds_from_generators(generator: Union[torch.Generator, Sequence[torch.Generator]], num_images: int) -> list[int]:
    """One seed per image drawn from ``generator`` (one generator for all images, or one per image)."""
    generators = [generator] * num_images if isinstance(generator, torch.Generator) else list(generator)
    if len(generators) != num_images or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(f"generator must be a torch.Generator or a list of {num_images} (one per image), got "
                         f"{generator!r}.")
    return [int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device)) for g in generators]


class PromptLoopPipeline:
    """``PromptLoopPipeline(policy, pipe)(prompts)``: sample with the policy rewriting the prompt.

    ``policy`` is a :class:`~promptloop.policy.PromptPolicy` (transformers) or a
    :class:`~promptloop.policy.VLLMPromptPolicy` (vLLM); ``pipe`` is any supported diffusers pipeline object the user
    loaded (LoRAs, fine-tuned weights, scheduler, dtype, device and offload stay in effect) or a
    :class:`~promptloop.backbones.Backbone`.
    """

    def __init__(self, policy: PromptWriter, pipe: Any, preview_decoder: Optional[torch.nn.Module] = None):
        if not isinstance(policy, PromptWriter):
            raise TypeError(f"policy must be a PromptPolicy or a VLLMPromptPolicy, got {type(policy).__name__}; load "
                            "one with PromptPolicy.from_pretrained(path).")
        self.policy = policy
        self.backbone = pipe if isinstance(pipe, Backbone) else auto_backbone(pipe, preview_decoder=preview_decoder)

    @classmethod
    def from_pretrained(
        cls, policy_path: str, pipe_or_path: Any, device: Optional[str] = None, *,
        policy_backend: str = "transformers", policy_revision: Optional[str] = None,
        token: Union[str, bool, None] = None, cache_dir: Union[str, os.PathLike, None] = None,
        local_files_only: bool = False, **pipeline_kwargs: Any
    ) -> "PromptLoopPipeline":
        """Load a saved policy (folder or hub id, at ``policy_revision``) and wrap ``pipe_or_path`` (a pipeline object,
        a local folder or a hub id).

        ``device`` places the policy, and a pipeline loaded here from a path (a pipeline object stays where the user
        put it: devices, offload). ``policy_backend``: "transformers" (:class:`PromptPolicy`) or "vllm"
        (:class:`VLLMPromptPolicy` with its default engine settings; build one yourself to pass engine arguments).
        ``token``, ``cache_dir`` and ``local_files_only`` apply to every hub download (policy, its base model, and a
        pipeline loaded here); ``pipeline_kwargs`` go to the diffusers ``from_pretrained`` (``dtype``, ``revision``
        of the pipeline, ...).
        """
        if policy_backend not in POLICY_BACKENDS:
            raise ValueError(f"policy_backend={policy_backend!r} is not one of {POLICY_BACKENDS}.")
        download: dict[str, Any] = {key: value for key, value in dict(
            token=token, cache_dir=cache_dir, local_files_only=local_files_only or None).items() if value is not None}
        if policy_backend == "vllm":
            policy: PromptWriter = VLLMPromptPolicy.from_pretrained(policy_path, revision=policy_revision, **download)
        else:
            policy = PromptPolicy.from_pretrained(policy_path, device=device, is_trainable=False,
                                                  revision=policy_revision, **download)
        loads_pipeline = isinstance(pipe_or_path, (str, os.PathLike))
        backbone = auto_backbone(pipe_or_path, **(download if loads_pipeline else {}), **pipeline_kwargs)
        if device is not None and loads_pipeline:
            backbone.pipe.to(device)
        return cls(policy, backbone)

    def to(self, device: Union[str, torch.device]) -> "PromptLoopPipeline":
        """Move the diffusion pipeline and a transformers policy to ``device`` (a vLLM engine stays where it runs);
        returns ``self``, as diffusers' ``pipe.to`` does."""
        self.backbone.pipe.to(device)
        if isinstance(self.policy, PromptPolicy):
            self.policy.model.to(device)
        return self

    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        *,
        num_refinements: Optional[int] = None,
        mode: Optional[RefinementMode] = None,
        seed: Union[int, Sequence[int], None] = None,
        policy_seed: Optional[int] = None,
        generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
        num_inference_steps: int = 50,
        guidance_scale: Optional[float] = None,
        negative_prompt: Union[str, Sequence[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        preview_size: Optional[int] = 256,
        feedback_delay: int = 0,
        initial_rewrite: Optional[bool] = None,
        num_images_per_prompt: int = 1,
        output_type: Literal["pil", "np", "pt"] = "pil",
        progress: bool = False,
        **extra: Any,
    ) -> PromptLoopOutput:
        """Sample ``num_images_per_prompt`` images per prompt (in prompt order, as diffusers does), all in one batch.

        ``mode``: "closed" (the policy sees the x0 preview at ``num_refinements`` evenly spaced steps), "apriori"
        (one policy call writes all prompts up front; the sampler runs uninterrupted), "oneshot" (one rewrite before
        sampling), "none" (plain sampling). ``seed``: one int for the batch (image i uses seed + i) or one per image;
        the same seeds give the same images (default 0). ``generator`` (as in diffusers; instead of ``seed``): one
        ``torch.Generator`` for the batch or one per image, from which the images' seeds are drawn. ``policy_seed``
        (default 0) and each image's seed seed the policy's sampling for that image, so an image's prompts and
        pixels depend on its own seed, not on the batch it is in. ``negative_prompt``: one str for all images, or
        one per prompt (each prompt's images share it), as in diffusers. ``output_type``: "pil" (a list of PIL
        images), "np" (a ``(B, H, W, 3)`` float32 array in [0, 1]) or "pt" (a ``(B, 3, H, W)`` tensor in [0, 1]).
        ``feedback_delay`` (closed mode): pipelined feedback, the prompt taking effect at step k is written from the
        preview of step k - 1 - d while the sampler goes on (see :func:`~promptloop.backbones.rollout`).
        ``initial_rewrite`` (closed mode): the policy also writes the prompt for step 0, before any preview exists,
        on top of the ``num_refinements`` (for policies trained with ``grpo.initial_rewrite``).
        Unset, ``mode`` is the policy's own (``policy.config.mode``: "closed" unless it was trained as a one-shot
        or a-priori writer), and ``num_refinements`` and ``initial_rewrite`` take the values the policy was trained
        with (its ``loop_config.json``, written by the trainer), else 5 and False.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}.")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        queries = [query for query in prompts for _ in range(num_images_per_prompt)]
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            negative_prompt = [negative for negative in negative_prompt_rows(negative_prompt, len(prompts))
                               for _ in range(num_images_per_prompt)]
        mode = self.policy.config.mode if mode is None else mode
        if mode not in REFINEMENT_MODES:
            raise ValueError(f"mode={mode!r} is not one of {REFINEMENT_MODES}.")
        trained = self.policy.loop_defaults
        if num_refinements is None:
            num_refinements = trained.num_refinements if trained is not None else 5
        if initial_rewrite is None:
            initial_rewrite = mode == "closed" and trained is not None and trained.initial_rewrite
        if not isinstance(num_refinements, int) or num_refinements < 0:
            raise ValueError(f"num_refinements must be an int >= 0, got {num_refinements!r}.")
        if mode in ("oneshot", "none"):
            num_refinements = 0
        elif num_refinements == 0 and not (mode == "closed" and initial_rewrite):
            mode = "none"
        if generator is not None:
            if seed is not None:
                raise ValueError("Give seed or generator, not both.")
            seeds = seeds_from_generators(generator, len(queries))
        else:
            seed = 0 if seed is None else seed
            seeds = [seed + i for i in range(len(queries))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(queries):
            raise ValueError(f"seed holds {len(seeds)} values for {len(queries)} images (prompts x "
                             "num_images_per_prompt): give one seed per image, or one int for all.")
        settings = SamplerSettings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            height=height, width=width, preview_size=preview_size, extra=dict(extra),
        )
        for name, value in (("feedback_delay", feedback_delay), ("initial_rewrite", initial_rewrite)):
            if value and mode != "closed":
                raise ValueError(f"{name}={value} applies to mode 'closed' only (mode is {mode!r}); leave it unset.")
        if num_refinements or initial_rewrite:
            schedule = RefinementSchedule.uniform(num_refinements, initial_rewrite)
        else:
            schedule = RefinementSchedule.none()
        schedule.steps(num_inference_steps)  # clear error before the policy runs
        kwargs: dict[str, Any] = dict(settings=settings, schedule=schedule, progress=progress)
        if mode == "closed":
            with policy_mode(self.policy, "closed"):
                refine = self.policy.as_refine_fn(seed=policy_seed, image_seeds=seeds)
                out = rollout(self.backbone, queries, seeds, refine=refine, feedback_delay=feedback_delay, **kwargs)
        elif mode == "apriori":
            prompts = apriori_prompts(self.policy, queries, num_refinements, num_inference_steps, seed=policy_seed,
                                      image_seeds=seeds)
            out = rollout(self.backbone, queries, seeds, prompts=prompts, **kwargs)
        elif mode == "oneshot":
            initial = oneshot_prompts(self.policy, queries, num_inference_steps, seed=policy_seed, image_seeds=seeds)
            out = rollout(self.backbone, queries, seeds, initial_prompts=initial, **kwargs)
        else:
            out = rollout(self.backbone, queries, seeds, **kwargs)
        if output_type == "pil":
            images = out.pil()
        elif output_type == "np":
            images = out.images.permute(0, 2, 3, 1).float().cpu().numpy()
        else:
            images = out.images
        return PromptLoopOutput(images=images, trajectories=out.trajectories, rollout=out)
