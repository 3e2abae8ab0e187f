"""SDXL (Euler, CFG, pooled embeds, time ids) and SDXL-turbo style (EulerAncestral, trailing, no CFG, 1-4 steps)."""
import pytest
import torch

from promptloop.backbones import RefinementSchedule, SamplerSettings, StableDiffusionXLBackbone, rollout

from .conftest import stock_images

QUERIES, SEEDS = ["a red cat", "a blue house by the sea"], [3, 4]


@pytest.mark.parametrize("guidance, negative, extra", [
    (5.0, "blurry", {}),
    (5.0, None, {"guidance_rescale": 0.5}),  # force_zeros_for_empty_prompt negatives
    (3.0, None, {"original_size": (128, 128), "crops_coords_top_left": (8, 0), "target_size": (64, 64)}),
])
def test_sdxl_no_refinement_equals_stock_pipeline(sdxl_backbone, guidance, negative, extra):
    settings = SamplerSettings(num_inference_steps=5, guidance_scale=guidance, negative_prompt=negative, extra=extra)
    out = rollout(sdxl_backbone, QUERIES, SEEDS, settings)
    expected = stock_images(sdxl_backbone.pipe, QUERIES, SEEDS, num_inference_steps=5, guidance_scale=guidance,
                            negative_prompt=None if negative is None else [negative] * 2, **extra)
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_no_refinement_equals_stock_pipeline(turbo_backbone, steps):
    settings = SamplerSettings(num_inference_steps=steps, guidance_scale=0.0)
    out = rollout(turbo_backbone, QUERIES, SEEDS, settings)
    expected = stock_images(turbo_backbone.pipe, QUERIES, SEEDS, num_inference_steps=steps, guidance_scale=0.0)
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=0)


def test_turbo_refines_at_every_step_and_is_batch_invariant(turbo_backbone):
    """4-step turbo with N_R = 3 (the maximum): ancestral noise comes from per-row generators."""
    settings = SamplerSettings(num_inference_steps=4, guidance_scale=0.0, preview_size=32)
    queries, seeds = ["a cat", "a dog", "a tree"], [0, 1, 2]
    schedules = [RefinementSchedule.uniform(3), RefinementSchedule.random(2, seed=5), RefinementSchedule.none()]

    def refine(observations):
        return [f"{o.query}, step {o.step}" for o in observations]

    batch = rollout(turbo_backbone, queries, seeds, settings, schedules, refine=refine)
    assert batch.trajectories[0].decision_steps == [1, 2, 3]
    assert batch.trajectories[0].step_prompt_index == [0, 1, 2, 3]
    for i in range(3):
        single = rollout(turbo_backbone, queries[i:i + 1], seeds[i:i + 1], settings, schedules[i], refine=refine)
        torch.testing.assert_close(batch.images[i:i + 1], single.images, atol=1e-5, rtol=0)
        assert single.trajectories[0].prompts == batch.trajectories[i].prompts
    with pytest.raises(ValueError, match="4 refinements needs at least 5 sampling steps"):
        rollout(turbo_backbone, queries[:1], seeds[:1], settings, RefinementSchedule.uniform(4), refine=refine)


def test_sdxl_switch_changes_only_later_steps_and_previews_are_x0(sdxl_backbone, record_steps, monkeypatch):
    settings = SamplerSettings(num_inference_steps=5, guidance_scale=5.0, preview_size=None)
    base = record_steps(sdxl_backbone)
    rollout(sdxl_backbone, QUERIES, SEEDS, settings)
    base.close()

    scheduler_cls = type(sdxl_backbone.pipe.scheduler)
    pred_original, original_step = [], scheduler_cls.step

    def spy(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        pred_original.append(out.pred_original_sample.clone())
        return out

    monkeypatch.setattr(scheduler_cls, "step", spy)
    rec = record_steps(sdxl_backbone)
    seen = []
    rollout(sdxl_backbone, QUERIES, SEEDS, settings, RefinementSchedule.explicit([3]),
            refine=lambda obs: (seen.extend(obs), ["a green dragon", "a castle"])[1])
    for i in range(3):
        assert torch.equal(base.latents[i], rec.latents[i])
    for i in range(3, 5):
        assert (base.latents[i] - rec.latents[i]).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    assert all(torch.equal(a, b) for a, b in zip(rec.x0, pred_original))
    expected = sdxl_backbone.decode(pred_original[2], preview=True)
    for o in seen:
        got = torch.tensor(list(o.preview.getdata()), dtype=torch.uint8)
        assert torch.equal(got, (expected[o.row].permute(1, 2, 0) * 255).round().to(torch.uint8).reshape(-1, 3))


def test_sdxl_clip_skip_and_token_budget(sdxl_backbone):
    backbone = StableDiffusionXLBackbone.from_pipeline(sdxl_backbone.pipe, clip_skip=1)
    settings = SamplerSettings(num_inference_steps=3, guidance_scale=3.0)
    out = rollout(backbone, QUERIES[:1], SEEDS[:1], settings)
    expected = stock_images(sdxl_backbone.pipe, QUERIES[:1], SEEDS[:1], num_inference_steps=3, guidance_scale=3.0,
                            clip_skip=1)
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=0)
    assert (rollout(sdxl_backbone, QUERIES[:1], SEEDS[:1], settings).images - out.images).abs().max() > 1e-5
    assert sdxl_backbone.text_budget == 75
    for text in ("abc de", "a photo of a cat, 4k"):  # content tokens = tokenizer ids minus BOS/EOS
        assert sdxl_backbone.count_tokens(text) == len(sdxl_backbone.pipe.tokenizer(text).input_ids) - 2


@pytest.mark.parametrize("scheduler_name", ["EDMDPMSolverMultistepScheduler", "EDMEulerScheduler"])
def test_edm_schedulers_equal_stock_and_refine(sdxl_backbone, scheduler_name):
    """Playground v2.5's EDM schedulers (no alphas_cumprod): plain sampling equals the stock pipeline; refinements
    see the EDM x0 and the noise level sigma / sqrt(1 + sigma^2)."""
    import diffusers

    pipe = sdxl_backbone.pipe
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler_name)(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
                                                         prediction_type="epsilon")
    settings = SamplerSettings(num_inference_steps=4, guidance_scale=3.0, preview_size=None)
    try:
        plain = rollout(sdxl_backbone, QUERIES, SEEDS, settings)
        expected = stock_images(pipe, QUERIES, SEEDS, num_inference_steps=4, guidance_scale=3.0)
        torch.testing.assert_close(plain.images, expected, atol=1e-5, rtol=0)
        seen = []
        refined = rollout(sdxl_backbone, QUERIES, SEEDS, settings, RefinementSchedule.explicit([2]),
                          refine=lambda obs: (seen.extend(obs), [o.prompt for o in obs])[1])
        torch.testing.assert_close(refined.images, plain.images, atol=1e-6, rtol=0)
        sigma = float(pipe.scheduler.sigmas[2])
        assert seen[0].noise_level == pytest.approx(sigma / (1 + sigma**2) ** 0.5) and seen[0].preview is not None
    finally:
        pipe.scheduler = original
