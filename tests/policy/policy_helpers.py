"""Builders shared by the policy tests (imported by name: a unique module name, unlike conftest)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from promptloop.backbones.types import Observation
from promptloop.policy import PolicyConfig


def make_preview(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_observation(row: int, query: str, preview=None, prompt=None, history=None, k: int = 1, n: int = 3):
    prompt = query if prompt is None else prompt
    return Observation(
        row=row, query=query, prompt=prompt, history=history or [prompt], preview=preview, step=4 * k,
        num_steps=12, refinement_index=k, num_refinements=n, noise_level=1.0 - k / n,
    )


def mixed_observations():
    """Prompts of different lengths, previews of different sizes and one row without a preview."""
    return [
        make_observation(0, "a red cat", make_preview(64, 64, 0)),
        make_observation(1, "a castle in the mountains at dawn, oil painting, wide shot", make_preview(48, 96, 1),
                         prompt="a castle at dawn", history=["a castle in the mountains", "a castle at dawn"]),
        make_observation(2, "dog", None),
        make_observation(3, "two apples on a wooden table", make_preview(96, 48, 2)),
    ]


def small_config(**overrides) -> PolicyConfig:
    values = dict(max_new_tokens=12, min_pixels=28 * 28, max_pixels=64 * 64, lora_r=4, lora_alpha=8.0)
    values.update(overrides)
    return PolicyConfig(**values)
