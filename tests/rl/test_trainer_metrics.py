"""What the trainer logs describes the step, whatever the micro-batching, failed rewards or number of processes."""
from types import SimpleNamespace

import pytest
import torch

import promptloop.rl.trainer as trainer_module
from promptloop.rewards import Reward
from promptloop.rl.advantages import GroupAdvantages
from promptloop.rl.trainer import GRPOTrainer, combine_process_metrics
from trainer_helpers import tiny_trainer


def _one_update(run_dir, vlm_dir, reward=None, **grpo) -> dict[str, float]:
    trainer = tiny_trainer(run_dir, vlm_dir, reward=reward, max_steps=1, learning_rate=1e-12, **grpo)
    return trainer.update(trainer.collect(trainer.stream.take(2), 0))


def test_logged_loss_is_the_optimizer_steps_loss_whatever_the_micro_batching(tmp_path, vlm_dir, monkeypatch):
    # every advantage 1: on-policy, the token-mean surrogate of the mini-batch is exactly -1
    monkeypatch.setattr(trainer_module, "group_advantages", lambda rewards, groups, scale: GroupAdvantages(
        torch.ones(len(rewards)), torch.ones(len(rewards), dtype=torch.bool), 0, 0.0))
    for micro_batch_size in (16, 2):
        metrics = _one_update(tmp_path / f"mb{micro_batch_size}", vlm_dir, micro_batch_size=micro_batch_size)
        assert metrics["losses/loss"] == pytest.approx(-1.0, abs=1e-5), micro_batch_size
        assert metrics["losses/ratio_mean"] == pytest.approx(1.0, abs=1e-5)


class _FirstGroupFails(Reward):
    """The first query's 8 trajectories get NaN (a reward server error), the second's 0/1."""

    name = "first_group_fails"

    def score_batch(self, images, queries, metadata):
        return torch.tensor([float("nan") if i < 8 else float(i % 2) for i in range(len(images))])


def test_micro_batches_without_valid_tokens_leave_the_metrics_alone(tmp_path, vlm_dir):
    metrics = _one_update(tmp_path / "run", vlm_dir, reward=_FirstGroupFails(), micro_batch_size=1)
    assert metrics["reward/dropped"] == 8
    for key in ("losses/ratio_mean", "losses/ratio_max", "losses/ratio_min"):  # on-policy: all 1
        assert metrics[key] == pytest.approx(1.0, abs=1e-5), key
    whole = _one_update(tmp_path / "whole", vlm_dir, reward=_FirstGroupFails(), micro_batch_size=16)
    assert metrics["policy/entropy"] == pytest.approx(whole["policy/entropy"], rel=1e-4)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # optimizer.step is stubbed
def test_sequence_normalisation_gradient_ignores_failed_rewards(tmp_path, vlm_dir, monkeypatch):
    grads = {}
    for name, reward in (("failed", _FirstGroupFails()), ("clean", None)):
        trainer = tiny_trainer(tmp_path / name, vlm_dir, reward=reward, max_steps=1, micro_batch_size=4,
                               loss_normalisation="sequence")
        batch = trainer.collect(trainer.stream.take(2), 0)
        if name == "clean":  # the same trajectories with the first group's rewards removed by hand
            batch.actions = [a for a in batch.actions if a.trajectory >= 8]
            for a in batch.actions:
                a.trajectory -= 8
            batch.rewards = _FirstGroupFails().score_batch([None] * 16, [], [])[8:]
            batch.group_ids = batch.group_ids[8:] - 1
        captured = []
        monkeypatch.setattr(trainer.optimizer, "step", lambda: captured.append(
            [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]))
        trainer.update(batch)
        grads[name] = captured
    assert len(grads["failed"]) == len(grads["clean"]) == 1
    for failed, clean in zip(grads["failed"][0], grads["clean"][0]):
        assert torch.allclose(failed, clean, atol=1e-7, rtol=1e-4)


def test_metrics_of_several_processes_combine_into_the_steps():
    per_process = [
        {"reward/mean": 1.0, "reward/std": 0.0, "reward/failures": 2.0, "losses/ratio_max": 1.2,
         "losses/ratio_min": 0.9, "prompt/words": 4.0, "losses/on_policy_ratio_deviation": 1e-6},
        {"reward/mean": 3.0, "reward/std": 0.0, "reward/failures": 1.0, "losses/ratio_max": 1.1,
         "losses/ratio_min": 0.8, "prompt/words": 6.0},
    ]
    combined = combine_process_metrics(per_process, [[1.0, 1.0], [3.0, 3.0]])
    assert combined["reward/mean"] == 2.0 and combined["reward/std"] == pytest.approx(torch.tensor(
        [1.0, 1.0, 3.0, 3.0]).std().item())
    assert combined["reward/failures"] == 3.0 and combined["prompt/words"] == 5.0
    assert combined["losses/ratio_max"] == 1.2 and combined["losses/ratio_min"] == 0.8
    assert combined["losses/on_policy_ratio_deviation"] == 1e-6  # reported by one process only


def test_a_skipped_fp16_step_lets_the_next_one_run():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler.scale(weight.sum() * float("inf")).backward()
    scaler.unscale_(optimizer)  # what accelerator.clip_grad_norm_ does before the trainer sees the inf norm
    GRPOTrainer._skip_optimizer_step(SimpleNamespace(accelerator=SimpleNamespace(scaler=scaler)))
    optimizer.zero_grad()
    scaler.scale(weight.sum()).backward()
    scaler.unscale_(optimizer)  # raised "unscale_() has already been called" before
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 15 and torch.allclose(weight, torch.full((2,), 0.9))


def test_evaluation_samples_in_rollout_sized_batches(tmp_path, vlm_dir, monkeypatch):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir)
    trainer.eval_queries = ["a", "b", "c", "d", "e"]
    trainer.config.backbone.rollout_batch_size = 2
    sizes = []
    rollout_chunk = trainer._rollout_chunk

    def recorded(queries, seeds, *args):
        sizes.append((list(queries), list(seeds)))
        return rollout_chunk(queries, seeds, *args)

    monkeypatch.setattr(trainer, "_rollout_chunk", recorded)
    result = trainer.evaluate()
    assert sizes == [(["a", "b"], [0, 1]), (["c", "d"], [2, 3]), (["e"], [4])]
    assert 0.0 <= result["eval/reward_mean"] <= 1.0
