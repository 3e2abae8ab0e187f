"""SDXL (and few-step SDXL-turbo) as a step-wise backbone.

Replays ``StableDiffusionXLPipeline.__call__`` through the pipeline's own methods: two text encoders with the
pooled embedding of the second, ``_get_add_time_ids``, ``force_zeros_for_empty_prompt`` negatives, the
scheduler's begin index, and the VAE decode with its fp16 upcast and ``latents_mean``/``latents_std`` rules.
Turbo checkpoints run with ``guidance_scale=0`` (no CFG) and 1-4 steps; stochastic schedulers (EulerAncestral,
LCM) draw their step noise from the per-row generators, so batch invariance holds for them too.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from diffusers.utils.torch_utils import get_module_execution_device

from .base import PromptEmbeds, SamplerState, vae_decode_kwargs
from .stable_diffusion import COMMON_EXTRA_KEYS, StableDiffusionBackbone


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """Adapter for ``StableDiffusionXLPipeline``.

    ``SamplerSettings.extra`` accepts, besides ``guidance_rescale``, ``eta``, ``timesteps`` and ``sigmas``, the
    micro-conditioning ``original_size``, ``crops_coords_top_left`` and ``target_size`` (pipeline defaults:
    the image size and (0, 0)).
    """

    family: ClassVar[str] = "sdxl"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)
    default_guidance_scale: ClassVar[float] = 5.0
    extra_keys: ClassVar[tuple[str, ...]] = COMMON_EXTRA_KEYS + (
        "original_size", "crops_coords_top_left", "target_size",
    )

    @property
    def text_budget(self) -> int:
        """Content tokens of the first CLIP tokenizer (77 - BOS/EOS = 75); both encoders read the same prompt."""
        tokenizer = self.pipe.tokenizer if self.pipe.tokenizer is not None else self.pipe.tokenizer_2
        return tokenizer.model_max_length - 2

    def count_tokens(self, prompt: str) -> int:
        tokenizers = [t for t in (self.pipe.tokenizer, self.pipe.tokenizer_2) if t is not None]
        counts = []
        for tokenizer in tokenizers:
            text = self.pipe.maybe_convert_prompt(prompt, tokenizer)
            counts.append(len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids))
        return max(counts)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            lora_scale=self.lora_scale, clip_skip=self.clip_skip,
        )
        return PromptEmbeds({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled})

    def _negative_embeds(self, negatives: Optional[list[str]], batch: int) -> PromptEmbeds:
        _, negative, _, negative_pooled = self.pipe.encode_prompt(
            [""] * batch, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negatives, lora_scale=self.lora_scale, clip_skip=self.clip_skip,
        )
        return PromptEmbeds({"prompt_embeds": negative, "pooled_prompt_embeds": negative_pooled})

    def _embeds_dtype(self) -> torch.dtype:
        encoder = self.pipe.text_encoder_2
        return encoder.dtype if encoder is not None else self.pipe.unet.dtype

    def _default_size(self) -> tuple[int, int]:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    def _finish_prepare(self, state: SamplerState) -> None:
        pipe, extra = self.pipe, state.settings.extra
        size = (state.extras["height"], state.extras["width"])
        if pipe.text_encoder_2 is None:
            projection_dim = int(self.encode_prompts([""]).tensors["pooled_prompt_embeds"].shape[-1])
        else:
            projection_dim = pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids(
            tuple(extra.get("original_size", size)), tuple(extra.get("crops_coords_top_left", (0, 0))),
            tuple(extra.get("target_size", size)), dtype=self._embeds_dtype(),
            text_encoder_projection_dim=projection_dim,
        )
        state.extras["add_time_ids"] = time_ids.to(self.device)
        if hasattr(state.scheduler, "set_begin_index"):
            state.scheduler.set_begin_index(0)

    def _unet_conditioning(
        self, state: SamplerState, embeds: PromptEmbeds
    ) -> tuple[torch.Tensor, Optional[dict[str, torch.Tensor]]]:
        batch = len(embeds)
        cond, pooled = embeds.tensors["prompt_embeds"], embeds.tensors["pooled_prompt_embeds"]
        time_ids = state.extras["add_time_ids"].repeat(batch, 1)
        if state.extras["do_cfg"]:
            negative = state.negative.tensors
            cond = torch.cat([negative["prompt_embeds"], cond])
            pooled = torch.cat([negative["pooled_prompt_embeds"], pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return cond, {"text_embeds": pooled, "time_ids": time_ids}

    def _vae_decode(self, latents: torch.Tensor, generators: Optional[list[torch.Generator]]) -> torch.Tensor:
        vae = self.pipe.vae
        needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
        if needs_upcasting:
            vae.to(dtype=torch.float32)
            latents = latents.to(torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        try:
            return vae.decode(latents.to(self._vae_device(), vae.dtype), return_dict=False,
                              **vae_decode_kwargs(vae, generators))[0]
        finally:
            if needs_upcasting:
                vae.to(dtype=torch.float16)

    def _vae_device(self) -> torch.device:
        return get_module_execution_device(self.pipe.vae)

    def _postprocess(self, images: torch.Tensor) -> torch.Tensor:
        if getattr(self.pipe, "watermark", None) is not None:
            images = self.pipe.watermark.apply_watermark(images)
        return self.pipe.image_processor.postprocess(images, output_type="pt")
