"""Tiny random-weight Stable Diffusion / SDXL pipelines of the real diffusers classes (offline, deterministic).

Each builder returns a pipeline whose weights depend only on ``seed`` (the global RNG is left untouched), with
a CLIP tokenizer built in code. Save with ``pipe.save_pretrained(dir)`` and reload with the real
``from_pretrained``. Images are 64x64 by default (8x8 latents).
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizers import make_clip_tokenizer

SD_SCHEDULER_CONFIG: dict[str, Any] = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)


def _clip_config(tokenizer, hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim,
        hidden_act="gelu",
    )


def _tiny_vae() -> AutoencoderKL:
    """Four blocks, so ``vae_scale_factor`` is 8 as in the real models."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
    ).eval()


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """SD1.x-style (``epsilon``, DDIM) or SD2.x-style (``v_prediction``, Euler, linear attention projection)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}.")
    v_pred = prediction_type == "v_prediction"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = make_clip_tokenizer()
        text_encoder = CLIPTextModel(_clip_config(tokenizer)).eval()
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 4) if v_pred else 8, use_linear_projection=v_pred,
        ).eval()
        vae = _tiny_vae()
    if v_pred:
        scheduler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG, prediction_type="v_prediction",
                                           timestep_spacing="linspace", steps_offset=1)
    else:
        scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG, prediction_type="epsilon", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, turbo: bool = False) -> StableDiffusionXLPipeline:
    """SDXL-style pipeline (two CLIP encoders, pooled embeds, time ids; Euler).

    ``turbo=True`` gives an SDXL-turbo-style configuration: ``EulerAncestralDiscreteScheduler`` with trailing
    timestep spacing, meant for 1-4 steps at ``guidance_scale=0``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = make_clip_tokenizer()
        text_encoder = CLIPTextModel(_clip_config(tokenizer)).eval()
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer)).eval()
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64, norm_num_groups=32,
        ).eval()
        vae = _tiny_vae()
    if turbo:
        scheduler = EulerAncestralDiscreteScheduler(**SD_SCHEDULER_CONFIG, timestep_spacing="trailing",
                                                    steps_offset=1)
    else:
        scheduler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG, timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
