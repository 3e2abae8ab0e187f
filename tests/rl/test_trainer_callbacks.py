"""Trainer callbacks: the hooks' order and arguments, stopping from a hook, early stopping on a metric, and
stopping on SIGTERM (preemption)."""
from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import pytest

from promptloop.rl.callbacks import EarlyStoppingCallback, TrainerCallback
from promptloop.rl.checkpoint import list_checkpoints, read_meta
from trainer_helpers import adapter_state, tiny_trainer


class Recorder(TrainerCallback):
    def __init__(self, stop_after=None):
        self.events, self.stop_after = [], stop_after

    def on_train_begin(self, trainer):
        self.events.append(("begin", trainer.step))

    def on_step_end(self, trainer, metrics):
        self.events.append(("step", trainer.step, "reward/mean" in metrics))
        if trainer.step == self.stop_after:
            trainer.should_stop = True

    def on_save(self, trainer, checkpoint):
        self.events.append(("save", trainer.step, read_meta(checkpoint)["step"]))

    def on_train_end(self, trainer, history):
        self.events.append(("end", trainer.step, len(history), trainer.policy_dir.is_dir()))


def test_hooks_run_in_order_with_the_runs_state(tmp_path, vlm_dir):
    recorder = Recorder()
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=3)  # checkpoints at 2 and at the end (3)
    trainer.callbacks.append(recorder)
    trainer.train()
    assert recorder.events == [("begin", 0), ("step", 1, True), ("step", 2, True), ("save", 2, 2),
                               ("step", 3, True), ("save", 3, 3), ("end", 3, 3, True)]


def test_a_callback_stops_training_and_the_run_resumes_to_max_steps(tmp_path, vlm_dir):
    straight = tiny_trainer(tmp_path / "straight", vlm_dir, max_steps=4)
    straight.train()
    stopped = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=4)
    stopped.callbacks.append(Recorder(stop_after=1))
    history = stopped.train()
    assert stopped.step == 1 and len(history) == 1
    assert [read_meta(c)["step"] for c in list_checkpoints(stopped.run_dir)] == [1]
    assert json.loads((stopped.policy_dir / "policy_config.json").read_text())  # the final policy is written
    assert "| steps | 1 |" in (stopped.policy_dir / "README.md").read_text()

    resumed = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=4)
    resumed.train(resume=True)
    assert resumed.step == 4
    a, b = adapter_state(straight), adapter_state(resumed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def _steps(callback: EarlyStoppingCallback, values) -> list[bool]:
    """Feed one metrics dict per step; the trainer's should_stop after each."""
    trainer = SimpleNamespace(step=0, should_stop=False)
    stops = []
    for value in values:
        trainer.step += 1
        callback.on_step_end(trainer, {} if value is None else {"eval/reward_mean": value})
        stops.append(trainer.should_stop)
    return stops


def test_early_stopping_counts_only_the_steps_that_report_the_metric():
    callback = EarlyStoppingCallback(patience=2, min_delta=0.01)
    stops = _steps(callback, [0.5, None, 0.6, 0.605, None, 0.6])
    assert stops == [False, False, False, False, False, True]
    assert (callback.best, callback.best_step) == (0.6, 3)  # 0.605 is within min_delta: no improvement
    lower = EarlyStoppingCallback(metric="eval/reward_mean", mode="min", patience=1)
    assert _steps(lower, [0.5, 0.4, 0.45]) == [False, False, True]


@pytest.mark.parametrize("kwargs,match", [({"patience": 0}, "patience=0"), ({"min_delta": -1.0}, "min_delta"),
                                          ({"mode": "up"}, "mode='up'")])
def test_early_stopping_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStoppingCallback(**kwargs)


class SigtermAt(TrainerCallback):
    """Sends this process a real SIGTERM at the end of step ``step`` (as a preemption would, at any moment)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, metrics):
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_run_resumes_exactly(tmp_path, vlm_dir):
    straight = tiny_trainer(tmp_path / "straight", vlm_dir, max_steps=4)
    straight.train()
    before = signal.getsignal(signal.SIGTERM)
    preempted = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=4)
    preempted.config.logging.checkpoint_every = 10  # only the SIGTERM's checkpoint
    ended = Recorder()
    preempted.callbacks += [SigtermAt(step=1), ended]
    history = preempted.train()
    assert preempted.terminated and preempted.step == 1 and len(history) == 1
    assert [read_meta(c)["step"] for c in list_checkpoints(preempted.run_dir)] == [1]
    assert not preempted.policy_dir.exists(), "a preempted run is not finished: no final policy"
    assert ended.events[-1][0] == "save", "on_train_end is not called after a SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler is back after training"

    resumed = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=4)
    resumed.train(resume=True)
    assert not resumed.terminated and resumed.step == 4 and resumed.policy_dir.is_dir()
    a, b = adapter_state(straight), adapter_state(resumed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
