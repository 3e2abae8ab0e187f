"""Tiny reward checkpoints, saved once per session in the published layouts and loaded through the real loaders."""
import pytest

from promptloop.rewards import load_reward
from promptloop.testing.tiny_rewards import TINY_REWARD_BUILDERS

@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_rewards")
    return {name: build(root / name) for name, build in TINY_REWARD_BUILDERS.items()}


@pytest.fixture(scope="session")
def tiny_rewards(tiny_dirs):
    return {name: load_reward(name, path=folder) for name, folder in tiny_dirs.items()}

