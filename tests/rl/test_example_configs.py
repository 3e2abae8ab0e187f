"""The shipped training configs load, validate and give consistent batch sizes."""
from pathlib import Path

import pytest

from promptloop.configuration import load_config
from promptloop.rl.config import TrainConfig, derive_sizes

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name,processes", [("sdxl_imagereward.yaml", 4), ("miniworld_grpo.yaml", 1)])
def test_example_config_loads_and_divides(name, processes):
    config = load_config(TrainConfig, CONFIGS / name)
    sizes = derive_sizes(config.grpo, processes)
    assert sizes.micro_batches_per_optimizer_step >= 1


def test_miniworld_config_matches_the_demo_policy_settings():
    from promptloop.miniworld.policy_warmstart import miniworld_policy_config

    config = load_config(TrainConfig, CONFIGS / "miniworld_grpo.yaml")
    expected = miniworld_policy_config("closed")
    for key in ("system_prompt", "max_new_tokens", "max_prompt_words", "min_pixels", "max_pixels", "lora_r"):
        assert getattr(config.policy, key) == getattr(expected, key), key
    assert (CONFIGS.parent / config.data.prompts).is_file()
