"""The learning-rate schedule: warm-up, then constant / linear / cosine decay, stepped once per optimizer step."""
from __future__ import annotations

import math

import pytest

from promptloop.rl.trainer import learning_rate_factor
from trainer_helpers import tiny_trainer


def test_warmup_then_decay_shapes():
    assert [learning_rate_factor(s, 4, 20, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate_factor(0, 0, 20, "constant") == 1.0
    linear = [learning_rate_factor(s, 4, 20, "linear") for s in range(21)]
    assert linear[:4] == [0.25, 0.5, 0.75, 1.0] and linear[4] == 1.0
    assert linear[12] == pytest.approx(0.5) and linear[20] == 0.0
    assert all(a > b for a, b in zip(linear[4:], linear[5:]))
    cosine = [learning_rate_factor(s, 0, 10, "cosine") for s in range(11)]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0)
    assert cosine[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert learning_rate_factor(30, 4, 20, "linear") == 0.0  # past the end (a resumed, longer run) stays at 0
    with pytest.raises(ValueError, match="lr_scheduler_type='step'"):
        learning_rate_factor(5, 0, 10, "step")


def test_the_trainer_follows_the_schedule_per_optimizer_step(tmp_path, vlm_dir):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=3, mini_batches=2, warmup_steps=2,
                           lr_scheduler_type="cosine")
    history = trainer.train()
    total = 3 * 2  # max_steps x optimizer steps per training step
    base = trainer.config.grpo.learning_rate
    # train/lr is the rate after the step's optimizer steps: the one the next optimizer step uses
    assert [h["train/lr"] for h in history] == pytest.approx(
        [base * learning_rate_factor(2 * k, 2, total, "cosine") for k in (1, 2, 3)])
    assert history[-1]["train/lr"] == pytest.approx(0.0, abs=1e-12)
