"""``promptloop miniworld build``: the recipe that rebuilds every shipped artefact, run end to end at tiny sizes."""
import pytest
import torch
from diffusers import StableDiffusionPipeline

from promptloop.backbones import auto_backbone
from promptloop.cli import main
from promptloop.miniworld.build import STEP_NAMES, plan
from promptloop.miniworld.policy_warmstart import miniworld_policy_config
from promptloop.policy import PromptPolicy
from promptloop.rewards import load_reward


def test_dry_run_prints_every_step_in_order(tmp_path, capsys):
    main(["miniworld", "build", "--dry-run", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    positions = [printed.index(f"] {name} (") for name in STEP_NAMES]
    assert positions == sorted(positions)
    assert "python -m promptloop.miniworld.train_backbone" in printed
    assert not any(tmp_path.iterdir())


def test_unknown_steps_and_presets_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown build steps"):
        plan(tmp_path, only=["vae"])
    with pytest.raises(ValueError, match="preset must be"):
        plan(tmp_path, preset="huge")


def test_tiny_build_writes_artefacts_that_load_through_the_standard_loaders(tmp_path):
    out = tmp_path / "assets"
    main(["miniworld", "build", "--preset", "tiny", "--out", str(out)])
    pipe = StableDiffusionPipeline.from_pretrained(out / "backbone_a")
    assert pipe.unet.dtype.is_floating_point and (out / "backbone_a.eval.json").is_file()
    reward = load_reward("miniworld-preference", path=out / "preference")
    images = pipe(["red circle"], num_inference_steps=2, output_type="pil").images
    assert reward(images, ["red circle"]).scores.isfinite().all()
    policy = PromptPolicy.from_pretrained(out / "policy", miniworld_policy_config("closed", out / "policy"))
    assert policy.model is not None
    trained = PromptPolicy.from_pretrained(out / "policy_grpo", device="cpu", is_trainable=False)
    assert trained.has_adapter and trained.config.model_name_or_path == str((out / "policy_edit").resolve())
    tuned = StableDiffusionPipeline.from_pretrained(out / "backbone_a_tuned")
    assert (out / "backbone_a_tuned.meta.json").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(tuned.unet.state_dict().values(), pipe.unet.state_dict().values()))
    flow = auto_backbone(str(out / "backbone_b"))
    assert type(flow.pipe).__name__ == "StableDiffusion3Pipeline" and (out / "backbone_b.eval.json").is_file()
