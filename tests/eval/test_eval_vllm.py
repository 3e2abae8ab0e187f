"""``policy_sampling.backend: vllm``: the evaluation's policies served by vLLM (a stand-in on transformers here)."""
from __future__ import annotations

import shutil
import sys

import pytest

from eval_helpers import TEST_REWARD
from promptloop.configuration import ConfigError, build
from promptloop.eval import run_evaluation
from promptloop.eval.config import EvalConfig
from promptloop.testing import vllm_standin

QUERIES = ["a red circle", "two green squares on grass"]


def _config(tmp_path, backbone_dir, policies: dict, backend: str) -> EvalConfig:
    methods = {"base": {"kind": "base"}}
    for name, path in policies.items():
        methods.update({
            f"{name}-untrained": {"kind": "untrained", "policy": str(path)},
            f"{name}-oneshot": {"kind": "oneshot", "policy": str(path)},
            f"{name}-closed": {"kind": "closed", "policy": str(path), "num_refinements": [2]},
            f"{name}-noimage": {"kind": "closed-noimage", "policy": str(path), "num_refinements": [2]},
            f"{name}-apriori": {"kind": "apriori", "policy": str(path), "num_refinements": [2]},
        })
    return build(EvalConfig, {
        "prompts": {"source": "unused"},
        "backbones": {"tiny-sd": {"name_or_path": str(backbone_dir), "num_inference_steps": 4, "preview_size": 32,
                                  "batch_size": 2}},
        "methods": methods, "rewards": {"bright": {"spec": TEST_REWARD}}, "seeds": [0], "device": "cpu",
        "warmup": False, "policy_sampling": {"backend": backend, "max_new_tokens": 6},
        "output": {"output_dir": str(tmp_path / backend), "html": False},
    })


def _outcomes(results):
    return [(s.method, s.prompt_index, s.prompts, s.metrics["reward/bright"]) for s in results.samples]


def test_vllm_evaluation_equals_the_transformers_one_and_shares_one_engine(tmp_path, tiny_backbone_dir,
                                                                          tiny_policy_dir, monkeypatch):
    vllm_standin.install(monkeypatch)
    second = tmp_path / "second-policy"  # another saved policy on the same base model
    shutil.copytree(tiny_policy_dir, second)
    policies = {"first": tiny_policy_dir, "second": second}
    reference = run_evaluation(_config(tmp_path, tiny_backbone_dir, policies, "transformers"), QUERIES, log=None)
    served = run_evaluation(_config(tmp_path, tiny_backbone_dir, policies, "vllm"), QUERIES, log=None)
    assert _outcomes(served) == _outcomes(reference)
    untrained = [s.prompts for s in served.samples if s.method == "first-untrained"]
    oneshot = [s.prompts for s in served.samples if s.method == "first-oneshot"]
    assert untrained != oneshot, "the untrained method must be the base model (adapter off)"

    [engine] = vllm_standin.LLM.instances
    assert engine.kwargs["enable_lora"] and engine.kwargs["max_lora_rank"] == 8  # the policies' rank is 4
    assert len({lora.lora_int_id for _, _, lora in engine.requests if lora is not None}) == 2
    assert any(lora is None for _, _, lora in engine.requests)


def test_vllm_backend_errors_before_any_model_loads(tmp_path, tiny_backbone_dir, tiny_policy_dir, monkeypatch):
    with pytest.raises(ConfigError, match="policy_sampling: vllm_gpu_memory_utilization=0.0 must be in"):
        build(EvalConfig, {"prompts": {"source": "x"}, "backbones": {"b": {"name_or_path": "x"}},
                           "methods": {"base": {"kind": "base"}}, "rewards": {"r": {"spec": TEST_REWARD}},
                           "policy_sampling": {"backend": "vllm", "vllm_gpu_memory_utilization": 0}})
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr("promptloop.eval.runner.load_reward", lambda *a, **k: pytest.fail("a model was loaded"))
    config = _config(tmp_path, tiny_backbone_dir, {"first": tiny_policy_dir}, "vllm")
    with pytest.raises(ImportError, match="pip install vllm"):
        run_evaluation(config, QUERIES, log=None)
