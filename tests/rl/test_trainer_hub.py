"""The trained policy at the end of a run: ``<output_dir>/policy`` with its model card, and the push to the hub
(``fake_hub`` records the upload instead of the network)."""
from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from promptloop.configuration import ConfigError, build
from promptloop.policy import PromptPolicy
from promptloop.rl.checkpoint import latest_checkpoint, read_meta, resume_checkpoint
from promptloop.rl.config import TrainConfig
from promptloop.rl.trainer import GRPOTrainer
from trainer_helpers import adapter_state, tiny_trainer


def _hub_trainer(tmp_path, vlm_dir, max_steps=2, **logging):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=max_steps)
    for key, value in dict(push_to_hub=True, hub_model_id="me/tiny-run", **logging).items():
        setattr(trainer.config.logging, key, value)
    return trainer


def test_training_writes_the_final_policy_with_a_card_and_pushes_it(tmp_path, vlm_dir, fake_hub):
    trainer = _hub_trainer(tmp_path, vlm_dir, hub_private_repo=True, hub_strategy="end")
    with pytest.warns(UserWarning, match="local path"):
        history = trainer.train()
    final = trainer.policy_dir
    assert final == tmp_path / "run" / "policy"
    saved = load_file(str(final / "adapter_model.safetensors"))
    checkpoint = load_file(str(latest_checkpoint(trainer.run_dir) / "policy" / "adapter_model.safetensors"))
    assert saved.keys() == checkpoint.keys() and all(torch.equal(saved[k], checkpoint[k]) for k in saved)

    card = ModelCard.load(final / "README.md")
    rewards = [h["reward/mean"] for h in history]
    assert "| steps | 2 |" in card.text and "| reward | `lowercase_start` |" in card.text
    assert f"| {sum(rewards) / 2:.4f} | {sum(rewards) / 2:.4f} | not logged |" in card.text
    assert 'from_pretrained("me/tiny-run"' in card.text

    assert [c[:2] for c in fake_hub.calls] == [("create_repo", "me/tiny-run"), ("upload_folder", "me/tiny-run")]
    assert fake_hub.calls[0][2]["private"] is True
    assert fake_hub.calls[1][2]["commit_message"] == "PromptLoop policy, step 2"
    remote = fake_hub.remote / "me/tiny-run"
    assert sorted(p.name for p in remote.iterdir()) == sorted(p.name for p in final.iterdir())
    assert not list(final.parent.glob(".tmp-*")), "no temporary folder is left behind"


def test_a_failed_upload_keeps_the_saved_policy_and_says_how_to_retry(tmp_path, vlm_dir, fake_hub):
    def offline(self, *args, **kwargs):
        raise ConnectionError("no network")

    fake_hub.upload_folder = offline
    trainer = _hub_trainer(tmp_path, vlm_dir, hub_strategy="end")
    with pytest.raises(RuntimeError, match=r"saved in .*run/policy.*hf upload me/tiny-run"), \
            pytest.warns(UserWarning, match="local path"):
        trainer.train()
    assert (trainer.policy_dir / "adapter_model.safetensors").is_file()


def test_every_save_uploads_each_checkpoint_and_survives_a_failed_upload(tmp_path, vlm_dir, fake_hub):
    real_upload, attempts = fake_hub.upload_folder, []

    def flaky(self, **kwargs):
        attempts.append(kwargs["commit_message"])
        if len(attempts) == 1:
            raise ConnectionError("network down")
        return real_upload(self, **kwargs)

    fake_hub.upload_folder = flaky
    trainer = _hub_trainer(tmp_path, vlm_dir, max_steps=6)  # checkpoints at steps 2, 4, 6; every_save by default
    assert trainer.config.logging.hub_strategy == "every_save"
    with pytest.warns(RuntimeWarning, match="training step 2: the upload of the checkpoint to 'me/tiny-run' "
                                            "failed .*network down.*training goes on"):
        trainer.train()
    assert trainer.step == 6
    # step 2 failed and was not retried by itself; steps 4 and 6 uploaded; the end adds no duplicate of step 6
    assert attempts == [f"PromptLoop policy, step {n}" for n in (2, 4, 6)]
    uploaded = load_file(str(fake_hub.remote / "me/tiny-run" / "adapter_model.safetensors"))
    final = load_file(str(trainer.policy_dir / "adapter_model.safetensors"))
    assert all(torch.equal(uploaded[k], final[k]) for k in final)
    assert "| steps | 6 |" in (fake_hub.remote / "me/tiny-run" / "README.md").read_text()


def test_hub_settings_fail_fast(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    data = {"backbone": {"name_or_path": "unused"}, "data": {"prompts": str(prompts)},
            "logging": {"output_dir": str(tmp_path / "run"), "report_to": "none", "push_to_hub": True}}
    with pytest.raises(ConfigError, match="hub_model_id is empty"):
        build(TrainConfig, data)
    data["logging"]["hub_model_id"] = "me/a/b"
    with pytest.raises(ConfigError, match="hub_model_id='me/a/b' is not a hub repo id"):
        build(TrainConfig, data)
    data["logging"]["hub_model_id"] = "me/run"
    config = build(TrainConfig, data)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the missing token was reported")

    monkeypatch.setattr("promptloop.backbones.load_backbone", no_model)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="hf auth login"):
        GRPOTrainer.from_config(config)


def test_runs_without_push_write_the_policy_and_upload_nothing(tmp_path, vlm_dir, fake_hub):
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, max_steps=1)
    trainer.train()
    card = (trainer.policy_dir / "README.md").read_text()
    assert "PATH_TO_THIS_FOLDER" in card and "| steps | 1 |" in card
    assert json.loads((trainer.policy_dir / "policy_config.json").read_text())["model_name_or_path"] == str(vlm_dir)
    assert json.loads((trainer.policy_dir / "loop_config.json").read_text()) == {  # how it was trained to run
        "num_refinements": 1, "initial_rewrite": False}
    assert (latest_checkpoint(trainer.run_dir) / "policy" / "loop_config.json").is_file()
    assert fake_hub.calls == []
    with pytest.raises(ValueError, match=r"is a training run folder, not a policy: load the trained policy .*/policy"):
        PromptPolicy.from_pretrained(trainer.run_dir, device="cpu")
    assert PromptPolicy.from_pretrained(trainer.policy_dir, device="cpu").has_adapter


def test_checkpoint_strategy_lets_a_run_resume_from_the_hub_exactly(tmp_path, vlm_dir, fake_hub, hub_cache,
                                                                      monkeypatch):
    """hub_strategy checkpoint: each checkpoint also goes whole to last-checkpoint/ (replacing the previous one);
    another machine resumes from the repo id as it was after step 2 and ends where an uninterrupted run ends."""
    from huggingface_hub import constants

    remote, after_step_2 = fake_hub.remote / "me/tiny-run", tmp_path / "repo-after-step-2"
    real_upload = fake_hub.upload_folder

    def upload_and_keep_step_2(self, **kwargs):
        result = real_upload(self, **kwargs)
        if kwargs["commit_message"] == "PromptLoop checkpoint, step 2":
            shutil.copytree(remote, after_step_2)  # the repo as a job preempted during step 3 left it
        return result

    fake_hub.upload_folder = upload_and_keep_step_2
    straight = _hub_trainer(tmp_path, vlm_dir, max_steps=4, hub_strategy="checkpoint")
    with pytest.warns(UserWarning, match="local path"):
        straight.train()
    uploads = [c[2] for c in fake_hub.calls if c[0] == "upload_folder"]
    assert [(u["commit_message"], u["path_in_repo"]) for u in uploads] == [
        ("PromptLoop policy, step 2", None), ("PromptLoop checkpoint, step 2", "last-checkpoint"),
        ("PromptLoop policy, step 4", None), ("PromptLoop checkpoint, step 4", "last-checkpoint")]
    assert all(u["delete_patterns"] == "*" for u in uploads if u["path_in_repo"])
    assert json.loads((remote / "last-checkpoint" / "checkpoint.json").read_text())["step"] == 4
    pushed = {p.name for p in (remote / "last-checkpoint").iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "rng.pt", "policy"} <= pushed
    assert (remote / "adapter_model.safetensors").is_file(), "the repo root stays a loadable policy"

    hub_cache.add("me/tiny-run", after_step_2, "3" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache.path))  # as HF_HUB_CACHE=... would
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elsewhere = tiny_trainer(tmp_path / "elsewhere", vlm_dir, max_steps=4)
    resume = resume_checkpoint(elsewhere.run_dir, "me/tiny-run")
    assert read_meta(resume)["step"] == 2 and resume.name == "last-checkpoint"
    elsewhere.train(resume=resume)
    a, b = adapter_state(straight), adapter_state(elsewhere)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert elsewhere.stream.position == straight.stream.position

    with pytest.raises(FileNotFoundError, match="neither a local checkpoint folder nor a hub repo holding "
                                                "last-checkpoint/"):
        resume_checkpoint(elsewhere.run_dir, "me/never-pushed")
