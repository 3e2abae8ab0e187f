"""Each method's source of prompts, checked by watching what the real tiny policy is asked."""
from __future__ import annotations

import pytest
from peft.tuners.tuners_utils import BaseTunerLayer

from promptloop.backbones import SamplerSettings, auto_backbone
from promptloop.eval.config import MethodVariant
from promptloop.eval.methods import sample_batch
from promptloop.policy import PromptPolicy

QUERIES = ["a red circle", "two green squares"]


@pytest.fixture(scope="module")
def models(tiny_backbone_dir, tiny_policy_dir):
    backbone = auto_backbone(str(tiny_backbone_dir))
    policy = PromptPolicy.from_pretrained(tiny_policy_dir, device="cpu", is_trainable=False)
    return backbone, policy


@pytest.fixture
def calls(models, monkeypatch):
    """Every policy.act call: (chat mode, adapter enabled, preview shown per observation, refinement count)."""
    _, policy = models
    seen = []
    act = policy.act

    def spy(observations, **kwargs):
        enabled = not any(m.disable_adapters for m in policy.model.modules() if isinstance(m, BaseTunerLayer))
        seen.append((policy.config.mode, enabled, [o.preview is not None for o in observations],
                     observations[0].num_refinements))
        return act(observations, **kwargs)

    monkeypatch.setattr(policy, "act", spy)
    return seen


def _run(models, kind, n=0, adapter=True, feedback_delay=0, steps=4, initial_rewrite=False):
    backbone, policy = models
    variant = MethodVariant(label=kind, method=kind, kind=kind, policy="p", num_refinements=n, adapter=adapter,
                            feedback_delay=feedback_delay, initial_rewrite=initial_rewrite)
    settings = SamplerSettings(num_inference_steps=steps, preview_size=32)
    return sample_batch(variant, backbone, None if kind == "base" else policy, QUERIES, [0, 0], settings, 0)


def test_base_never_calls_the_policy(models, calls):
    out = _run(models, "base")
    assert calls == [] and [t.prompts for t in out.trajectories] == [[q] for q in QUERIES]


def test_untrained_is_one_blind_rewrite_with_the_adapter_off(models, calls):
    _run(models, "untrained", adapter=False)
    _run(models, "oneshot")
    assert calls == [("oneshot", False, [False, False], 0), ("oneshot", True, [False, False], 0)]
    assert models[1].config.mode == "closed", "the policy's mode is restored"


def test_closed_loop_sees_the_preview_and_the_ablation_does_not(models, calls):
    closed = _run(models, "closed", n=2)
    blind = _run(models, "closed-noimage", n=2)
    assert calls == [("closed", True, [True, True], 2)] * 2 + [("closed", True, [False, False], 2)] * 2
    assert closed.trajectories[0].decision_steps == blind.trajectories[0].decision_steps == [1, 3]


def test_apriori_writes_every_prompt_in_one_call(models, calls):
    out = _run(models, "apriori", n=2)
    assert calls == [("apriori", True, [False, False], 2)]
    assert all(len(t.prompts) == 3 and t.previews == [None, None] for t in out.trajectories)


def test_pipelined_closed_loop_writes_from_an_older_preview(models, calls):
    out = _run(models, "closed", n=2, feedback_delay=1, steps=6)
    assert calls == [("closed", True, [True, True], 2)] * 2
    assert [len(t.prompts) for t in out.trajectories] == [3, 3] and out.trajectories[0].decision_steps == [2, 4]


def test_initial_rewrite_adds_a_decision_at_step_0_without_the_preview(models, calls):
    out = _run(models, "closed", n=2, initial_rewrite=True)
    assert calls == [("closed", True, [False, False], 3)] + [("closed", True, [True, True], 3)] * 2
    assert all(t.decision_steps == [0, 1, 3] and len(t.prompts) == 4 for t in out.trajectories)


def test_initial_rewrite_alone_writes_one_prompt_before_any_preview(models, calls):
    out = _run(models, "closed", n=0, initial_rewrite=True)
    assert calls == [("closed", True, [False, False], 1)]
    assert all(t.decision_steps == [0] and len(t.prompts) == 2 for t in out.trajectories)
