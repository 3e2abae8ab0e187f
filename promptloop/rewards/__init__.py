"""Image rewards, always scored against the user's original query.

``load_reward(spec, device, dtype, **kwargs)`` returns a ``Reward``: ``reward(images, queries, metadata)`` gives a
``RewardOutput`` (scores (B,), per-item details, NaN/inf flags). Built-in names: imagereward, pickscore, hpsv2,
aesthetic, clipscore, composite; specs may also be weighted sums ("imagereward:1.0,aesthetic:0.1") or a user
callable ("module:function"). Published checkpoints are loaded into transformers / open_clip modules through key
mappings; ``EXPECTED_FILES`` lists the files each reward needs.
"""
from .async_worker import AsyncRewardWorker, RewardJob, RewardWorkerError
from .base import ModelReward, NonFiniteRewardError, Reward, RewardOutput, check_batch
from .clip_rewards import AestheticScore, CLIPScore, PickScore
from .composite import CompositeReward
from .hpsv2 import HPSv2
from .imagereward import ImageReward, ImageRewardModel
from .registry import CallableReward, available_rewards, load_reward, parse_reward_spec, register_reward
from .weights import EXPECTED_FILES, MissingRewardWeightsError, default_cache_dir, resolve_weights

__all__ = [
    "EXPECTED_FILES",
    "AestheticScore",
    "AsyncRewardWorker",
    "CLIPScore",
    "CallableReward",
    "CompositeReward",
    "HPSv2",
    "ImageReward",
    "ImageRewardModel",
    "MissingRewardWeightsError",
    "ModelReward",
    "NonFiniteRewardError",
    "PickScore",
    "Reward",
    "RewardJob",
    "RewardOutput",
    "RewardWorkerError",
    "available_rewards",
    "check_batch",
    "default_cache_dir",
    "load_reward",
    "parse_reward_spec",
    "register_reward",
    "resolve_weights",
]
