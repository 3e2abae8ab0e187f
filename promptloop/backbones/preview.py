"""Helpers that turn x0 latents into the small preview images shown to ``refine``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image


def resize_longest_side(images: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """Resize ``(B, 3, H, W)`` images so that the longest side is ``size`` (antialiased); ``None`` keeps them."""
    if size is None:
        return images
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"preview_size must be a positive int or None, got {size!r}.")
    h, w = images.shape[-2:]
    if max(h, w) == size:
        return images
    scale = size / max(h, w)
    new_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(images.float(), size=new_hw, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def decode_with_tiny_autoencoder(decoder: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Decode the denoiser's latents with a preview decoder such as diffusers' ``AutoencoderTiny``.

    The latents are unscaled with the decoder's own ``scaling_factor`` / ``shift_factor`` (as pipelines do for any
    autoencoder); the decoder returns [-1, 1] and this returns ``(B, 3, H, W)`` in [0, 1].
    """
    param = next(decoder.parameters())
    config = getattr(decoder, "config", None)
    latents = latents / getattr(config, "scaling_factor", 1.0) + (getattr(config, "shift_factor", None) or 0.0)
    images = decoder.decode(latents.to(device=param.device, dtype=param.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` in [0, 1] -> PIL images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
