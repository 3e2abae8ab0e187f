"""Fixtures of the evaluation tests: a saved tiny SD pipeline, a saved tiny policy, a registered test reward."""
from __future__ import annotations

import pytest
import torch

from promptloop.policy import PolicyConfig, PromptPolicy
from promptloop.testing.tiny_pipelines import tiny_sd_pipeline
from promptloop.testing.tiny_vlm import save_tiny_vlm

from eval_helpers import register_test_reward

register_test_reward()


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_backbone") / "tiny-sd"
    tiny_sd_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """A saved policy whose LoRA adapter changes the model (B matrices drawn at random, not zero)."""
    root = tmp_path_factory.mktemp("eval_policy")
    base = save_tiny_vlm(root / "base-vlm", "qwen2_5_vl")
    config = PolicyConfig(model_name_or_path=str(base), max_new_tokens=8, min_pixels=28 * 28, max_pixels=56 * 56,
                          lora_r=4, lora_alpha=8.0, do_sample=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # peft draws the LoRA A matrices from the global generator
        policy = PromptPolicy.from_pretrained(base, config, device="cpu")
        with torch.no_grad():
            for name, param in policy.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.5)
    policy.save_pretrained(root / "policy")
    return root / "policy"
