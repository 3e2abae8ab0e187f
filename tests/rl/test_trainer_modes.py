"""The trainer's baselines: the one-rewrite policy (``policy.mode: oneshot``) and the closed loop with the x0 preview
withheld (``grpo.feedback: false``), trained by the same GRPO code as the method."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from promptloop.backbones import auto_backbone
from promptloop.configuration import ConfigError, build
from promptloop.rl.config import TrainConfig
from promptloop.rl.trainer import GRPOTrainer
from promptloop.testing.tiny_pipelines import tiny_sd_pipeline
from trainer_helpers import QUERIES, LowercaseStartReward, adapter_state, tiny_config, tiny_policy


def _trainer(tmp_path, vlm_dir, mode: str = "closed", **grpo) -> tuple[GRPOTrainer, list]:
    """A tiny trainer whose policy records every observation it is shown."""
    config = tiny_config(tmp_path / "run", vlm_dir, max_steps=2, **grpo)
    config.policy = dataclasses.replace(config.policy, mode=mode)
    torch.manual_seed(0)
    policy = tiny_policy(vlm_dir, mode=mode)
    seen = []
    act = policy.act

    def recording_act(observations, **kwargs):
        seen.extend(observations)
        return act(observations, **kwargs)

    policy.act = recording_act
    trainer = GRPOTrainer(config, policy, auto_backbone(tiny_sd_pipeline(seed=0)), LowercaseStartReward(), QUERIES)
    return trainer, seen


def test_oneshot_training_rewrites_once_before_sampling_and_updates_the_adapter(tmp_path, vlm_dir):
    trainer, seen = _trainer(tmp_path, vlm_dir, mode="oneshot", num_refinements=1)
    before = adapter_state(trainer)
    batch = trainer.collect(QUERIES[:2], step=0)
    assert len(seen) == 16 and all(o.preview is None and o.step == 0 for o in seen)
    assert len(batch.actions) == 16 and {a.refinement_index for a in batch.actions} == {0}
    assert all(len(t.prompts) == 1 for t in batch.trajectories)  # the rewrite holds from the first step on
    history = trainer.train()
    assert len(history) == 2
    assert any(not torch.equal(before[k], v) for k, v in adapter_state(trainer).items())


def test_feedback_ablation_withholds_every_preview_and_nothing_else(tmp_path, vlm_dir):
    shown, seen_shown = _trainer(tmp_path / "shown", vlm_dir)
    withheld, seen_withheld = _trainer(tmp_path / "withheld", vlm_dir, feedback=False)
    shown.collect(QUERIES[:2], step=0)
    withheld.collect(QUERIES[:2], step=0)
    assert seen_shown and all(o.preview is not None for o in seen_shown)
    assert all(o.preview is None for o in seen_withheld)
    # the same decision steps, rows and queries: only the image is missing
    assert [(o.row, o.step, o.query) for o in seen_shown] == [(o.row, o.step, o.query) for o in seen_withheld]


def test_initial_rewrite_trains_a_step_0_action_without_a_preview(tmp_path, vlm_dir):
    trainer, seen = _trainer(tmp_path, vlm_dir, initial_rewrite=True, mini_batches=2)
    batch = trainer.collect(QUERIES[:2], step=0)
    assert len(batch.actions) == 32 and sorted({a.refinement_index for a in batch.actions}) == [0, 1]
    first = [o for o in seen if o.refinement_index == 0]
    assert len(first) == 16 and all(o.step == 0 and o.preview is None and o.num_refinements == 2 for o in first)
    assert all(o.preview is not None and o.step >= 1 for o in seen if o.refinement_index == 1)
    assert all(t.decision_steps[0] == 0 and t.step_prompt_index[0] == 1 for t in batch.trajectories)
    before = adapter_state(trainer)
    assert len(trainer.train()) == 2
    assert any(not torch.equal(before[k], v) for k, v in adapter_state(trainer).items())


@pytest.mark.parametrize("overrides, message", [
    ({"policy": {"mode": "oneshot"}, "grpo": {"num_refinements": 3}}, "set grpo.num_refinements=1"),
    ({"policy": {"mode": "oneshot"}, "grpo": {"num_refinements": 1, "initial_rewrite": True}},
     "initial_rewrite is a closed-loop option"),
    ({"policy": {"mode": "apriori"}}, "cannot be trained"),
])
def test_untrainable_modes_are_config_errors(overrides, message):
    data = {"backbone": {"name_or_path": "x"}, "data": {"prompts": "p.txt"}} | overrides
    with pytest.raises(ConfigError, match=message):
        build(TrainConfig, data)


def test_bfloat16_policy_trains_with_recomputed_old_logprobs(tmp_path, vlm_dir):
    """The GPU precision path on a CPU: bf16 weights, old log-probs recomputed by micro-batch-shaped forwards
    (generation and a full forward differ in bf16), so the first ratio is exactly 1 and the update is finite."""
    config = tiny_config(tmp_path / "run", vlm_dir, max_steps=2)
    torch.manual_seed(0)
    policy = tiny_policy(vlm_dir, dtype="bfloat16")
    assert policy.base_model.dtype == torch.bfloat16
    trainer = GRPOTrainer(config, policy, auto_backbone(tiny_sd_pipeline(seed=0)), LowercaseStartReward(), QUERIES)
    assert trainer._recompute_old_logps()  # "auto": the policy is not float32
    before = adapter_state(trainer)
    history = trainer.train()
    assert len(history) == 2
    assert trainer.on_policy_ratio_deviation == 0.0
    assert all(h["train/nonfinite_skips"] == 0.0 and "policy/sampling_logprob_gap" in h for h in history)
    assert any(not torch.equal(before[k], v) for k, v in adapter_state(trainer).items())
