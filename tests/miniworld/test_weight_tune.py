"""Reward fine-tuning of the UNet (``weight_tune``) on a tiny backbone, its evaluation, and the shipped tuned
backbone."""
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from promptloop.backbones import SamplerSettings, auto_backbone
from promptloop.miniworld.evaluate_weight_tune import SHIPPED_TUNED, evaluate_weight_tune, ship
from promptloop.miniworld.weight_tune import (WeightTuneConfig, checkpoint_pipelines, differentiable_preference,
                                              parse_args, sample_pixels, train)
from promptloop.rewards import load_reward

QUERIES = ["red circle", "big blue square top", "white", "small triangle left black"]
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_dir(tiny_backbone_a_dir):
    return tiny_backbone_a_dir


@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _config(tiny_dir, out, **kw) -> WeightTuneConfig:
    settings = dict(out=str(out), backbone=str(tiny_dir), steps=3, batch_size=2, num_inference_steps=3,
                    checkpoint_every=1, learning_rate=1e-3, progress=False) | kw
    return WeightTuneConfig(**settings)


@pytest.fixture(scope="module")
def straight_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    rows = train(_config(tiny_dir, out), log=lambda message: None)
    return out, rows


def _unet(run, step):
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "pipeline" / "unet" / UNET_WEIGHTS)


def test_sampler_is_the_stock_pipeline_sampler(tiny_pipe):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sample_pixels(tiny_pipe, QUERIES[:2], latents, num_inference_steps=4, guidance_scale=2.0)
    stock = tiny_pipe(QUERIES[:2], latents=latents.clone(), num_inference_steps=4, guidance_scale=2.0,
                      output_type="pt").images
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=0)


def test_differentiable_reward_equals_the_registry_score_and_has_gradients(tiny_pipe):
    reward = load_reward("miniworld-preference")
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pixels = sample_pixels(tiny_pipe, QUERIES, latents, num_inference_steps=3, guidance_scale=2.0)
    pixels.requires_grad_(True)
    ours = differentiable_preference(reward, pixels, QUERIES)
    registry = reward(pixels, QUERIES).scores
    torch.testing.assert_close(ours.detach(), registry, atol=1e-5, rtol=0)
    ours.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_a_few_steps_change_the_unet_and_log_reward_queries(straight_run, tiny_dir):
    out, rows = straight_run
    before = load_file(tiny_dir / "unet" / UNET_WEIGHTS)
    after = _unet(out, 3)
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 0
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["reward_queries"] for r in logged] == [2, 4, 6] and logged == rows
    assert all(torch.isfinite(torch.tensor(r["proxy_mean"])) for r in logged)
    assert sorted(checkpoint_pipelines(out)) == [2, 4, 6]


def test_resume_gives_the_weights_of_an_uninterrupted_run(straight_run, tiny_dir, tmp_path):
    out, rows = straight_run
    train(_config(tiny_dir, tmp_path, steps=2), log=lambda message: None)
    resumed_rows = train(_config(tiny_dir, tmp_path, steps=3, resume=True), log=lambda message: None)
    straight, resumed = _unet(out, 3), _unet(tmp_path, 3)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0)
    assert [r["proxy_mean"] for r in resumed_rows] == pytest.approx([r["proxy_mean"] for r in rows], abs=1e-6)


def test_checkpoint_pipeline_loads_with_from_pretrained_and_samples(straight_run):
    out, _ = straight_run
    folder = checkpoint_pipelines(out)[6]
    assert not list(folder.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    image = pipe("red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_evaluation_curve_and_ship(straight_run, tmp_path):
    out, _ = straight_run
    curve = evaluate_weight_tune(out, tmp_path / "eval", prompts=2, seeds=1, log=lambda message: None)
    assert [r["reward_queries"] for r in curve["reward/gold"]] == [0, 2, 4, 6]
    assert curve["reward/preference"][0]["diff"] == 0.0
    assert (tmp_path / "eval" / "weight_tune_curve.png").is_file()
    dest = ship(out, 4, curve, tmp_path / "tuned", rule="test")
    meta = json.loads((tmp_path / "tuned.meta.json").read_text())
    assert meta["step"] == 2 and meta["reward_queries"] == 4
    assert set(meta["evaluation"]["reward/gold"]) == {"backbone_a", "tuned"}
    assert StableDiffusionPipeline.from_pretrained(dest).unet.dtype == torch.float32


def test_bad_settings_fail_fast_with_clear_messages(tiny_dir, straight_run, tmp_path):
    with pytest.raises(ValueError, match="grad_steps"):
        _config(tiny_dir, tmp_path, grad_steps=4)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        _config(tiny_dir, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="model_index.json"):
        _config(tmp_path, tmp_path)
    with pytest.raises(ValueError, match="out is empty"):
        _config(tiny_dir, "")
    out, _ = straight_run
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_config(tiny_dir, out, steps=4), log=lambda message: None)
    with pytest.raises(ValueError, match="learning_rate"):
        train(_config(tiny_dir, out, steps=4, resume=True, learning_rate=5e-4), log=lambda message: None)
    with pytest.raises(SystemExit):
        parse_args([])  # --out is required
    config = parse_args(["--out", str(tmp_path), "--backbone", str(tiny_dir), "--grad-steps", "2", "--no-progress"])
    assert config.grad_steps == 2 and config.progress is False


def test_shipped_tuned_backbone_loads_and_samples():
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_TUNED)
    assert pipe.unet.dtype == torch.float32 and pipe.scheduler.config.prediction_type == "v_prediction"
    meta = json.loads(SHIPPED_TUNED.with_name(SHIPPED_TUNED.name + ".meta.json").read_text())
    assert meta["reward_queries"] > 0
    backbone = auto_backbone(str(SHIPPED_TUNED))
    state = backbone.prepare(SamplerSettings(num_inference_steps=4, guidance_scale=2.0),
                             [torch.Generator().manual_seed(0)])
    embeds = backbone.encode_prompts(["red circle"])
    for i in range(state.num_steps):
        backbone.step(state, i, embeds)
    image = backbone.decode(state.latents)
    assert image.shape == (1, 3, 32, 32) and image.isfinite().all()
