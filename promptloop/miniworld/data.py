"""Training data for the mini-world backbone: every scene, pre-rendered with jitter, as tensors to index."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from .domain import ATTRIBUTE_VALUES, ATTRIBUTES, Jitter, all_scenes, render, sample_jitter


@dataclass
class SceneDataset:
    """``variants`` renders of each of the 1296 scenes (the first one clean, the others jittered)."""

    images: torch.Tensor
    """(N, 3, 32, 32) float in [-1, 1]."""
    values: torch.Tensor
    """(N, 6) long: each image's attribute value indices, in ``ATTRIBUTES`` / ``ATTRIBUTE_VALUES`` order."""

    def to(self, device) -> "SceneDataset":
        return SceneDataset(self.images.to(device), self.values.to(device))

    def __len__(self) -> int:
        return len(self.values)


def render_dataset(variants: int, seed: int = 0) -> SceneDataset:
    """All scenes x ``variants`` renders; deterministic in ``seed``."""
    if variants < 1:
        raise ValueError(f"variants must be at least 1, got {variants}.")
    rng = random.Random(seed)
    images, values = [], []
    for scene in all_scenes():
        row = [ATTRIBUTE_VALUES[name].index(getattr(scene, name)) for name in ATTRIBUTES]
        for v in range(variants):
            jitter = Jitter() if v == 0 else sample_jitter(rng)
            images.append(np.asarray(render(scene, jitter=jitter)))
            values.append(row)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return SceneDataset(pixels.contiguous(), torch.tensor(values, dtype=torch.long))
