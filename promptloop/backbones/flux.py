"""FLUX.1 (``FluxPipeline``) as a step-wise backbone.

The loop reproduces ``FluxPipeline.__call__`` with the pipeline's own methods (``encode_prompt``,
``prepare_latents`` with its 2x2 packing and latent image ids, ``calculate_shift``/``retrieve_timesteps``) on a
private copy of its scheduler. Latents and x0 estimates stay packed ``(B, h/2 * w/2, 4C)`` as the transformer
sees them; :meth:`FluxBackbone.decode` unpacks them with the pipeline's ``_unpack_latents`` for the image size of
the latest :meth:`FluxBackbone.prepare`. Not supported: IP-Adapter and per-encoder prompts (``prompt_2``).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from .base import PromptEmbeds, SamplerState, StepResult
from .sd3 import FlowMatchingBackbone
from .types import SamplerSettings, negative_prompt_rows


class FluxBackbone(FlowMatchingBackbone):
    """``FluxPipeline``: FLUX.1-dev (guidance embedding) and FLUX.1-schnell (none); pooled CLIP + T5 embeddings.

    ``SamplerSettings``: ``guidance_scale`` is the distilled guidance fed to the guidance embedding (default
    3.5, ignored by schnell); ``height``/``width`` default to 1024. ``extra``: ``true_cfg_scale`` (true
    classifier-free guidance against ``negative_prompt``, on when > 1 and a negative prompt is given, as in the
    pipeline), ``sigmas`` (custom schedule; ``mu`` is always computed from the image size like the pipeline).
    """

    family = "flux"
    pipeline_class_names = ("FluxPipeline",)
    extra_keys = frozenset({"sigmas", "true_cfg_scale"})
    default_guidance_scale = 3.5

    def __init__(self, pipe: Any, **kwargs: Any):
        missing = [name for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is None]
        if missing:
            raise ValueError(f"FluxBackbone needs the pipeline's CLIP and T5 text encoders to re-encode prompts; "
                             f"{missing} is None.")
        super().__init__(pipe, **kwargs)
        self._image_size: Optional[tuple[int, int]] = None

    @property
    def has_guidance_embedding(self) -> bool:
        """True for FLUX.1-dev-style transformers, False for schnell."""
        return bool(self.pipe.transformer.config.guidance_embeds)

    def default_max_sequence_length(self) -> int:
        """512 for dev (the pipeline's default), 256 for schnell (its model card and training length)."""
        return 512 if self.has_guidance_embedding else 256

    @property
    def primary_tokenizer(self) -> Any:
        return self.pipe.tokenizer_2

    @property
    def primary_max_length(self) -> int:
        return self.max_sequence_length

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length,
            lora_scale=self.lora_scale,
        )
        return PromptEmbeds({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled})

    @torch.no_grad()
    def prepare(self, settings: SamplerSettings, generators: list[torch.Generator]) -> SamplerState:
        self._check_settings(settings)
        pipe, device, batch = self.pipe, self.device, len(generators)
        height = settings.height or pipe.default_sample_size * pipe.vae_scale_factor
        width = settings.width or pipe.default_sample_size * pipe.vae_scale_factor
        guidance_scale = (settings.guidance_scale if settings.guidance_scale is not None
                          else self.default_guidance_scale)
        true_cfg_scale = settings.extra.get("true_cfg_scale", 1.0)
        embeds_dtype = pipe.text_encoder_2.dtype  # encode_prompt returns T5 embeddings in T5's dtype
        latents, image_ids = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, height, width,
                                                  embeds_dtype, device, list(generators))
        scheduler = copy.deepcopy(pipe.scheduler)
        steps = settings.num_inference_steps
        sigmas = settings.extra.get("sigmas")
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            latents.shape[1],
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        guidance = None
        if self.has_guidance_embedding:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)
        negatives = negative_prompt_rows(settings.negative_prompt, batch)
        negative = self.encode_prompts(negatives) if true_cfg_scale > 1 and negatives is not None else None
        text_ids_dtype = pipe.text_encoder.dtype
        extras = {
            "image_ids": image_ids,
            "text_ids": torch.zeros(self.max_sequence_length, 3, device=device, dtype=text_ids_dtype),
            "guidance": guidance,
            "true_cfg_scale": true_cfg_scale,
        }
        self._image_size = (height, width)
        return SamplerState(latents=latents, timesteps=timesteps, scheduler=scheduler, settings=settings,
                            guidance_scale=guidance_scale, negative=negative, extras=extras)

    @torch.no_grad()
    def step(self, state: SamplerState, i: int, embeds: PromptEmbeds) -> StepResult:
        transformer, latents = self.pipe.transformer, state.latents
        timestep = state.timesteps[i].expand(latents.shape[0]).to(latents.dtype)
        shared = dict(hidden_states=latents, timestep=timestep / 1000, guidance=state.extras["guidance"],
                      txt_ids=state.extras["text_ids"], img_ids=state.extras["image_ids"],
                      joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False)
        with transformer.cache_context("cond"):
            velocity = transformer(encoder_hidden_states=embeds.tensors["prompt_embeds"],
                                   pooled_projections=embeds.tensors["pooled_prompt_embeds"], **shared)[0]
        if state.negative is not None:
            with transformer.cache_context("uncond"):
                negative = transformer(encoder_hidden_states=state.negative.tensors["prompt_embeds"],
                                       pooled_projections=state.negative.tensors["pooled_prompt_embeds"], **shared)[0]
            velocity = negative + state.extras["true_cfg_scale"] * (velocity - negative)
        return self._flow_step(state, i, velocity)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed ``(B, N, 4C)`` -> ``(B, C, h, w)`` for the size of the latest :meth:`prepare`; 4-D latents
        pass through unchanged."""
        if latents.ndim == 4:
            return latents
        if self._image_size is None:
            raise ValueError("FluxBackbone.decode got packed latents before any prepare(); the image size needed "
                             "to unpack them is set by prepare(), or pass unpacked (B, C, h, w) latents.")
        height, width = self._image_size
        factor = self.pipe.vae_scale_factor
        expected = (height // (factor * 2)) * (width // (factor * 2))
        if latents.ndim != 3 or latents.shape[1] != expected:
            raise ValueError(f"Expected packed latents (B, {expected}, C) for a {height}x{width} image (the latest "
                             f"prepare()), got shape {tuple(latents.shape)}.")
        return self.pipe._unpack_latents(latents, height, width, factor)
