"""Helpers shared by the evaluation tests (a unique module name, unlike conftest)."""
from __future__ import annotations

from promptloop.rewards import CallableReward, available_rewards, register_reward

TEST_REWARD = "eval-test-brightness"


def brightness(images, queries, metadata=None):
    """Mean pixel value of each image: image-only, deterministic, different for different images."""
    return images.mean(dim=(1, 2, 3))


def register_test_reward() -> str:
    """Register ``TEST_REWARD`` once per process; returns its name."""
    if TEST_REWARD not in available_rewards():
        register_reward(TEST_REWARD)(lambda device=None, dtype=None: CallableReward(brightness, TEST_REWARD))
    return TEST_REWARD
