"""A weighted sum of rewards that reports every component."""
from __future__ import annotations

from typing import Any

import torch

from .base import Reward, RewardOutput
from .registry import check_weight, register_reward


class CompositeReward(Reward):
    """``sum_i weight_i * reward_i(images, queries)``; details hold each component's raw score under its name.

    A NaN/inf in any component is flagged by that component and makes the total non-finite, so it is flagged here
    too.
    """

    name = "composite"

    def __init__(self, components: list[tuple[str, Reward, float]], on_nonfinite: str = "warn"):
        super().__init__(on_nonfinite=on_nonfinite)
        names = [name for name, _, _ in components]
        if not components or len(set(names)) != len(names):
            raise ValueError(f"A composite needs distinct component names; got {names}.")
        self.components = components
        self.reads_query = any(reward.reads_query for _, reward, _ in components)

    @classmethod
    def from_weights(cls, weights: dict[str, float], device=None, dtype=None, **component_kwargs: Any):
        """Load each named component (registered name or ``module:function``) with its own kwargs."""
        from .registry import load_reward

        weights = {name: check_weight(w, name) for name, w in weights.items()}
        return cls([(name, load_reward(name, device=device, dtype=dtype, **component_kwargs.get(name, {})), w)
                    for name, w in weights.items()])

    def score_batch(self, images, queries, metadata) -> RewardOutput:
        outputs = [(name, reward(images, queries, metadata), weight) for name, reward, weight in self.components]
        total = sum(weight * out.scores for _, out, weight in outputs)
        details = [{self.name: float(total[i]), **{name: float(out.scores[i]) for name, out, _ in outputs}}
                   for i in range(len(total))]
        return RewardOutput(torch.as_tensor(total, dtype=torch.float32), details)


register_reward("composite")(CompositeReward.from_weights)
