"""Rewards that raise, time out or return NaN/inf, and a policy that writes unusable text, during real training
steps: the items are dropped and counted (or the prompt kept and counted), and no NaN ever reaches the adapter."""
from __future__ import annotations

import contextlib
import time

import pytest
import torch

from fault_helpers import all_finite
from promptloop.rewards import Reward
from trainer_helpers import QUERIES, adapter_state, tiny_trainer

SMALL = dict(prompts_per_step=2, group_size=4, micro_batch_size=8, max_steps=1)


class _ScriptedReward(Reward):
    """Per call: "ok" (distinct finite scores), "raise", "slow" (past the timeout), "nonfinite" (NaN, +inf, -inf
    for the first three items) or "wrong_length"."""

    name = "scripted"

    def __init__(self, script):
        super().__init__()
        self.script, self.calls = list(script), 0

    def score_batch(self, images, queries, metadata):
        kind = self.script[self.calls % len(self.script)]
        self.calls += 1
        scores = torch.arange(len(images), dtype=torch.float32)
        if kind == "raise":
            raise RuntimeError("reward server went away")
        if kind == "slow":
            time.sleep(6.0)  # far past the 0.5 s timeout even when a loaded machine makes the rollout slow
        if kind == "nonfinite":
            scores[:3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
        if kind == "wrong_length":
            return scores[:-1]
        return scores


def _optimizer_finite(trainer) -> bool:
    return all(torch.isfinite(v).all() for state in trainer.optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("script, failed, dropped", [
    (["ok", "raise"], 4, 4),
    (["nonfinite", "ok"], 0, 3),
    (["wrong_length", "ok"], 4, 4),
])
def test_failing_rewards_are_dropped_and_counted(tmp_path, vlm_dir, script, failed, dropped):
    """Two reward calls per step (rollout chunks of 4 of the 8 trajectories); the fault hits one chunk a step."""
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, reward=_ScriptedReward(script), **SMALL)
    trainer.config.backbone.rollout_batch_size = 4
    with pytest.warns(RuntimeWarning) if "nonfinite" in script else contextlib.nullcontext():
        history = trainer.train()
    assert [h["reward/failures"] for h in history] == [failed]
    assert [h["reward/dropped"] for h in history] == [dropped]
    assert all(h["train/nonfinite_skips"] == 0 for h in history)
    assert all_finite(adapter_state(trainer)) and _optimizer_finite(trainer)


def test_a_reward_that_times_out_is_dropped_and_training_goes_on(tmp_path, vlm_dir):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, reward=_ScriptedReward(["slow", "ok", "ok", "ok"]),
                           **dict(SMALL, max_steps=2))
    trainer.config.backbone.rollout_batch_size = 4
    trainer.config.reward.timeout_s = 0.5
    history = trainer.train()
    assert history[0]["reward/failures"] >= 4  # the slow chunk (and any chunk queued behind it) timed out
    assert history[1]["reward/failures"] == 0
    assert all_finite(adapter_state(trainer)) and _optimizer_finite(trainer)


def test_every_reward_failing_is_a_no_op_step(tmp_path, vlm_dir):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, reward=_ScriptedReward(["raise"]), **SMALL)
    before = adapter_state(trainer)
    history = trainer.train()
    assert [h["reward/failures"] for h in history] == [8]
    after = adapter_state(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing to learn from: nothing changes


GARBAGE = ["", "   \n\t ", "\x00\x07\x1b\x7f", "\udcff\udcfe", "!!! ??? ...", "<|im_end|><|endoftext|>",
           "<think>never closed", "word " * 3000, "a red cat, oil painting"]
"""What a policy can emit: empty, blank, control bytes, undecodable bytes (surrogate-escaped), punctuation, chat
tokens, an unclosed thinking block, 3000 words, and one usable prompt."""


def test_unusable_policy_text_keeps_the_previous_prompt_and_is_counted(tmp_path, vlm_dir):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, **dict(SMALL, max_steps=1, group_size=len(GARBAGE) - 1,
                                                              micro_batch_size=2 * (len(GARBAGE) - 1)))
    tokenizer = trainer.policy.processor.tokenizer
    tokenizer.batch_decode = lambda ids, **kw: [GARBAGE[i % len(GARBAGE)] for i in range(len(ids))]
    batches = []
    collect = trainer.collect
    trainer.collect = lambda queries, step: batches.append(collect(queries, step)) or batches[-1]
    history = trainer.train()
    actions = batches[0].actions
    expected_kept = sum(i % len(GARBAGE) < 7 for i in range(len(actions)))  # the first 7 kinds hold no prompt
    assert history[0]["prompt/kept_previous"] == expected_kept
    for trajectory in batches[0].trajectories:
        final = trajectory.prompts[-1]
        assert final in QUERIES or final == "a red cat, oil painting" or final.startswith("word word")
        assert final.isprintable()
    assert history[0]["prompt/truncated"] >= 1  # 3000 words: cut to the text encoder's budget and flagged
    assert all_finite(adapter_state(trainer))
