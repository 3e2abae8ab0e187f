"""Helpers shared by the evaluation tests (a unique module name, unlike conftest)."""
from __future__ import annotations

from pathlib import Path

import yaml

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


ONE_PER_BATCH_QUERIES = ["a red circle", "two green squares on grass", "a blue triangle at night"]


def one_per_batch_config(tmp_path: Path, backbone_dir: Path, methods: dict, output_dir: str) -> Path:
    """A saved eval config: the tiny backbone, one prompt per batch (3 batches per seed), seeds 0 and 1, the test
    reward; ``methods`` as in the YAML."""
    (tmp_path / "prompts.txt").write_text("\n".join(ONE_PER_BATCH_QUERIES) + "\n")
    config = {
        "prompts": {"source": str(tmp_path / "prompts.txt")},
        "backbones": {"tiny-sd": {"name_or_path": str(backbone_dir), "num_inference_steps": 4, "preview_size": 32,
                                  "batch_size": 1}},
        "methods": methods,
        "rewards": {"bright": {"spec": TEST_REWARD}},
        "seeds": [0, 1], "device": "cpu", "warmup": False,
        "policy_sampling": {"max_new_tokens": 6},
        "output": {"output_dir": output_dir, "grid_prompts": 3, "strips": 2},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def samples_without_timings(results: dict) -> list[dict]:
    """results.json's samples with the one metric that differs between equal runs (seconds_per_image) left out."""
    return [dict(s, metrics={k: v for k, v in s["metrics"].items() if k != "seconds_per_image"})
            for s in results["samples"]]
