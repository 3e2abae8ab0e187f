"""GRPO trainer end to end on a tiny SD pipeline and a tiny Qwen2.5-VL policy (CPU, fp32)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from promptloop.rewards import Reward
from promptloop.rl.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from trainer_helpers import adapter_state, tiny_trainer


def test_training_raises_a_learnable_reward_and_changes_the_adapter(tmp_path, vlm_dir):
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=12)
    before = adapter_state(trainer)
    history = trainer.train()
    rewards = [h["reward/mean"] for h in history]
    early, late = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert late > early + 0.15, rewards
    after = adapter_state(trainer)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-3
    assert trainer.on_policy_ratio_deviation < 1e-5  # fp32: training log-probs reproduce sampling's
    assert history[0]["losses/on_policy_ratio_deviation"] == trainer.on_policy_ratio_deviation  # logged once
    assert not any("losses/on_policy_ratio_deviation" in h for h in history[1:])
    assert all(h["train/nonfinite_skips"] == 0 and h["policy/entropy"] > 0 for h in history)


def _logging_completions(trainer):
    trainer.config.logging.log_completions = True
    return trainer


def _step_log(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def _completions(run_dir: Path) -> list[tuple[int, str, list[str]]]:
    return [(r["step"], r["query"], r["prompts"]) for r in _step_log(run_dir, "completions.jsonl")]


def test_resume_continues_exactly(tmp_path, vlm_dir):
    straight = _logging_completions(tiny_trainer(tmp_path / "straight", vlm_dir, max_steps=4))
    straight.train()
    (tmp_path / "split").mkdir()
    stale = json.dumps({"step": 1, "query": "an earlier run", "prompts": ["x"], "reward": 0.0}) + "\n"
    (tmp_path / "split" / "completions.jsonl").write_text(stale)  # left by an earlier run: a fresh start drops it
    (tmp_path / "split" / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 9.0}\n')
    first = _logging_completions(tiny_trainer(tmp_path / "split", vlm_dir, max_steps=2))
    first.train()
    assert read_meta(latest_checkpoint(tmp_path / "split"))["step"] == 2
    with open(tmp_path / "split" / "completions.jsonl", "a") as f:  # step 3 logged, then a crash mid-write
        f.write(stale.replace('"step": 1', '"step": 3') + stale[:20])
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/mean": 9.0}\n')
    second = _logging_completions(tiny_trainer(tmp_path / "split", vlm_dir, max_steps=4))  # LoRA replaced on resume
    second.train(resume=True)
    a, b = adapter_state(straight), adapter_state(second)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert second.stream.position == straight.stream.position
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step-00000002", "step-00000004"]
    assert _completions(tmp_path / "split") == _completions(tmp_path / "straight")  # each step once, as run
    straight_metrics = _step_log(tmp_path / "straight", "metrics.jsonl")
    split_metrics = _step_log(tmp_path / "split", "metrics.jsonl")
    assert [m["step"] for m in split_metrics] == [1, 2, 3, 4]
    assert [m["reward/mean"] for m in split_metrics] == pytest.approx([m["reward/mean"] for m in straight_metrics])


class _FlakyReward(Reward):
    """NaN for every third image, and raises on the second call."""

    name = "flaky"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def score_batch(self, images, queries, metadata):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("reward server went away")
        scores = torch.tensor([float(i % 2) for i in range(len(images))])
        scores[::3] = float("nan")
        return scores


def test_nan_and_failing_rewards_are_dropped_and_counted(tmp_path, vlm_dir):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, reward=_FlakyReward(), max_steps=2)
    with pytest.warns(RuntimeWarning, match="NaN"):
        history = trainer.train()
    assert history[0]["reward/dropped"] == 6  # 16 images, indices 0, 3, ..., 15
    assert history[1]["reward/failures"] == 16 and history[1]["reward/dropped"] == 16
    assert all(torch.isfinite(p).all() for p in adapter_state(trainer).values())


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, vlm_dir):
    trainer = tiny_trainer(tmp_path / "empty", vlm_dir)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        trainer.train(resume=True)


def test_checkpoint_write_failure_keeps_the_previous_one(tmp_path, vlm_dir, monkeypatch):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=2)
    trainer.train()
    good = latest_checkpoint(tmp_path / "run")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    trainer.step = 3
    with pytest.raises(OSError, match="earlier checkpoints .* are intact"):
        trainer.save_checkpoint()
    assert latest_checkpoint(tmp_path / "run") == good
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert math.isclose(read_meta(good)["step"], 2)


def test_recomputed_old_logprobs_match_sampling_in_fp32_and_logs_are_written(tmp_path, vlm_dir):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=2, old_logprobs="recompute")
    trainer.config.logging.report_to = "tensorboard"
    trainer.config.logging.image_every = 1
    from promptloop.rl.trainer import make_accelerator

    trainer.accelerator = make_accelerator(trainer.config)  # a tracker-enabled accelerator for this run
    history = trainer.train()
    assert all(h["policy/sampling_logprob_gap"] < 1e-5 for h in history)
    assert trainer.on_policy_ratio_deviation == 0.0  # identical forward shapes: the ratio is exactly 1
    assert sorted(p.name for p in (tmp_path / "run" / "images").iterdir()) == ["step-000001.png", "step-000002.png"]
    assert list((tmp_path / "run").rglob("events.out.tfevents.*")), "no TensorBoard event file"


def test_checkpoints_of_an_earlier_run_are_never_taken_for_this_ones(tmp_path, vlm_dir):
    from promptloop.rl.checkpoint import save_checkpoint

    run = tmp_path / "run"
    for step in (80, 90, 100):  # an earlier, longer run in the same output_dir
        save_checkpoint(run, step, lambda tmp: None, {}, keep_last=3)
    trainer = tiny_trainer(run, vlm_dir, max_steps=2)
    with pytest.raises(ValueError, match=r"after step 0, .*step-00000100\).*overwrite_output_dir"):
        trainer.train()
    assert [read_meta(p)["step"] for p in list_checkpoints(run)] == [80, 90, 100]
    trainer.config.logging.overwrite_output_dir = True
    trainer.train()
    assert [read_meta(p)["step"] for p in list_checkpoints(run)] == [2]

    # keep_last never removes the checkpoint just written, whatever else the folder holds
    save_checkpoint(run, 100, lambda tmp: None, {}, keep_last=1)
    assert save_checkpoint(run, 4, lambda tmp: None, {}, keep_last=1).is_dir()


@pytest.mark.parametrize("family", ["gemma3", "idefics3"])
def test_another_vlm_family_trains_with_exact_on_policy_log_probs(tmp_path, family):
    """The loop with the other VLM families (Gemma 3: fixed-size images, token_type_ids, a tokenizer that adds
    <bos>; Idefics3: image crops batched by sample, no token types): rollouts, training log-probs that reproduce
    sampling's (ratio 1), an update that moves the adapter."""
    from promptloop.testing.tiny_vlm import save_tiny_vlm

    vlm = save_tiny_vlm(tmp_path / family, family)
    trainer = tiny_trainer(tmp_path / "run", vlm, max_steps=1, old_logprobs="recompute")
    tokenizer = trainer.policy.processor.tokenizer
    # Byte tokens sampled at random rarely form text; a bias toward letters and spaces gives prompts, some
    # lowercase and some not, so that the rewards of a group differ.
    head = trainer.policy.base_model.get_output_embeddings()
    head = getattr(head, "base_layer", head)  # under its LoRA wrapper
    bias = torch.zeros(head.weight.shape[0])
    letters = range(0x41, 0x7B)
    tokens = ([f"<0x{b:02X}>" for b in letters] + ["\u2581"] if family == "gemma3"  # byte fallback
              else [chr(b) for b in letters] + ["\u0120"])  # byte-level BPE: letters are themselves, space "Ġ"
    bias[tokenizer.convert_tokens_to_ids(tokens)] = 6.0
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    before = adapter_state(trainer)
    history = trainer.train()
    assert trainer.on_policy_ratio_deviation < 1e-5
    assert history[0]["policy/sampling_logprob_gap"] < 1e-5
    after = adapter_state(trainer)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert history[0]["reward/std"] > 0, "the rewards must differ for the update to move the adapter"
    assert (tmp_path / "run" / "policy" / "adapter_model.safetensors").is_file()
    if family == "gemma3":
        assert tokenizer.bos_token_id == 2 and trainer.policy.family.token_types_key == "token_type_ids"
    else:
        assert trainer.policy.family.images_by_sample and trainer.policy.family.token_types_key is None


def test_a_log_prob_mismatch_stops_training_before_anything_is_applied(tmp_path, vlm_dir):
    """Sampling log-probs that the training forward does not reproduce (here shifted by 0.01): the on-policy ratio
    check stops the first update with RatioCheckError, and the adapter is unchanged."""
    from promptloop.rl.trainer import RatioCheckError

    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=2)
    trainer.config.grpo.old_logprobs = "sampling"
    collect = trainer.collect

    def shifted(queries, step):
        batch = collect(queries, step)
        for action in batch.actions:
            action.sampling_logps = action.sampling_logps + 0.01
        return batch

    trainer.collect = shifted
    before = adapter_state(trainer)
    with pytest.raises(RatioCheckError, match=r"max \|ratio - 1\| = 0.00995 exceeds grpo.ratio_tolerance=0.001"):
        trainer.train()
    after = adapter_state(trainer)
    assert all(torch.equal(after[k], before[k]) for k in before)
