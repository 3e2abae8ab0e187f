"""The mini world's rewards, in the project's reward registry (import this module to register them).

- ``miniworld-preference``: the learned preference model (the ImageReward analogue), the TRAINING reward. An
  imperfect proxy of the gold rule, learned from noisy pairs: it can be hacked.
- ``miniworld-gold``: the hidden gold preference rule (``gold.py``), for EVALUATION only.
- ``miniworld-fidelity``: the fraction of the attributes the original query names that the recogniser reads in the
  image, for EVALUATION only.

All three score images against the user's ORIGINAL query, like every reward of the project.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from promptloop.rewards.base import Images, Metadata, ModelReward, Reward, RewardOutput
from promptloop.rewards.registry import register_reward

from .domain import REFERENCE_SIZE
from .gold import gold_details
from .preference_model import PreferenceModel

ASSETS_DIR = Path(__file__).parent / "assets"
DEFAULT_PREFERENCE_DIR = ASSETS_DIR / "preference"
"""The shipped learned preference model (trained by ``python -m promptloop.miniworld.train_preference``)."""


def to_pixel_tensor(images: Images) -> torch.Tensor:
    """(B, 3, 32, 32) float in [0, 1] from PIL images or a float tensor (B, 3, H, W) in [0, 1] (area-resized)."""
    if isinstance(images, torch.Tensor):
        pixels = images.detach().float().clamp(0.0, 1.0)
        if pixels.shape[-2:] != (REFERENCE_SIZE, REFERENCE_SIZE):
            pixels = F.interpolate(pixels, size=(REFERENCE_SIZE, REFERENCE_SIZE), mode="area")
        return pixels
    side = (REFERENCE_SIZE, REFERENCE_SIZE)
    arrays = [np.asarray(image.convert("RGB").resize(side, Image.BOX) if image.size != side else image.convert("RGB"),
                         dtype=np.float32) for image in images]
    return torch.from_numpy(np.stack(arrays) / 255.0).permute(0, 3, 1, 2).contiguous()


class _GoldReward(Reward):
    """Scores one field of ``gold.gold_details``; details carry every gold field (gold, fidelity, terms)."""

    field: str = ""

    def __init__(self, device=None, dtype=None, on_nonfinite: Literal["warn", "raise"] = "warn"):
        del device, dtype  # computed from pixels on the CPU
        super().__init__(on_nonfinite=on_nonfinite)

    def score_batch(self, images: Images, queries: Sequence[str], metadata: Metadata) -> RewardOutput:
        details = gold_details(images, queries)
        scores = torch.tensor([d[self.field] for d in details], dtype=torch.float32)
        return RewardOutput(scores, [{self.name: d[self.field], **d} for d in details])


@register_reward("miniworld-gold")
class MiniworldGoldReward(_GoldReward):
    """The hidden gold preference rule (evaluation only): aesthetic terms minus 2 per query attribute violated."""

    name = "miniworld-gold"
    field = "gold"


@register_reward("miniworld-fidelity")
class MiniworldFidelityReward(_GoldReward):
    """Query fidelity (evaluation only): the fraction of the query's named attributes the recogniser reads."""

    name = "miniworld-fidelity"
    field = "fidelity"


@register_reward("miniworld-preference")
class MiniworldPreferenceReward(ModelReward):
    """The learned preference model (training reward); ``path`` defaults to the shipped model."""

    name = "miniworld-preference"

    def __init__(self, path: str | Path | None = None, device=None, dtype=None,
                 on_nonfinite: Literal["warn", "raise"] = "warn"):
        super().__init__(device=device, dtype=dtype, on_nonfinite=on_nonfinite)
        self.path = Path(path) if path is not None else DEFAULT_PREFERENCE_DIR
        self.model = self.place(PreferenceModel.from_pretrained(self.path))

    def score_batch(self, images: Images, queries: Sequence[str], metadata: Metadata) -> torch.Tensor:
        pixels = to_pixel_tensor(images).to(self.device, self.dtype)
        return self.model(pixels, self.model.encode_queries(queries)).float().cpu()
