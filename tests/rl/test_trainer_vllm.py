"""Training with ``grpo.rollout_backend: vllm``: the answers sampled by vLLM (a stand-in on transformers here), scored
by the training model, and the adapter handed to the engine after every update."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from promptloop.configuration import ConfigError, build
from promptloop.rl.config import TrainConfig
from promptloop.rl.trainer import GRPOTrainer
from promptloop.testing import vllm_standin
from trainer_helpers import QUERIES, adapter_state, tiny_trainer


def served_adapter(engine) -> dict[str, torch.Tensor]:
    return load_file(str(Path(engine.lora_request.lora_path) / "adapter_model.safetensors"))


def test_vllm_rollouts_learn_and_the_engine_serves_each_updates_weights(tmp_path, vlm_dir, monkeypatch):
    vllm_standin.install(monkeypatch)
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=12, rollout_backend="vllm")
    before = adapter_state(trainer)
    history = trainer.train()
    rewards = [h["reward/mean"] for h in history]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.15, rewards
    after = adapter_state(trainer)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-3
    assert trainer.on_policy_ratio_deviation < 1e-5  # the answers' log-probs come from the training model
    assert all(h["time/adapter_handover"] >= 0 for h in history)

    [engine] = vllm_standin.LLM.instances  # one engine for the run, its adapter replaced after every update
    ids = [lora.lora_int_id for _, _, lora in engine.requests]
    assert len(set(ids)) == 12 and ids == sorted(ids), "a new adapter (LoRA id) for every step"
    assert [ids.count(i) for i in sorted(set(ids))] == [16] * 12  # 2 queries x G = 8, one refinement each
    served = trainer.answer_engine()  # hands over the adapter of the last update
    weights = get_peft_model_state_dict(trainer.policy.model)
    handed = served_adapter(served)
    assert handed.keys() == weights.keys()
    assert all(torch.equal(handed[k], weights[k].cpu()) for k in weights)
    kept = sorted(p.name for p in Path(served.lora_request.lora_path).parent.iterdir())
    assert kept == ["adapter-12", "policy"], "older adapters are removed"


def test_vllm_actions_are_the_engines_answers_scored_by_the_training_model(tmp_path, vlm_dir, monkeypatch):
    vllm_standin.install(monkeypatch)
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=2, rollout_backend="vllm")
    engine = trainer.answer_engine()
    answers, act = [], engine.act

    def recording_act(observations, **kwargs):
        out = act(observations, **kwargs)
        answers.extend(zip(out.answer_token_ids, out.prompts))
        return out

    engine.act = recording_act
    batch = trainer.collect(QUERIES[:2], step=0)
    assert len(batch.actions) == len(answers) == 16
    assert [a.sample.completion_ids.tolist() for a in batch.actions] == [ids for ids, _ in answers]
    assert [t.prompts[-1] for t in batch.trajectories] == [prompt for _, prompt in answers]
    with torch.no_grad():
        scored = trainer.policy.log_probs([a.sample for a in batch.actions])
    for row, action in enumerate(batch.actions):
        assert torch.allclose(action.sampling_logps, scored.log_probs[row][scored.mask[row]], atol=1e-5)
    assert trainer.evaluate() == {}  # no held-out queries: nothing to evaluate


def test_vllm_rollout_errors_name_the_key_and_the_fix(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    data = {"backbone": {"name_or_path": "unused"}, "data": {"prompts": str(prompts)},
            "logging": {"output_dir": str(tmp_path / "run"), "report_to": "none"},
            "grpo": {"rollout_backend": "vllm", "vllm_gpu_memory_utilization": 1.5}}
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization=1.5 must be in"):
        build(TrainConfig, data)
    data["grpo"]["vllm_gpu_memory_utilization"] = 0.3
    config = build(TrainConfig, data)
    monkeypatch.setitem(sys.modules, "vllm", None)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the missing vllm was reported")

    monkeypatch.setattr("promptloop.backbones.load_backbone", no_model)
    with pytest.raises(ImportError, match="pip install vllm"):
        GRPOTrainer.from_config(config)
