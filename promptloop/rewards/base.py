"""The reward contract: ``reward(images, queries, metadata) -> RewardOutput``.

Images are a list of PIL images or a float tensor (B, 3, H, W) in [0, 1]. Queries are the user's original queries,
one per image: every reward scores an image against the query the user asked for, never against a rewritten prompt.
Scores that are NaN or infinite are kept in ``scores`` (so nothing is silently replaced), flagged in ``nan_mask``,
counted on the reward, and reported with a warning (or an error with ``on_nonfinite="raise"``).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from PIL import Image

Images = Union[Sequence[Image.Image], torch.Tensor]
Metadata = Sequence[dict[str, Any]] | None

# Tensor images must be in [0, 1]; a little slack absorbs decoder round-off.
_RANGE_SLACK = 1e-3


class NonFiniteRewardError(ValueError):
    """A reward produced NaN or infinite scores and the reward was asked to raise on them."""


@dataclass
class RewardOutput:
    """Scores of one batch.

    Attributes:
        scores: float32 tensor of shape (B,) on the CPU; NaN/inf values are kept as produced and flagged.
        details: one dict per item: the reward's own score under its name, and for a composite each component's
            raw score.
        nan_mask: bool tensor of shape (B,), True where the score is NaN or infinite.
    """

    scores: torch.Tensor
    details: list[dict[str, Any]]
    nan_mask: torch.Tensor = field(default=None)  # filled from ``scores`` when not given

    def __post_init__(self):
        if self.nan_mask is None:
            self.nan_mask = ~torch.isfinite(self.scores)

    @property
    def num_nonfinite(self) -> int:
        """How many scores in this batch are NaN or infinite."""
        return int(self.nan_mask.sum())


def check_batch(images: Images, queries: Sequence[str], metadata: Metadata = None) -> int:
    """Validate one batch and return its size; raise TypeError/ValueError that say what to pass instead."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise TypeError(
                f"Tensor images must be float (B, 3, H, W) in [0, 1]; got dtype {images.dtype} and shape "
                f"{tuple(images.shape)}."
            )
        if images.numel() and (images.min() < -_RANGE_SLACK or images.max() > 1 + _RANGE_SLACK):
            raise ValueError(
                f"Tensor images must be in [0, 1]; got values in [{images.min():.3f}, {images.max():.3f}] "
                "(map [-1, 1] decoder output with (x + 1) / 2)."
            )
        batch_size = images.shape[0]
    elif isinstance(images, (list, tuple)):
        bad = next((im for im in images if not isinstance(im, Image.Image)), None)
        if bad is not None:
            raise TypeError(f"images must be PIL images or a float tensor (B, 3, H, W); got a list holding "
                            f"{type(bad).__name__}.")
        batch_size = len(images)
    else:
        raise TypeError(f"images must be a list of PIL images or a float tensor (B, 3, H, W) in [0, 1]; got "
                        f"{type(images).__name__}.")
    if isinstance(queries, str) or not all(isinstance(q, str) for q in queries):
        raise TypeError("queries must be a list of strings, one per image.")
    if len(queries) != batch_size:
        raise ValueError(f"Got {batch_size} images but {len(queries)} queries; pass one query per image.")
    if metadata is not None and len(metadata) != batch_size:
        raise ValueError(f"Got {batch_size} images but {len(metadata)} metadata entries; pass one per image or None.")
    return batch_size


def as_scores(raw: Any, batch_size: int) -> torch.Tensor:
    """Turn a scorer's raw output (tensor, array, list) into a float32 CPU tensor of shape (B,)."""
    try:
        scores = torch.as_tensor(raw).detach()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"A scorer must return a RewardOutput or numbers, one per image; got {type(raw).__name__}.") \
            from exc
    scores = scores.to("cpu", torch.float32).reshape(-1) if scores.numel() == batch_size else scores
    if scores.shape != (batch_size,):
        raise ValueError(f"A scorer returned scores of shape {tuple(scores.shape)} for a batch of {batch_size}.")
    return scores


class Reward:
    """Base of every reward: validates the batch, scores it, flags and counts non-finite scores.

    Subclasses implement ``score_batch``; it may return a tensor of scores (details then hold the score under
    ``self.name``) or a full ``RewardOutput``.

    Attributes:
        name: the reward's name in details and logs.
        reads_query: whether the score depends on the query (False for image-only rewards such as ``aesthetic``).
        on_nonfinite: "warn" flags NaN/inf scores and warns; "raise" raises ``NonFiniteRewardError``.
        num_nonfinite: NaN/inf scores seen by this reward so far, over all batches.
    """

    name: str = "reward"
    reads_query: bool = True

    def __init__(self, on_nonfinite: Literal["warn", "raise"] = "warn"):
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise'; got {on_nonfinite!r}.")
        self.on_nonfinite = on_nonfinite
        self.num_nonfinite = 0

    def score_batch(self, images: Images, queries: Sequence[str], metadata: Metadata) -> torch.Tensor | RewardOutput:
        raise NotImplementedError

    def __call__(self, images: Images, queries: Sequence[str], metadata: Metadata = None) -> RewardOutput:
        batch_size = check_batch(images, queries, metadata)
        with torch.no_grad():
            raw = self.score_batch(images, list(queries), metadata)
        if isinstance(raw, RewardOutput):
            output = RewardOutput(as_scores(raw.scores, batch_size), raw.details)
        else:
            scores = as_scores(raw, batch_size)
            output = RewardOutput(scores, [{self.name: float(s)} for s in scores])
        self._report_nonfinite(output)
        return output

    def _report_nonfinite(self, output: RewardOutput) -> None:
        count = output.num_nonfinite
        if not count:
            return
        self.num_nonfinite += count
        message = (f"Reward {self.name!r} produced {count} NaN/inf score(s) in a batch of {len(output.scores)} "
                   f"({self.num_nonfinite} so far); they are flagged in RewardOutput.nan_mask.")
        if self.on_nonfinite == "raise":
            raise NonFiniteRewardError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class ModelReward(Reward):
    """A reward backed by a torch model placed once on ``device`` in ``dtype`` (default: CPU, float32)."""

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 on_nonfinite: Literal["warn", "raise"] = "warn"):
        super().__init__(on_nonfinite=on_nonfinite)
        self.device = torch.device(device or "cpu")
        self.dtype = dtype or torch.float32

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on this reward's device and dtype, in eval mode, without gradients."""
        return module.to(self.device, self.dtype).eval().requires_grad_(False)
