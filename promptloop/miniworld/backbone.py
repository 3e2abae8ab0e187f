"""Backbone A's architecture: the real Stable Diffusion classes at mini-world size.

Design (see docs/miniworld.md): latent space through a small ``AutoencoderKL`` (32 px -> 4 x 8 x 8), a 2-layer
``CLIPTextModel``, and a ``UNet2DConditionModel`` with cross-attention plus ``addition_embed_type="text"``, which
attention-pools the prompt embeddings into the time embedding (global conditioning that the stock
``StableDiffusionPipeline`` feeds, as it needs only ``encoder_hidden_states``). The noise schedule is v-prediction
with zero terminal SNR and "trailing" timestep spacing, so that the first sampling step sees pure noise and the text,
not the noise's low frequencies, decides background and layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .domain import REFERENCE_SIZE


SHIPPED_BACKBONE_A = Path(__file__).resolve().parent / "assets" / "backbone_a"
"""The shipped backbone A: a ``StableDiffusionPipeline`` folder (UNet and VAE weights float16, loaded as float32).
Its evaluation table is ``backbone_a.eval.json`` beside it; how it was trained is in docs/miniworld.md."""


@dataclass
class BackboneSizes:
    """Widths of the three models."""

    vae_channels: tuple[int, ...] = (32, 64, 64)
    """``AutoencoderKL.block_out_channels``; the latent side is 32 / 2**(len - 1)."""
    latent_channels: int = 4
    """Latent channels of the VAE."""
    unet_channels: tuple[int, ...] = (32, 64, 64)
    """``UNet2DConditionModel.block_out_channels``; cross-attention in every block from ``unet_attention_from``
    to the last but one."""
    unet_attention_from: int = 0
    """Index of the first UNet block with cross-attention; 1 leaves the full-resolution block without attention,
    as SDXL does (at 16 x 16 latents attention there costs more than the rest of the UNet)."""
    text_hidden: int = 64
    """Hidden size of the text encoder (also the UNet's ``cross_attention_dim``)."""
    text_layers: int = 2
    """Transformer layers of the text encoder."""
    attention_head_dim: int = 8
    """Head width in the UNet's attention."""

    def __post_init__(self):
        self.vae_channels, self.unet_channels = tuple(self.vae_channels), tuple(self.unet_channels)
        if len(self.unet_channels) < 2:
            raise ValueError("unet_channels needs at least two blocks.")
        if not 0 <= self.unet_attention_from < len(self.unet_channels) - 1:
            raise ValueError(f"unet_attention_from must leave at least one block with cross-attention: 0 to "
                             f"{len(self.unet_channels) - 2} for {len(self.unet_channels)} blocks, "
                             f"got {self.unet_attention_from}.")
        if self.text_hidden % 4:
            raise ValueError(f"text_hidden must be a multiple of 4 (4 heads), got {self.text_hidden}.")

    @property
    def latent_size(self) -> int:
        return REFERENCE_SIZE // 2 ** (len(self.vae_channels) - 1)


TINY_SIZES = BackboneSizes(vae_channels=(8, 16), unet_channels=(16, 32), text_hidden=16, text_layers=1,
                           attention_head_dim=4)
"""Sizes for tests: seconds on one CPU core."""


def _groups(channels: tuple[int, ...]) -> int:
    return min(32, min(channels) // 2)


def build_vae(sizes: BackboneSizes) -> AutoencoderKL:
    n = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=sizes.latent_channels, layers_per_block=1,
        block_out_channels=sizes.vae_channels, norm_num_groups=_groups(sizes.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=REFERENCE_SIZE)


def build_text_encoder(sizes: BackboneSizes, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.text_hidden, intermediate_size=4 * sizes.text_hidden,
        num_hidden_layers=sizes.text_layers, num_attention_heads=4, projection_dim=sizes.text_hidden,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def build_unet(sizes: BackboneSizes) -> UNet2DConditionModel:
    n, first = len(sizes.unet_channels), sizes.unet_attention_from
    down = ("DownBlock2D",) * first + ("CrossAttnDownBlock2D",) * (n - 1 - first) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1 - first) + ("UpBlock2D",) * first
    return UNet2DConditionModel(
        sample_size=sizes.latent_size, in_channels=sizes.latent_channels, out_channels=sizes.latent_channels,
        layers_per_block=1, block_out_channels=sizes.unet_channels, down_block_types=down, up_block_types=up,
        norm_num_groups=_groups(sizes.unet_channels), cross_attention_dim=sizes.text_hidden,
        attention_head_dim=sizes.attention_head_dim, addition_embed_type="text",
        addition_embed_type_num_heads=4)


_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 prediction_type="v_prediction", rescale_betas_zero_snr=True, clip_sample=False)


def training_scheduler() -> DDPMScheduler:
    """The forward process used in training (adds noise, gives the v target)."""
    return DDPMScheduler(**_SCHEDULE)


def sampling_scheduler() -> DDIMScheduler:
    """The sampler shipped with the pipeline: DDIM, trailing spacing (first step at t = 999, where SNR = 0)."""
    return DDIMScheduler(**_SCHEDULE, timestep_spacing="trailing", set_alpha_to_one=False,
                         steps_offset=1)  # steps_offset only affects "leading" spacing; 1 silences a warning


def assemble_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                      unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """A stock ``StableDiffusionPipeline`` around the three models and ``sampling_scheduler()``."""
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
