"""Tiny random-weight SD3 / SD3.5 and FLUX.1 pipelines of the real diffusers classes, built offline.

Each builder is deterministic given ``seed`` (it does not touch torch's global RNG) and returns a pipeline whose
``save_pretrained`` folder reloads through the real ``from_pretrained``. Schedulers and VAE factors use the
published configs of the real checkpoints; only the widths and depths are tiny. Images default to 64 x 64
(8 x 8 latents). :func:`run_steps` drives a backbone step by step for tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ..backbones.base import Backbone
from ..backbones.types import SamplerSettings
from .tokenizers import make_clip_tokenizer, make_t5_tokenizer

CLIP_HIDDEN = 32
"""Hidden size (and projection size) of every tiny CLIP text encoder."""
FLUX_T5_DIM = 32
SD3_T5_DIM = 2 * CLIP_HIDDEN
"""SD3 pads the concatenated CLIP embeddings to the T5 width, so T5 must be at least as wide as both CLIPs."""


def _clip_config(vocab_size: int, bos: int, eos: int, pad: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CLIP_HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        projection_dim=CLIP_HIDDEN, hidden_act="gelu",
    )


def _t5_encoder(vocab_size: int, d_model: int) -> T5EncoderModel:
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A 4-block (8x downsampling) KL autoencoder without quant convs, like the SD3 and FLUX VAEs."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, norm_num_groups=8, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def make_tiny_preview_decoder(
    seed: int = 0, latent_channels: int = 16, scaling_factor: float = 1.5305, shift_factor: float = 0.0609
) -> AutoencoderTiny:
    """A tiny ``AutoencoderTiny`` (8x upsampling) usable as a backbone's ``preview_decoder``; the factors default
    to the SD3 VAE's, as in the taesd3 config."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderTiny(
            latent_channels=latent_channels, encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
            num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4, scaling_factor=scaling_factor,
            shift_factor=shift_factor,
        ).eval()


def make_tiny_sd3_pipeline(
    seed: int = 0, variant: Literal["sd3", "sd3.5"] = "sd3", with_t5: bool = True
) -> StableDiffusion3Pipeline:
    """A tiny ``StableDiffusion3Pipeline``.

    ``variant="sd3.5"`` adds what SD3.5 changed in the transformer (RMS q/k norm, one dual-attention layer as in
    SD3.5-Medium). ``with_t5=False`` leaves ``text_encoder_3``/``tokenizer_3`` out, as users do to save memory.
    """
    if variant not in ("sd3", "sd3.5"):
        raise ValueError(f"variant must be 'sd3' or 'sd3.5', got {variant!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = make_clip_tokenizer()
        ids = dict(vocab_size=len(tokenizer), bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                   pad=tokenizer.pad_token_id)
        text_encoder = CLIPTextModelWithProjection(_clip_config(**ids)).eval()
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(**ids)).eval()
        tokenizer_3 = make_t5_tokenizer() if with_t5 else None
        text_encoder_3 = _t5_encoder(len(tokenizer_3), SD3_T5_DIM) if with_t5 else None
        sd35 = variant == "sd3.5"
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=SD3_T5_DIM,
            pooled_projection_dim=2 * CLIP_HIDDEN, pos_embed_max_size=16,
            qk_norm="rms_norm" if sd35 else None, dual_attention_layers=(0,) if sd35 else (),
        ).eval()
        vae = _vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_flux_pipeline(seed: int = 0, variant: Literal["dev", "schnell"] = "dev") -> FluxPipeline:
    """A tiny ``FluxPipeline``: ``"dev"`` has the guidance embedding and dynamic (resolution-dependent) shifting,
    ``"schnell"`` has neither, as in the released checkpoints."""
    if variant not in ("dev", "schnell"):
        raise ValueError(f"variant must be 'dev' or 'schnell', got {variant!r}.")
    dev = variant == "dev"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = make_clip_tokenizer()
        text_encoder = CLIPTextModel(_clip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                  tokenizer.pad_token_id)).eval()
        tokenizer_2 = make_t5_tokenizer()
        text_encoder_2 = _t5_encoder(len(tokenizer_2), FLUX_T5_DIM)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=FLUX_T5_DIM, pooled_projection_dim=CLIP_HIDDEN,
            guidance_embeds=dev, axes_dims_rope=(4, 4, 8),
        ).eval()
        vae = _vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    if dev:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class StepTrace:
    """What :func:`run_steps` recorded."""

    latents: list[torch.Tensor]
    """``latents[i]`` is x_t before step ``i``; the last entry is the final latent."""
    x0: list[torch.Tensor]
    """The x0 estimate each step returned."""
    sigmas: list[float]
    """``sigmas[i]`` is the noise level before step ``i``; the last entry is the terminal sigma (0 here)."""
    images: torch.Tensor
    """The final latent decoded as the pipeline decodes it."""


def run_steps(
    backbone: Backbone,
    prompts: list[str],
    seeds: list[int],
    settings: SamplerSettings,
    switches: Optional[dict[int, list[str]]] = None,
) -> StepTrace:
    """Drive a backbone's ``prepare``/``step``/``decode`` directly, one CPU generator per row;
    ``switches[k]`` replaces every row's prompt from step ``k`` on."""
    switches = switches or {}
    state = backbone.prepare(settings, [torch.Generator("cpu").manual_seed(s) for s in seeds])
    embeds = backbone.encode_prompts(prompts)
    trace = StepTrace(latents=[state.latents], x0=[], sigmas=[], images=torch.empty(0))
    for i in range(state.num_steps):
        if i in switches:
            embeds = backbone.encode_prompts(switches[i])
        trace.sigmas.append(backbone.noise_level(state, i))
        result = backbone.step(state, i, embeds)
        trace.latents.append(result.latents)
        trace.x0.append(result.x0)
    trace.sigmas.append(float(state.scheduler.sigmas[state.num_steps]))
    trace.images = backbone.decode(state.latents)
    return trace
