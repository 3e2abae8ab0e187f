"""SD3Backbone against the stock StableDiffusion3Pipeline, on tiny pipelines saved and reloaded offline."""
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from promptloop.backbones.flux import FluxBackbone
from promptloop.backbones.rollout import rollout
from promptloop.backbones.schedule import RefinementSchedule
from promptloop.backbones.sd3 import SD3Backbone
from promptloop.backbones.types import SamplerSettings
from promptloop.testing.tiny_flow import (
    make_tiny_flux_pipeline,
    make_tiny_preview_decoder,
    make_tiny_sd3_pipeline,
    run_steps,
)

MSL = 32  # a short T5 budget keeps the tiny models fast
STEPS = 4
PROMPTS = ["a red cat", "a blue dog on a hill"]
SEEDS = [3, 11]
VARIANTS = {"sd3": {}, "sd3.5": {"variant": "sd3.5"}, "no_t5": {"with_t5": False}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    for name, kwargs in VARIANTS.items():
        make_tiny_sd3_pipeline(seed=0, **kwargs).save_pretrained(root / name)
    return {name: str(root / name) for name in VARIANTS}


@pytest.fixture(scope="module")
def backbones(folders):
    # a folder saved without T5 records text_encoder_3 / tokenizer_3 as null: it loads with nothing to pass
    return {name: SD3Backbone.from_pretrained(path, max_sequence_length=MSL) for name, path in folders.items()}


def _settings(**kwargs):
    return SamplerSettings(num_inference_steps=STEPS, height=kwargs.pop("height", 64), width=kwargs.pop("width", 64),
                           **kwargs)


def _stock(backbone, prompts, seeds, settings):
    return backbone.pipe(
        prompts, num_inference_steps=settings.num_inference_steps, height=settings.height, width=settings.width,
        guidance_scale=settings.guidance_scale, negative_prompt=settings.negative_prompt, max_sequence_length=MSL,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="pt",
    ).images


def test_reloaded_pipeline_is_the_saved_one(folders, backbones):
    backbone = backbones["sd3"]
    assert isinstance(backbone.pipe, StableDiffusion3Pipeline)
    settings = _settings(guidance_scale=5.0)
    built = SD3Backbone.from_pipeline(make_tiny_sd3_pipeline(seed=0), max_sequence_length=MSL)
    other_seed = SD3Backbone.from_pipeline(make_tiny_sd3_pipeline(seed=1), max_sequence_length=MSL)
    reloaded = _stock(backbone, PROMPTS[:1], SEEDS[:1], settings)
    torch.testing.assert_close(reloaded, _stock(built, PROMPTS[:1], SEEDS[:1], settings), rtol=0, atol=1e-5)
    assert not torch.allclose(reloaded, _stock(other_seed, PROMPTS[:1], SEEDS[:1], settings), atol=1e-3)


@pytest.mark.parametrize(
    "name, guidance_scale, negative_prompt, height, width",
    [
        ("sd3", 5.0, "blurry", 64, 64),
        ("sd3", 5.0, ["blurry", "dark"], 64, 64),  # one negative prompt per prompt
        ("sd3", 1.0, None, 64, 128),
        ("sd3.5", 4.0, None, 64, 64),
        ("no_t5", 5.0, "blurry", 64, 64),
    ],
)
def test_step_loop_reproduces_stock_pipeline(backbones, name, guidance_scale, negative_prompt, height, width):
    backbone = backbones[name]
    settings = _settings(guidance_scale=guidance_scale, negative_prompt=negative_prompt, height=height, width=width)
    trace = run_steps(backbone, PROMPTS, SEEDS, settings)
    expected = _stock(backbone, PROMPTS, SEEDS, settings)
    assert trace.images.shape == (2, 3, height, width)
    torch.testing.assert_close(trace.images, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(trace.images[0], trace.images[1], atol=1e-3)
    state = backbone.prepare(settings, [torch.Generator().manual_seed(0)] * 2)
    torch.testing.assert_close(state.scheduler.sigmas, backbone.pipe.scheduler.sigmas, rtol=0, atol=0)


def test_guidance_and_negative_prompt_change_the_result(backbones):
    backbone = backbones["sd3"]
    base = run_steps(backbone, PROMPTS[:1], SEEDS[:1], _settings(guidance_scale=5.0)).images
    stronger = run_steps(backbone, PROMPTS[:1], SEEDS[:1], _settings(guidance_scale=9.0)).images
    negative = run_steps(backbone, PROMPTS[:1], SEEDS[:1], _settings(guidance_scale=5.0, negative_prompt="x")).images
    assert not torch.allclose(base, stronger, atol=1e-4)
    assert not torch.allclose(base, negative, atol=1e-4)


def test_prompt_switch_changes_only_later_steps(backbones):
    backbone, k = backbones["sd3"], 2
    settings = _settings(guidance_scale=5.0)
    plain = run_steps(backbone, PROMPTS, SEEDS, settings)
    switched = run_steps(backbone, PROMPTS, SEEDS, settings, switches={k: ["an oil painting of a boat"] * 2})
    for i in range(k + 1):  # x_t before steps 0..k only depends on steps before k
        assert torch.equal(plain.latents[i], switched.latents[i])
    for i in range(k):
        assert torch.equal(plain.x0[i], switched.x0[i])
    for i in range(k, STEPS):
        assert not torch.allclose(plain.x0[i], switched.x0[i], atol=1e-4)
        assert not torch.allclose(plain.latents[i + 1], switched.latents[i + 1], atol=1e-4)
    assert not torch.allclose(plain.images, switched.images, atol=1e-4)


def test_x0_is_flow_matching_estimate_and_last_x0_is_final_latent(backbones):
    backbone = backbones["sd3.5"]
    trace = run_steps(backbone, PROMPTS, SEEDS, _settings(guidance_scale=4.0))
    assert trace.sigmas[0] > 0.9 and trace.sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(trace.sigmas, trace.sigmas[1:]))
    for i, x0 in enumerate(trace.x0):
        # Euler: x_next = x_t + (sigma_next - sigma) * v, so v and x0 = x_t - sigma * v follow from two states
        x_t, x_next = trace.latents[i], trace.latents[i + 1]
        velocity = (x_next - x_t) / (trace.sigmas[i + 1] - trace.sigmas[i])
        torch.testing.assert_close(x0, x_t - trace.sigmas[i] * velocity, rtol=1e-4, atol=1e-4)
    assert torch.equal(trace.x0[-1], trace.latents[-1])
    torch.testing.assert_close(backbone.decode(trace.x0[-1]), trace.images, rtol=0, atol=0)


def test_batch_rows_equal_single_rows(backbones):
    backbone = backbones["sd3"]
    prompts, seeds = PROMPTS + ["a green frog"], SEEDS + [5]
    settings = _settings(guidance_scale=5.0, negative_prompt="blurry")
    batch = run_steps(backbone, prompts, seeds, settings).images
    for i in range(3):
        single = run_steps(backbone, [prompts[i]], [seeds[i]], settings).images
        torch.testing.assert_close(batch[i : i + 1], single, rtol=0, atol=1e-5)


def test_text_budget_is_t5_content_tokens(backbones):
    backbone = backbones["sd3"]
    tokenizer = backbone.pipe.tokenizer_3
    assert backbone.text_budget == MSL - 1  # </s> takes the last position
    words = [f"w{i}" for i in range(MSL)]
    prompt = " ".join(words)
    assert backbone.count_tokens(prompt) == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    fits = " ".join(w for w in words if backbone.count_tokens(" ".join(words[: words.index(w) + 1])) <= MSL - 1)
    assert backbone.count_tokens(fits) <= backbone.text_budget < backbone.count_tokens(prompt)
    kept = tokenizer(fits, max_length=MSL, truncation=True).input_ids
    assert kept == tokenizer(fits).input_ids  # nothing of a prompt within the budget is cut
    assert SD3Backbone.from_pipeline(backbone.pipe).text_budget == 256 - 1  # the pipeline's default length


def test_without_t5_budget_is_clip_and_t5_embeds_are_zero(backbones):
    backbone = backbones["no_t5"]
    assert backbone.pipe.text_encoder_3 is None
    assert backbone.text_budget == 77 - 2
    assert backbone.count_tokens("a red cat") == len(backbone.pipe.tokenizer("a red cat").input_ids) - 2
    embeds = backbone.encode_prompts(PROMPTS).tensors["prompt_embeds"]
    assert embeds.shape[1] == 77 + MSL
    assert torch.count_nonzero(embeds[:, 77:]) == 0 and torch.count_nonzero(embeds[:, :77]) > 0


def test_preview_decode(backbones, folders):
    backbone = backbones["sd3"]
    trace = run_steps(backbone, PROMPTS, SEEDS, _settings(guidance_scale=5.0, width=128))
    full = backbone.decode(trace.latents[-1])
    assert full.shape == (2, 3, 64, 128)
    preview = backbone.decode(trace.latents[-1], size=32, preview=True)
    assert preview.shape == (2, 3, 16, 32)
    torch.testing.assert_close(backbone.decode(trace.latents[-1], preview=True), full, rtol=0, atol=0)
    with_tiny = SD3Backbone.from_pipeline(backbone.pipe, preview_decoder=make_tiny_preview_decoder())
    tiny = with_tiny.decode(trace.latents[-1], size=32, preview=True)
    assert tiny.shape == (2, 3, 16, 32) and tiny.min() >= 0 and tiny.max() <= 1
    assert not torch.allclose(tiny, preview, atol=1e-3)
    torch.testing.assert_close(with_tiny.decode(trace.latents[-1]), full, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tiny_preview_decoder_unscales_the_latents_once(backbones, family):
    """A preview through AutoencoderTiny (taesd3 / taef1 factors) is what the pipeline gives with ``vae`` set to
    that decoder: latents / scaling_factor + shift_factor, decoded once."""
    factors = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}[family]
    tiny = make_tiny_preview_decoder(scaling_factor=factors[0], shift_factor=factors[1])
    pipe = backbones["sd3"].pipe if family == "sd3" else make_tiny_flux_pipeline(seed=0)
    backbone = (SD3Backbone if family == "sd3" else FluxBackbone).from_pipeline(pipe, preview_decoder=tiny)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoded = tiny.decode(latents / factors[0] + factors[1], return_dict=False)[0]
    expected = pipe.image_processor.postprocess(decoded, output_type="pt")
    torch.testing.assert_close(backbone.decode(latents, size=None, preview=True), expected, rtol=0, atol=1e-6)


def test_rollout_reproduces_stock_pipeline_and_switches_prompts(backbones):
    backbone = backbones["sd3"]
    settings = _settings(guidance_scale=5.0, negative_prompt="blurry", preview_size=32)
    plain = rollout(backbone, PROMPTS, SEEDS, settings)
    torch.testing.assert_close(plain.images, _stock(backbone, PROMPTS, SEEDS, settings), rtol=0, atol=1e-5)

    seen = []

    def refine(observations):
        seen.extend(observations)
        return [o.query + ", oil painting" for o in observations]

    refined = rollout(backbone, PROMPTS, SEEDS, settings, schedule=RefinementSchedule.explicit([2]), refine=refine)
    new_prompts = [t.prompts[1] for t in refined.trajectories]
    assert new_prompts == [p + ", oil painting" for p in PROMPTS]  # within the budget: not truncated
    manual = run_steps(backbone, PROMPTS, SEEDS, settings, switches={2: new_prompts})
    torch.testing.assert_close(refined.images, manual.images, rtol=0, atol=1e-5)
    assert [o.step for o in seen] == [2, 2] and seen[0].preview.size == (32, 32)
    assert seen[0].noise_level == pytest.approx(manual.sigmas[2])
    assert refined.trajectories[0].prompts == [PROMPTS[0], PROMPTS[0] + ", oil painting"]


def test_a_second_order_flow_scheduler_refines_at_solver_steps(backbones):
    """FlowMatchHeun (predictor and corrector, two evaluations a step): plain sampling equals the stock pipeline,
    prompts switch at solver steps only, the policy is told solver steps and each evaluation's x0 is
    x_t - sigma * v at that evaluation's sigma."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    backbone = backbones["sd3"]
    original = backbone.pipe.scheduler
    backbone.pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(original.config)
    settings = _settings(guidance_scale=5.0, preview_size=32)
    try:
        plain = rollout(backbone, PROMPTS, SEEDS, settings)
        torch.testing.assert_close(plain.images, _stock(backbone, PROMPTS, SEEDS, settings), rtol=0, atol=1e-5)
        trace = run_steps(backbone, PROMPTS, SEEDS, settings)
        state = backbone.prepare(settings, [torch.Generator("cpu").manual_seed(s) for s in SEEDS])
        assert state.step_starts == [0, 2, 4, 6] and state.num_steps == 7
        sigmas = state.scheduler.sigmas
        assert trace.sigmas[:-1] == pytest.approx(sigmas[:7].tolist())
        for i in state.step_starts[:3]:  # predictors (Euler): x_next = x_t + (sigma_next - sigma) * v
            x_t, x_next = trace.latents[i], trace.latents[i + 1]
            velocity = (x_next - x_t) / (sigmas[i + 1] - sigmas[i])
            torch.testing.assert_close(trace.x0[i], x_t - sigmas[i] * velocity, rtol=1e-4, atol=1e-4)
        seen = []

        def refine(observations):
            seen.extend(observations)
            return [o.query + ", oil painting" for o in observations]

        refined = rollout(backbone, PROMPTS, SEEDS, settings, schedule=RefinementSchedule.explicit([2]), refine=refine)
        assert [o.step for o in seen] == [2, 2] and seen[0].num_steps == 4
        assert seen[0].noise_level == pytest.approx(float(sigmas[state.step_starts[2]]))
        assert refined.trajectories[0].step_prompt_index == [0, 0, 1, 1]
        manual = run_steps(backbone, PROMPTS, SEEDS, settings, switches={4: [p + ", oil painting" for p in PROMPTS]})
        torch.testing.assert_close(refined.images, manual.images, rtol=0, atol=1e-5)
        assert not torch.allclose(refined.images, plain.images, atol=1e-4)
    finally:
        backbone.pipe.scheduler = original


def test_rollout_truncates_long_prompt_to_t5_budget(backbones):
    backbone = backbones["sd3"]
    long_query = " ".join(["a red cat sitting on a very long wooden fence"] * 3)
    out = rollout(backbone, [long_query], [0], _settings(guidance_scale=1.0))
    trajectory = out.trajectories[0]
    assert trajectory.truncated == [True]
    assert long_query.startswith(trajectory.prompts[0]) and long_query[len(trajectory.prompts[0])] == " "
    assert backbone.count_tokens(trajectory.prompts[0]) <= backbone.text_budget


def test_lora_on_the_transformer_stays_in_effect_with_its_scale():
    from peft import LoraConfig

    pipe = make_tiny_sd3_pipeline(seed=2, with_t5=False)
    settings = _settings(guidance_scale=5.0)

    def images(scale):
        backbone = SD3Backbone.from_pipeline(pipe, max_sequence_length=MSL, lora_scale=scale)
        return run_steps(backbone, PROMPTS[:1], SEEDS[:1], settings).images

    without_lora = images(None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"],
                                                init_lora_weights=False))
    by_scale = {}
    for scale in (None, 0.5):
        by_scale[scale] = images(scale)
        expected = pipe(
            PROMPTS[:1], num_inference_steps=STEPS, height=64, width=64, guidance_scale=5.0, max_sequence_length=MSL,
            generator=[torch.Generator("cpu").manual_seed(SEEDS[0])], output_type="pt",
            joint_attention_kwargs=None if scale is None else {"scale": scale},
        ).images
        torch.testing.assert_close(by_scale[scale], expected, rtol=0, atol=1e-5)
        assert not torch.allclose(by_scale[scale], without_lora, atol=1e-4)
    assert not torch.allclose(by_scale[None], by_scale[0.5], atol=1e-4)


def test_errors(backbones, folders, tmp_path):
    backbone = backbones["sd3"]
    flux = make_tiny_flux_pipeline(seed=0)
    with pytest.raises(TypeError, match="FluxPipeline"):
        SD3Backbone.from_pipeline(flux)
    flux.save_pretrained(tmp_path / "flux")
    with pytest.raises(ValueError, match="FluxPipeline"):
        SD3Backbone.from_pretrained(str(tmp_path / "flux"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        SD3Backbone.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="max_sequence_length"):
        SD3Backbone.from_pipeline(backbone.pipe, max_sequence_length=1000)
    generators = [torch.Generator().manual_seed(0)]
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        backbone.prepare(_settings(extra={"skip_guidance_layers": [7]}), generators)
    with pytest.raises(ValueError, match="multiples of 16"):
        backbone.prepare(_settings(height=72), generators)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("placement", ["bf16", "cpu_offload"])
def test_step_loop_reproduces_stock_pipeline_on_cuda(placement):
    pipe = make_tiny_sd3_pipeline(seed=0)
    if placement == "bf16":
        pipe.to("cuda", torch.bfloat16)
    else:
        pipe.enable_model_cpu_offload()
    backbone = SD3Backbone.from_pipeline(pipe, max_sequence_length=MSL)
    assert backbone.device.type == "cuda"
    settings = _settings(guidance_scale=5.0, negative_prompt="blurry")
    trace = run_steps(backbone, PROMPTS, SEEDS, settings)
    torch.testing.assert_close(trace.images, _stock(backbone, PROMPTS, SEEDS, settings), rtol=0, atol=1e-5)
    assert torch.equal(trace.x0[-1], trace.latents[-1])
