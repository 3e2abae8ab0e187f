"""Realistic degradations of mini-world renders: what a small diffusion model's samples and x0 previews look like.

Used to train the learned preference reward on images like the ones it will score, and to make the previews of the
policy's warm-start data.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class Degradation:
    """One draw of degradations; the zero degradation leaves an image unchanged."""

    blur: float = 0.0
    """Gaussian blur radius in pixels at 32 px."""
    noise: float = 0.0
    """Standard deviation of per-pixel Gaussian noise, in 0-255 units."""
    colour_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Offset added to each RGB channel, in 0-255 units."""
    contrast: float = 1.0
    """Contrast multiplier around mid-gray (< 1 washes the image out)."""


def sample_degradation(rng: random.Random, strength: float = 1.0) -> Degradation:
    """Random degradations scaled by ``strength`` (0: none; 1: blur up to 1.2 px, noise up to 14, shifts up to 18,
    contrast down to 0.7)."""
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}.")
    shift = 18.0 * strength
    return Degradation(
        blur=rng.uniform(0.0, 1.2 * strength), noise=rng.uniform(0.0, 14.0 * strength),
        colour_shift=tuple(rng.uniform(-shift, shift) for _ in range(3)),
        contrast=1.0 - rng.uniform(0.0, 0.3 * min(strength, 3.0)),
    )


def degrade(image: Image.Image, degradation: Degradation, seed: int = 0) -> Image.Image:
    """``image`` blurred, washed out, colour-shifted and noised (noise drawn from ``seed``)."""
    if degradation.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(degradation.blur))
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    pixels = (pixels - 127.5) * degradation.contrast + 127.5 + np.asarray(degradation.colour_shift, np.float32)
    if degradation.noise > 0:
        pixels = pixels + np.random.default_rng(seed).normal(0.0, degradation.noise, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
