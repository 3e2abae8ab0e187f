"""Tiny end-to-end training setup shared by the trainer tests (imported by name, not through conftest)."""
from __future__ import annotations

from pathlib import Path

import torch

from promptloop.backbones import auto_backbone
from promptloop.policy import PolicyConfig, PromptPolicy
from promptloop.rewards import Reward
from promptloop.rl.config import BackboneSection, DataSection, GRPOSection, LoggingSection, TrainConfig
from promptloop.rl.trainer import GRPOTrainer
from promptloop.testing.tiny_pipelines import tiny_sd_pipeline

QUERIES = ["A red cat", "A blue dog", "Green tree", "Sunset"]
"""Capitalised so that a fallback to the query never earns :class:`LowercaseStartReward`."""

# LoRA on lm_head too: a tiny random model ends in RMSNorm + a near-zero lm_head, so LoRA on the inner layers
# alone can hardly move its output distribution within a few steps.
LORA_TARGETS = r".*(language_model.*\.(q_proj|v_proj|down_proj)|lm_head)"


class LowercaseStartReward(Reward):
    """1 when the final prompt starts with a lowercase ASCII letter: a reward the policy can obviously learn."""

    name = "lowercase_start"

    def score_batch(self, images, queries, metadata):
        return torch.tensor([float(m["prompt"][:1].isascii() and m["prompt"][:1].islower()) for m in metadata])


def tiny_policy(vlm_dir: Path, **overrides) -> PromptPolicy:
    values = dict(model_name_or_path=str(vlm_dir), max_new_tokens=4, min_pixels=28 * 28, max_pixels=56 * 56,
                  lora_r=8, lora_alpha=16.0, lora_target_modules=LORA_TARGETS)
    values.update(overrides)
    return PromptPolicy.from_pretrained(str(vlm_dir), PolicyConfig(**values), device="cpu")


def tiny_config(run_dir: Path, vlm_dir: Path, **grpo) -> TrainConfig:
    values = dict(prompts_per_step=2, group_size=8, num_refinements=1, schedule="per_batch", micro_batch_size=8,
                  learning_rate=3e-2, max_steps=4, seed=0)
    values.update(grpo)
    return TrainConfig(
        backbone=BackboneSection(name_or_path="tiny-sd", num_inference_steps=3, preview_size=32, rollout_batch_size=16),
        data=DataSection(prompts="unused"),
        grpo=GRPOSection(**values),
        logging=LoggingSection(output_dir=str(run_dir), report_to="none", image_every=0, checkpoint_every=2,
                               progress=False),
        policy=PolicyConfig(model_name_or_path=str(vlm_dir)),
    )


def tiny_trainer(run_dir: Path, vlm_dir: Path, reward=None, **grpo) -> GRPOTrainer:
    config = tiny_config(run_dir, vlm_dir, **grpo)
    torch.manual_seed(config.grpo.seed)  # the fresh LoRA init draws from the global RNG, as in from_config
    backbone = auto_backbone(tiny_sd_pipeline(seed=0))
    return GRPOTrainer(config, tiny_policy(vlm_dir), backbone, reward or LowercaseStartReward(), QUERIES)


def adapter_state(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
