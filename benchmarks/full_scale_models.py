"""Random-weight models built from the REAL full-size configs (no hub access): SDXL base 1.0 and Qwen2.5-VL-3B.

Values are those of the published config files (stabilityai/stable-diffusion-xl-base-1.0 and
Qwen/Qwen2.5-VL-3B-Instruct). Speed and memory depend on shapes, not on the values of the weights, so these
give the cost of the real models. The policy's tokenizer is the small byte-level one from
``promptloop.testing.tiny_vlm``; the model keeps the real 151936-entry vocabulary (logits cost the same) and the
ids the tokenizer does not have are suppressed in generation.
"""
from __future__ import annotations

import torch

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
SDXL_TEXT_1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")

QWEN25_VL_3B_TEXT = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
QWEN25_VL_3B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu", in_chans=3,
)


def sdxl_pipeline(tokenizer, device: str, dtype: torch.dtype):
    """A StableDiffusionXLPipeline with SDXL-base-1.0 shapes and random weights, on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_1, **ids))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2, **ids))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER))
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen25_vl_3b(processor, device: str, dtype: torch.dtype):
    """A Qwen2_5_VLForConditionalGeneration with Qwen2.5-VL-3B shapes, random weights, special-token ids taken
    from ``processor.tokenizer``; every id the tokenizer lacks is suppressed in generation."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = processor.tokenizer
    special = {name: tok.convert_tokens_to_ids(name) for name in
               ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>")}
    text = dict(QWEN25_VL_3B_TEXT, eos_token_id=special["<|im_end|>"], pad_token_id=tok.pad_token_id,
                bos_token_id=None)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=QWEN25_VL_3B_VISION,
                           image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
                           vision_start_token_id=special["<|vision_start|>"],
                           vision_end_token_id=special["<|vision_end|>"])
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.to(dtype=dtype).eval()
    unknown = list(range(len(tok), cfg.text_config.vocab_size))
    suppress = list(model.generation_config.suppress_tokens or []) + unknown
    model.generation_config.suppress_tokens = suppress
    return model
