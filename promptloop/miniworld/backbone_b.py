"""Backbone B's architecture: the real Stable Diffusion 3 classes at mini-world size.

B is the backbone a policy trained on backbone A is applied to without retraining (the generalisation claim), so it
differs from A wherever it can while reading the same prompts and drawing the same world: an MMDiT
(``SD3Transformer2DModel``) instead of a UNet, flow matching (``FlowMatchEulerDiscreteScheduler``, velocity
``noise - x0``) instead of v-prediction DDIM, two ``CLIPTextModelWithProjection`` encoders (penultimate hidden states
as the sequence, projected EOS states as the pooled vector, as in SD3) and no T5 (``text_encoder_3=None``: the
pipeline feeds ``max_sequence_length`` zero tokens in its place). Only the VAE is shared: A's, frozen, so B's
latents are A's (a new copy with ``shift_factor = 0.0``, which SD3 pipelines read).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
    StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from .backbone import SHIPPED_BACKBONE_A

SHIPPED_BACKBONE_B = Path(__file__).resolve().parent / "assets" / "backbone_b"
"""The shipped backbone B: a ``StableDiffusion3Pipeline`` folder (transformer and VAE weights float16, loaded as
float32). Its evaluation table is ``backbone_b.eval.json`` beside it; how it was trained is in docs/miniworld.md."""

T5_SEQUENCE_LENGTH = 256
"""Zero T5 tokens the pipeline appends when ``text_encoder_3`` is None: the ``max_sequence_length`` default of
``StableDiffusion3Pipeline.__call__`` and of ``promptloop.backbones.SD3Backbone``. Training uses the same number, so
the transformer sees at training time exactly the sequence it sees when sampled."""


@dataclass
class BackboneBSizes:
    """Widths of the transformer and the two text encoders."""

    latent_channels: int = 4
    """Channels of the (shared, backbone A's) VAE latent."""
    latent_size: int = 8
    """Side of the latent (32 px / vae_scale_factor 4)."""
    patch_size: int = 1
    """Transformer patch size (1: one token per latent cell)."""
    num_layers: int = 4
    """MMDiT blocks."""
    num_heads: int = 4
    """Attention heads; the width is ``num_heads * head_dim``."""
    head_dim: int = 24
    """Width of one head."""
    text_hidden: tuple[int, int] = (48, 64)
    """Hidden sizes of text encoders 1 and 2 (also their projection sizes)."""
    text_layers: int = 3
    """Layers of each text encoder (the sequence embeddings are the penultimate layer's)."""

    def __post_init__(self):
        self.text_hidden = tuple(self.text_hidden)
        if self.latent_size % self.patch_size:
            raise ValueError(f"latent_size {self.latent_size} must be a multiple of patch_size {self.patch_size}.")
        if len(self.text_hidden) != 2 or any(h % 4 for h in self.text_hidden):
            raise ValueError(f"text_hidden must be two multiples of 4 (4 heads each), got {self.text_hidden}.")
        if self.text_layers < 2:
            raise ValueError("text_layers must be at least 2 (SD3 reads the penultimate layer).")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def joint_attention_dim(self) -> int:
        """Width of the prompt sequence: both CLIP widths side by side (the T5 part is the same width, zeros)."""
        return sum(self.text_hidden)


TINY_SIZES_B = BackboneBSizes(patch_size=2, num_layers=2, num_heads=2, head_dim=8, text_hidden=(8, 12), text_layers=2)
"""Sizes for tests: well under a second per step on one CPU core."""


def build_transformer(sizes: BackboneBSizes) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=sizes.latent_size, patch_size=sizes.patch_size, in_channels=sizes.latent_channels,
        out_channels=sizes.latent_channels, num_layers=sizes.num_layers, attention_head_dim=sizes.head_dim,
        num_attention_heads=sizes.num_heads, joint_attention_dim=sizes.joint_attention_dim,
        caption_projection_dim=sizes.width, pooled_projection_dim=sizes.joint_attention_dim,
        pos_embed_max_size=sizes.latent_size // sizes.patch_size)


def build_text_encoders(sizes: BackboneBSizes, tokenizer: CLIPTokenizer) -> list[CLIPTextModelWithProjection]:
    return [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=sizes.text_layers, num_attention_heads=4, projection_dim=hidden,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)) for hidden in sizes.text_hidden]


FLOW_SHIFT = 3.0
"""Timestep shift of the schedule (SD3's value): more of the sampling steps and of training at high noise, where
the text decides the global layout."""


def flow_scheduler(shift: float = FLOW_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """The sampler shipped with the pipeline (its ``shift`` also shapes the training noise levels)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def vae_latent_shape(pipeline_dir: str | Path = SHIPPED_BACKBONE_A) -> tuple[int, int]:
    """``(channels, side)`` of the latents of a saved backbone A's VAE, read from its config (nothing loads)."""
    config = json.loads((Path(pipeline_dir) / "vae" / "config.json").read_text())
    return config["latent_channels"], config["sample_size"] // 2 ** (len(config["block_out_channels"]) - 1)


def load_frozen_vae(pipeline_dir: str | Path = SHIPPED_BACKBONE_A) -> AutoencoderKL:
    """Backbone A's VAE (float32, no gradients) with ``shift_factor = 0.0`` and A's ``scaling_factor``."""
    vae = AutoencoderKL.from_pretrained(Path(pipeline_dir) / "vae", torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def assemble_sd3_pipeline(vae: AutoencoderKL, text_encoders: list[CLIPTextModelWithProjection],
                          tokenizer: CLIPTokenizer, transformer: SD3Transformer2DModel,
                          shift: float = FLOW_SHIFT) -> StableDiffusion3Pipeline:
    """A stock ``StableDiffusion3Pipeline`` (no T5) around the models; both CLIP encoders share ``tokenizer``."""
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(shift), vae=vae, text_encoder=text_encoders[0],
        tokenizer=tokenizer, text_encoder_2=text_encoders[1], tokenizer_2=tokenizer, text_encoder_3=None,
        tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_prompt_ids(text_encoders: list[CLIPTextModelWithProjection], ids: torch.Tensor,
                      t5_tokens: int = T5_SEQUENCE_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) of token ids, as ``StableDiffusion3Pipeline.encode_prompt`` builds them
    without T5: penultimate hidden states of both encoders side by side, then ``t5_tokens`` zero tokens; the pooled
    vector is both projections side by side. Differentiable (training calls it); ``ids`` (B, L) from either tokenizer.
    """
    sequence, pooled = [], []
    for encoder in text_encoders:
        out = encoder(ids, output_hidden_states=True)
        sequence.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(sequence, dim=-1)
    zeros = clip.new_zeros(clip.shape[0], t5_tokens, clip.shape[-1])
    return torch.cat([clip, zeros], dim=1), torch.cat(pooled, dim=-1)


NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}
"""Loader arguments for a folder saved without T5: diffusers 0.42.1 records ``text_encoder_3``/``tokenizer_3`` as
null but does not load such a folder unless they are passed as None, e.g.
``StableDiffusion3Pipeline.from_pretrained(SHIPPED_BACKBONE_B, **NO_T5)`` (``promptloop.backbones.auto_backbone(path)``
passes them itself)."""
