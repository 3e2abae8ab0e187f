"""NaN/inf in latents, log-probs or gradients during training: detected, reported with the training step, the
step skipped (nothing applied) or, past grpo.nonfinite_rollout_limit, training stopped with checkpoints intact."""
from __future__ import annotations

import pytest
import torch

from fault_helpers import all_finite, load_whole_checkpoint, max_difference
from promptloop.rl.checkpoint import latest_checkpoint
from promptloop.rl.trainer import NonFiniteRolloutError
from trainer_helpers import adapter_state, tiny_trainer

SMALL = dict(prompts_per_step=1, group_size=4, micro_batch_size=4)


def _nan_unet_during(trainer, training_steps):
    """NaN UNet outputs while the trainer rolls out any of ``training_steps`` (1-based)."""

    def hook(module, args, output):
        if trainer.step + 1 in training_steps:
            return (output[0] * float("nan"),) + tuple(output[1:])

    return trainer.backbone.pipe.unet.register_forward_hook(hook)


def test_nan_latents_skip_the_step_with_its_number(tmp_path, vlm_dir):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=3, **SMALL)
    _nan_unet_during(trainer, {2})
    with pytest.warns(RuntimeWarning, match=r"training step 2 skipped.*Non-finite latents.*sampler step 0"):
        history = trainer.train()
    assert [h["train/nonfinite_rollout_skips"] for h in history] == [0, 1, 0]
    assert trainer.step == 3 and all_finite(adapter_state(trainer))


def test_persistent_nan_latents_stop_cleanly_and_the_run_resumes(tmp_path, vlm_dir):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=4, nonfinite_rollout_limit=1, **SMALL)
    trainer.config.logging.checkpoint_every = 1
    handle = _nan_unet_during(trainer, {2, 3, 4})
    with pytest.warns(RuntimeWarning, match="training step 2 skipped"), \
            pytest.raises(NonFiniteRolloutError, match=r"training step 3: Non-finite latents.*sampler step 0"):
        trainer.train()
    handle.remove()
    assert load_whole_checkpoint(latest_checkpoint(trainer.run_dir))["step"] == 2  # the skipped step is saved too
    resumed = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=4, **SMALL)
    history = resumed.train(resume=True)
    assert resumed.step == 4 and len(history) == 2 and all_finite(adapter_state(resumed))


def test_nan_log_probs_skip_the_optimizer_step_and_apply_nothing(tmp_path, vlm_dir):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=1, **SMALL)
    log_probs = trainer.policy.log_probs

    def nan_log_probs(samples):
        out = log_probs(samples)
        out.log_probs = out.log_probs + float("nan")
        return out

    trainer.policy.log_probs = nan_log_probs
    before = adapter_state(trainer)
    with pytest.warns(RuntimeWarning, match=r"training step 1: 1 optimizer step\(s\) skipped"):
        history = trainer.train()
    assert history[0]["train/nonfinite_skips"] == 1
    assert max_difference(before, adapter_state(trainer)) == 0
    assert not trainer.optimizer.state or all(
        torch.isfinite(v).all() for s in trainer.optimizer.state.values() for v in s.values())


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_nan_gradients_from_a_finite_loss_are_never_applied(tmp_path, vlm_dir, max_grad_norm):
    """With clipping off (max_grad_norm=0) no norm is computed; the gradients are still checked."""
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=2, max_grad_norm=max_grad_norm, **SMALL)
    poisoned = next(p for p in trainer.model.parameters() if p.requires_grad)
    calls = []
    poisoned.register_hook(lambda grad: grad * float("nan") if not calls.append(1) and len(calls) == 1 else grad)
    with pytest.warns(RuntimeWarning, match="training step 1: 1 optimizer step"):
        history = trainer.train()
    assert [h["train/nonfinite_skips"] for h in history] == [1, 0]
    assert all_finite(adapter_state(trainer))
