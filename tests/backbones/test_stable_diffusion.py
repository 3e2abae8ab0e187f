"""SD1.x (epsilon, DDIM) and SD2.x (v-prediction, Euler): the rollout is the stock pipeline's own sampling."""
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from promptloop.backbones import (RefinementSchedule, SamplerSettings, StableDiffusionBackbone, auto_backbone,
                                  load_backbone, rollout)
from promptloop.testing.tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline

from .conftest import stock_images

QUERIES, SEEDS = ["a red cat", "a blue house by the sea"], [7, 8]


@pytest.mark.parametrize("family", ["sd_backbone", "sd2_backbone"])
@pytest.mark.parametrize("guidance, negative, rescale", [(6.0, "blurry, dark", 0.0), (1.0, None, 0.0),
                                                        (4.0, None, 0.7)])
def test_no_refinement_equals_stock_pipeline(request, family, guidance, negative, rescale):
    backbone = request.getfixturevalue(family)
    settings = SamplerSettings(num_inference_steps=5, guidance_scale=guidance, negative_prompt=negative,
                               extra={"guidance_rescale": rescale})
    out = rollout(backbone, QUERIES, SEEDS, settings)
    expected = stock_images(backbone.pipe, QUERIES, SEEDS, num_inference_steps=5, guidance_scale=guidance,
                            negative_prompt=None if negative is None else [negative] * 2, guidance_rescale=rescale)
    torch.testing.assert_close(out.images, expected, atol=1e-6, rtol=0)


def test_default_settings_equal_default_call(sd2_backbone):
    out = rollout(sd2_backbone, QUERIES[:1], SEEDS[:1], SamplerSettings(num_inference_steps=3))
    expected = stock_images(sd2_backbone.pipe, QUERIES[:1], SEEDS[:1], num_inference_steps=3)
    torch.testing.assert_close(out.images, expected, atol=1e-6, rtol=0)


def test_v_prediction_switch_and_previews(sd2_backbone, record_steps):
    """On SD2 (Euler, v-prediction) a switch at k leaves steps < k unchanged; previews decode the step's x0."""
    settings = SamplerSettings(num_inference_steps=5, guidance_scale=5.0, preview_size=None)
    base = record_steps(sd2_backbone)
    rollout(sd2_backbone, QUERIES[:1], SEEDS[:1], settings)
    base.close()
    rec = record_steps(sd2_backbone)
    seen = []
    out = rollout(sd2_backbone, QUERIES[:1], SEEDS[:1], settings, RefinementSchedule.explicit([2]),
                  refine=lambda obs: (seen.extend(obs), ["a green dragon"])[1])
    assert all(torch.equal(base.latents[i], rec.latents[i]) for i in range(2))
    assert all((base.latents[i] - rec.latents[i]).abs().max() > 1e-4 for i in range(2, 5))
    expected_preview = sd2_backbone.decode(rec.x0[1], preview=True)
    assert torch.equal(torch.tensor(list(seen[0].preview.getdata())),
                       (expected_preview[0].permute(1, 2, 0) * 255).round().to(torch.uint8).reshape(-1, 3))
    assert out.trajectories[0].prompts == ["a red cat", "a green dragon"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_formula_matches_ddim_pred_original_sample(prediction_type):
    """The fallback used for schedulers without pred_original_sample (DPM-Solver, UniPC, ...) agrees with DDIM."""
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    sample, prediction = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = scheduler.timesteps[3]
    out = scheduler.step(prediction, t, sample)
    without = type("Out", (), {"prev_sample": out.prev_sample})()
    x0 = StableDiffusionBackbone._x0(without, scheduler, sample, prediction, t, 3)
    torch.testing.assert_close(x0, out.pred_original_sample, atol=1e-5, rtol=1e-5)


FLOW_SIGMAS = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow_sigmas"])
def test_scheduler_without_pred_original_sample(sd_backbone, flow):
    """A user-swapped DPM-Solver++ scheduler stays in effect (rollout == stock call) and previews still work."""
    pipe = sd_backbone.pipe
    original = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config, **(FLOW_SIGMAS if flow else {}))
    try:
        settings = SamplerSettings(num_inference_steps=4, guidance_scale=3.0, preview_size=16)
        seen = []
        out = rollout(sd_backbone, QUERIES[:1], SEEDS[:1], settings, RefinementSchedule.uniform(1),
                      refine=lambda obs: (seen.extend(obs), [o.prompt for o in obs])[1])
        expected = stock_images(pipe, QUERIES[:1], SEEDS[:1], num_inference_steps=4, guidance_scale=3.0)
        torch.testing.assert_close(out.images, expected, atol=1e-6, rtol=0)
        assert seen[0].preview.size == (16, 16)
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("kind", ["dpm", "dpm_karras", "dpm_flow", "unipc_karras", "unipc_flow"])
def test_x0_of_multistep_solvers_is_the_one_they_step_with(kind):
    """DPM-Solver++ and UniPC return no pred_original_sample; the x0 of the preview equals the one the solver
    converts the model output to (its ``model_outputs[-1]``), flow sigmas and Karras sigmas included."""
    from diffusers import UniPCMultistepScheduler

    from promptloop.testing.tiny_pipelines import SD_SCHEDULER_CONFIG

    scheduler = {
        "dpm": lambda: DPMSolverMultistepScheduler(**SD_SCHEDULER_CONFIG),
        "dpm_karras": lambda: DPMSolverMultistepScheduler(**SD_SCHEDULER_CONFIG, use_karras_sigmas=True),
        "dpm_flow": lambda: DPMSolverMultistepScheduler(**SD_SCHEDULER_CONFIG, **FLOW_SIGMAS),
        "unipc_flow": lambda: UniPCMultistepScheduler(**SD_SCHEDULER_CONFIG, **FLOW_SIGMAS),
        "unipc_karras": lambda: UniPCMultistepScheduler(**SD_SCHEDULER_CONFIG, use_karras_sigmas=True),
    }[kind]()
    scheduler.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps[:4]):
        prediction = torch.randn(2, 4, 8, 8, generator=g)
        out = scheduler.step(prediction, t, sample)
        x0 = StableDiffusionBackbone._x0(out, scheduler, sample, prediction, t, i)
        torch.testing.assert_close(x0, scheduler.model_outputs[-1], atol=1e-5, rtol=1e-5)
        sample = out.prev_sample


def test_preview_decoder_is_used_for_previews_only(sd_backbone):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).eval()
    with_tiny = StableDiffusionBackbone.from_pipeline(sd_backbone.pipe, preview_decoder=tiny)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        preview = with_tiny.decode(latents, size=32, preview=True)
        expected = (tiny.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        expected = torch.nn.functional.interpolate(expected, size=(32, 32), mode="bilinear", antialias=True)
        torch.testing.assert_close(preview, expected.clamp(0, 1))
        torch.testing.assert_close(with_tiny.decode(latents), sd_backbone.decode(latents))


def test_from_pretrained_rejects_other_family(tmp_path):
    tiny_sdxl_pipeline().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a StableDiffusionXLPipeline.*auto_backbone"):
        StableDiffusionBackbone.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no model_index.json"):
        StableDiffusionBackbone.from_pretrained(tmp_path / "unet")
    assert type(auto_backbone(tmp_path)).__name__ == "StableDiffusionXLBackbone"


def test_from_pipeline_keeps_the_users_pipeline_and_checks_the_class(sd_backbone, sdxl_backbone):
    wrapped = auto_backbone(sd_backbone.pipe, clip_skip=1)
    assert wrapped.pipe is sd_backbone.pipe and wrapped.clip_skip == 1
    with pytest.raises(TypeError, match="expects one of \\('StableDiffusionPipeline',\\)"):
        StableDiffusionBackbone.from_pipeline(sdxl_backbone.pipe)
    with pytest.raises(ValueError, match="No promptloop backbone for"):
        auto_backbone(object())


def test_load_backbone_resolves_dtype_without_deprecation_warnings(tmp_path):
    tiny_sd_pipeline().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # diffusers >= 0.40 warns on torch_dtype
        backbone = load_backbone(tmp_path, "auto", "cpu")
        half = load_backbone(tmp_path, "bfloat16", "cpu")
    assert type(backbone).__name__ == "StableDiffusionBackbone"
    assert backbone.pipe.unet.dtype == torch.float32 and half.pipe.unet.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='fp32' is not a torch dtype name"):
        load_backbone(tmp_path, "fp32")


def test_load_backbone_picks_the_revision_and_the_weight_variant(tmp_path, hub_cache, monkeypatch):
    """A hub pipeline whose tag v1 holds only fp16-variant weight files: it loads with both chosen, not without."""
    from huggingface_hub import constants

    pipe = tiny_sd_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "saved", variant="fp16")
    assert not list((tmp_path / "saved" / "unet").glob("diffusion_pytorch_model.safetensors"))
    hub_cache.add("me/tiny-sd", tmp_path / "saved", "4" * 40, ("v1",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache.path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    backbone = load_backbone("me/tiny-sd", "float32", "cpu", revision="v1", variant="fp16")
    for name, param in backbone.pipe.unet.named_parameters():
        torch.testing.assert_close(param, dict(pipe.unet.named_parameters())[name], atol=0, rtol=0)
    no_main_branch = "'me/tiny-sd' is not a local diffusers pipeline folder.*hf download"
    with pytest.raises(OSError, match=no_main_branch):
        load_backbone("me/tiny-sd", "float32", "cpu", variant="fp16")
    with pytest.raises(OSError, match="no file named"):  # no default weight files, and no fall-back to pickle
        load_backbone("me/tiny-sd", "float32", "cpu", revision="v1")


def test_x0_of_edm_dpm_solver_is_the_edm_denoised_sample():
    """EDM-DPM-Solver (Playground v2.5) returns no pred_original_sample: x0 is its EDM preconditioning at the
    step's sigma, the pred_original_sample EDM-Euler returns for the same sample and model output."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    config = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type="epsilon")
    solver, euler = EDMDPMSolverMultistepScheduler(**config), EDMEulerScheduler(**config)
    g = torch.Generator().manual_seed(0)
    sample, prediction = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for scheduler in (solver, euler):
        scheduler.set_timesteps(6)
        scheduler.set_begin_index(3)
    out = solver.step(prediction, solver.timesteps[3], sample)
    assert getattr(out, "pred_original_sample", None) is None
    x0 = StableDiffusionBackbone._x0(out, solver, sample, prediction, solver.timesteps[3], 3)
    expected = euler.step(prediction, euler.timesteps[3], sample).pred_original_sample
    torch.testing.assert_close(x0, expected, atol=1e-5, rtol=1e-5)


def test_noise_level_reads_the_schedulers_sigmas(sd_backbone):
    """sigma / sqrt(1 + sigma^2) for sigma-space schedulers, continuous timesteps (CosXL) and EDM included; it is
    sqrt(1 - alpha_bar_t) for VP sigmas, the value DDIM (no sigmas) gets from alphas_cumprod."""
    from diffusers import EDMEulerScheduler, EulerDiscreteScheduler

    from promptloop.backbones.base import SamplerState
    from promptloop.testing.tiny_pipelines import SD_SCHEDULER_CONFIG

    def levels(scheduler):
        scheduler.set_timesteps(5)
        state = SamplerState(latents=torch.zeros(1), timesteps=scheduler.timesteps, scheduler=scheduler,
                             settings=SamplerSettings(), guidance_scale=1.0)
        return torch.tensor([sd_backbone.noise_level(state, i) for i in range(5)])

    def from_sigmas(scheduler):
        return scheduler.sigmas[:5] / (1 + scheduler.sigmas[:5] ** 2).sqrt()

    continuous = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG, prediction_type="v_prediction",
                                        timestep_type="continuous", use_karras_sigmas=True)
    edm = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    for scheduler in (continuous, edm):
        got = levels(scheduler)
        torch.testing.assert_close(got, from_sigmas(scheduler).float())
        assert got[0] > 0.99 and all(a > b for a, b in zip(got, got[1:]))
    ddim = DDIMScheduler(**SD_SCHEDULER_CONFIG, timestep_spacing="trailing")
    euler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG, timestep_spacing="trailing")
    torch.testing.assert_close(levels(euler), levels(ddim), atol=1e-3, rtol=0)
    flow = DPMSolverMultistepScheduler(**SD_SCHEDULER_CONFIG, **FLOW_SIGMAS)  # x_t = (1 - s) x0 + s noise
    got = levels(flow)
    torch.testing.assert_close(got, flow.sigmas[:5].float())
    assert got[0] > 0.99 and all(a > b for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("family", ["sd_backbone", "sdxl_backbone"])
def test_a_negative_prompt_per_prompt_equals_stock(request, family):
    backbone = request.getfixturevalue(family)
    negatives = ["blurry", "dark, low quality"]
    settings = SamplerSettings(num_inference_steps=3, guidance_scale=5.0, negative_prompt=negatives)
    out = rollout(backbone, QUERIES, SEEDS, settings)
    expected = stock_images(backbone.pipe, QUERIES, SEEDS, num_inference_steps=3, guidance_scale=5.0,
                            negative_prompt=negatives)
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=0)
    shared = rollout(backbone, QUERIES, SEEDS, SamplerSettings(num_inference_steps=3, guidance_scale=5.0,
                                                               negative_prompt=negatives[0]))
    torch.testing.assert_close(shared.images[0], out.images[0], atol=1e-5, rtol=0)
    assert (shared.images[1] - out.images[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="negative_prompt holds 1 prompts for 2 prompts; give one per prompt"):
        rollout(backbone, QUERIES, SEEDS, SamplerSettings(num_inference_steps=3, negative_prompt=negatives[:1]))
    with pytest.raises(TypeError, match="negative_prompt must be a str or a list of str"):
        rollout(backbone, QUERIES, SEEDS, SamplerSettings(num_inference_steps=3, negative_prompt=["a", None]))


def test_a_sampling_vae_decodes_with_the_rows_generators():
    """A ConsistencyDecoderVAE samples while decoding: the final decode draws from the rows' generators as the
    pipeline's does (same seed, same image, whatever the global RNG), previews from fresh ones seeded alike."""
    from diffusers import ConsistencyDecoderVAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = ConsistencyDecoderVAE(
            encoder_block_out_channels=(32, 64), encoder_down_block_types=("DownEncoderBlock2D",) * 2,
            decoder_block_out_channels=(32, 64, 64, 64), decoder_layers_per_block=1, encoder_layers_per_block=1,
        ).eval()
    pipe = tiny_sd_pipeline(seed=0)
    pipe.vae = vae
    backbone = StableDiffusionBackbone.from_pipeline(pipe)
    settings = SamplerSettings(num_inference_steps=3, guidance_scale=3.0, preview_size=None)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(rollout(backbone, QUERIES, SEEDS, settings, RefinementSchedule.explicit([2]),
                            refine=lambda obs: [o.prompt for o in obs]))
    assert torch.equal(runs[0].images, runs[1].images)
    first, second = ([list(t.previews[0].getdata()) for t in run.trajectories] for run in runs)
    assert first == second
    expected = stock_images(pipe, QUERIES, SEEDS, num_inference_steps=3, guidance_scale=3.0)
    torch.testing.assert_close(runs[0].images, expected, atol=1e-6, rtol=0)
