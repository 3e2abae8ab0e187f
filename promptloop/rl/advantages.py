"""Group-relative advantages (GRPO): each trajectory's reward against the other trajectories of its query."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

AdvantageScale = Literal["group", "batch", "none"]


@dataclass
class GroupAdvantages:
    """Per-trajectory advantages and what the computation had to leave out."""

    advantages: torch.Tensor
    """``(N,)`` float32; 0 for dropped trajectories and for groups with no spread."""
    valid: torch.Tensor
    """``(N,)`` bool: the reward was finite and the trajectory's group had at least two finite rewards."""
    num_dropped: int
    """Trajectories whose reward was NaN/inf (left out of their group's statistics)."""
    zero_std_ratio: float
    """Fraction of groups whose finite rewards all tie: no learning signal from them."""


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale: AdvantageScale = "group", eps: float = 1e-4
) -> GroupAdvantages:
    """A_i = (r_i - mean_g(r)) / (std_g(r) + eps) over the trajectories of i's group ``g``.

    ``scale="group"`` divides by the group's std (GRPO), ``"batch"`` by the std of all finite rewards, ``"none"``
    only centres. The std is the unbiased one (as in GRPO implementations). Non-finite rewards are dropped from
    their group's statistics and get advantage 0 (``valid`` False), so one NaN from a reward model never reaches a
    gradient. Groups with fewer than two finite rewards get advantage 0.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must be 1-D of the same length, got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    r = rewards.detach().float()
    finite = torch.isfinite(r)
    adv = torch.zeros_like(r)
    valid = torch.zeros_like(finite)
    groups = torch.unique(group_ids)
    zero_std = 0
    for g in groups:
        members = (group_ids == g) & finite
        if int(members.sum()) < 2:
            zero_std += 1
            continue
        rg = r[members]
        std = rg.std()
        valid[members] = True
        if float(std) <= 1e-12:  # all tied: no signal, and no 0/0 when eps is 0
            zero_std += 1
            continue
        centred = rg - rg.mean()
        adv[members] = centred / (std + eps) if scale == "group" else centred
    if scale == "batch" and int(valid.sum()) >= 2:
        adv[valid] = adv[valid] / (r[finite].std() + eps)
    return GroupAdvantages(
        advantages=adv,
        valid=valid,
        num_dropped=int((~finite).sum()),
        zero_std_ratio=zero_std / max(len(groups), 1),
    )
