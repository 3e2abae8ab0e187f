"""FluxBackbone against the stock FluxPipeline (dev and schnell), on tiny pipelines saved and reloaded offline."""
import pytest
import torch
from diffusers import FluxPipeline

from promptloop.backbones.flux import FluxBackbone
from promptloop.backbones.rollout import rollout
from promptloop.backbones.schedule import RefinementSchedule
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


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    for variant in ("dev", "schnell"):
        make_tiny_flux_pipeline(seed=0, variant=variant).save_pretrained(root / variant)
    return {variant: str(root / variant) for variant in ("dev", "schnell")}


@pytest.fixture(scope="module")
def backbones(folders):
    return {name: FluxBackbone.from_pretrained(path, max_sequence_length=MSL) for name, path in folders.items()}


def _settings(**kwargs):
    return SamplerSettings(num_inference_steps=STEPS, height=kwargs.pop("height", 64), width=kwargs.pop("width", 64),
                           **kwargs)


def _stock(backbone, prompts, seeds, settings):
    return backbone.pipe(
        prompts, num_inference_steps=settings.num_inference_steps, height=settings.height, width=settings.width,
        guidance_scale=3.5 if settings.guidance_scale is None else settings.guidance_scale,
        negative_prompt=settings.negative_prompt, max_sequence_length=MSL, output_type="pt",
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **settings.extra,
    ).images


def test_reloaded_pipeline_is_the_saved_one(backbones):
    backbone = backbones["dev"]
    assert isinstance(backbone.pipe, FluxPipeline) and backbone.has_guidance_embedding
    assert not backbones["schnell"].has_guidance_embedding
    built = FluxBackbone.from_pipeline(make_tiny_flux_pipeline(seed=0), max_sequence_length=MSL)
    settings = _settings()
    torch.testing.assert_close(_stock(backbone, PROMPTS[:1], SEEDS[:1], settings),
                               _stock(built, PROMPTS[:1], SEEDS[:1], settings), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "name, settings_kwargs",
    [
        ("dev", {"guidance_scale": 3.5}),
        ("dev", {"guidance_scale": 5.0, "height": 64, "width": 128}),
        ("schnell", {}),
        ("dev", {"negative_prompt": "ugly", "extra": {"true_cfg_scale": 4.0}}),
        ("dev", {"negative_prompt": ["ugly", "dark"], "extra": {"true_cfg_scale": 4.0}}),  # one per prompt
    ],
)
def test_step_loop_reproduces_stock_pipeline(backbones, name, settings_kwargs):
    backbone = backbones[name]
    settings = _settings(**settings_kwargs)
    trace = run_steps(backbone, PROMPTS, SEEDS, settings)
    assert trace.latents[0].ndim == 3  # packed (B, tokens, 4C)
    expected = _stock(backbone, PROMPTS, SEEDS, settings)
    assert trace.images.shape == (2, 3, settings.height, settings.width)
    torch.testing.assert_close(trace.images, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(trace.images[0], trace.images[1], atol=1e-3)
    state = backbone.prepare(settings, [torch.Generator().manual_seed(0)] * 2)  # mu / sigmas as the pipeline's
    torch.testing.assert_close(state.scheduler.sigmas, backbone.pipe.scheduler.sigmas, rtol=0, atol=0)


def test_guidance_embedding_and_true_cfg_change_the_result(backbones):
    dev, schnell = backbones["dev"], backbones["schnell"]
    one = lambda bb, **kw: run_steps(bb, PROMPTS[:1], SEEDS[:1], _settings(**kw)).images  # noqa: E731
    assert not torch.allclose(one(dev, guidance_scale=1.0), one(dev, guidance_scale=5.0), atol=1e-4)
    torch.testing.assert_close(one(schnell, guidance_scale=1.0), one(schnell, guidance_scale=5.0), rtol=0, atol=0)
    true_cfg = one(dev, negative_prompt="ugly", extra={"true_cfg_scale": 4.0})
    assert not torch.allclose(one(dev), true_cfg, atol=1e-4)
    # as in the pipeline, true CFG needs both a scale > 1 and a negative prompt
    torch.testing.assert_close(one(dev, extra={"true_cfg_scale": 4.0}), one(dev), rtol=0, atol=0)


def test_prompt_switch_changes_only_later_steps(backbones):
    backbone, k = backbones["dev"], 2
    settings = _settings()
    plain = run_steps(backbone, PROMPTS, SEEDS, settings)
    switched = run_steps(backbone, PROMPTS, SEEDS, settings, switches={k: ["an oil painting of a boat"] * 2})
    for i in range(k + 1):
        assert torch.equal(plain.latents[i], switched.latents[i])
    for i in range(k):
        assert torch.equal(plain.x0[i], switched.x0[i])
    for i in range(k, STEPS):
        assert not torch.allclose(plain.x0[i], switched.x0[i], atol=1e-4)
        assert not torch.allclose(plain.latents[i + 1], switched.latents[i + 1], atol=1e-4)


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_x0_is_flow_matching_estimate_and_last_x0_is_final_latent(backbones, name):
    backbone = backbones[name]
    trace = run_steps(backbone, PROMPTS, SEEDS, _settings(height=64, width=128))
    assert trace.sigmas[0] == pytest.approx(1.0) and trace.sigmas[-1] == 0.0
    for i, x0 in enumerate(trace.x0):
        x_t, x_next = trace.latents[i], trace.latents[i + 1]
        velocity = (x_next - x_t) / (trace.sigmas[i + 1] - trace.sigmas[i])
        torch.testing.assert_close(x0, x_t - trace.sigmas[i] * velocity, rtol=1e-4, atol=1e-4)
    assert torch.equal(trace.x0[-1], trace.latents[-1])
    torch.testing.assert_close(backbone.decode(trace.x0[-1]), trace.images, rtol=0, atol=0)


def test_batch_rows_equal_single_rows(backbones):
    backbone = backbones["dev"]
    prompts, seeds = PROMPTS + ["a green frog"], SEEDS + [5]
    settings = _settings(negative_prompt="ugly", extra={"true_cfg_scale": 2.0})
    batch = run_steps(backbone, prompts, seeds, settings).images
    for i in range(3):
        single = run_steps(backbone, [prompts[i]], [seeds[i]], settings).images
        torch.testing.assert_close(batch[i : i + 1], single, rtol=0, atol=1e-5)


def test_decode_unpacks_and_previews(backbones):
    backbone = backbones["dev"]
    trace = run_steps(backbone, PROMPTS, SEEDS, _settings(height=128, width=64))
    packed = trace.latents[-1]
    unpacked = backbone.unpack(packed)
    assert unpacked.shape == (2, 16, 16, 8)
    torch.testing.assert_close(backbone.decode(unpacked), trace.images, rtol=0, atol=0)
    assert backbone.decode(packed, size=32, preview=True).shape == (2, 3, 32, 16)
    tiny = make_tiny_preview_decoder(scaling_factor=0.3611, shift_factor=0.1159)
    with_tiny = FluxBackbone.from_pipeline(backbone.pipe, preview_decoder=tiny)
    with pytest.raises(ValueError, match="before any prepare"):
        with_tiny.decode(packed)
    with_tiny.prepare(_settings(height=128, width=64), [torch.Generator().manual_seed(0)])
    preview = with_tiny.decode(packed, size=32, preview=True)
    assert preview.shape == (2, 3, 32, 16) and 0 <= preview.min() and preview.max() <= 1
    with pytest.raises(ValueError, match="Expected packed latents"):
        backbone.decode(packed[:, :-1])


def test_text_budget_defaults(backbones):
    assert backbones["dev"].text_budget == MSL - 1
    assert FluxBackbone.from_pipeline(backbones["dev"].pipe).text_budget == 512 - 1
    assert FluxBackbone.from_pipeline(backbones["schnell"].pipe).text_budget == 256 - 1
    backbone = backbones["dev"]
    assert backbone.count_tokens("a red cat") == len(backbone.pipe.tokenizer_2("a red cat").input_ids) - 1


def test_rollout_reproduces_stock_pipeline_and_switches_prompts(backbones):
    backbone = backbones["dev"]
    settings = _settings(preview_size=32)
    plain = rollout(backbone, PROMPTS, SEEDS, settings)
    torch.testing.assert_close(plain.images, _stock(backbone, PROMPTS, SEEDS, settings), rtol=0, atol=1e-5)
    refined = rollout(backbone, PROMPTS, SEEDS, settings, schedule=RefinementSchedule.explicit([1, 3]),
                      refine=lambda observations: [f"{o.query}, take {o.step}" for o in observations])
    switches = {k: [t.prompts[j + 1] for t in refined.trajectories] for j, k in enumerate([1, 3])}
    assert switches[1] == [p + ", take 1" for p in PROMPTS]
    manual = run_steps(backbone, PROMPTS, SEEDS, settings, switches=switches)
    torch.testing.assert_close(refined.images, manual.images, rtol=0, atol=1e-5)
    assert [p.size for p in refined.trajectories[1].previews] == [(32, 32), (32, 32)]


def test_errors(backbones, tmp_path):
    backbone = backbones["dev"]
    sd3 = make_tiny_sd3_pipeline(seed=0, with_t5=False)
    with pytest.raises(TypeError, match="StableDiffusion3Pipeline"):
        FluxBackbone.from_pipeline(sd3)
    sd3.save_pretrained(tmp_path / "sd3")
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline"):
        FluxBackbone.from_pretrained(str(tmp_path / "sd3"))
    with pytest.raises(ValueError, match="max_sequence_length"):
        FluxBackbone.from_pipeline(backbone.pipe, max_sequence_length=0)
    with pytest.raises(ValueError, match="mu"):
        backbone.prepare(_settings(extra={"mu": 1.0}), [torch.Generator().manual_seed(0)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("placement", ["bf16", "cpu_offload"])
def test_step_loop_reproduces_stock_pipeline_on_cuda(placement):
    pipe = make_tiny_flux_pipeline(seed=0)
    if placement == "bf16":
        pipe.to("cuda", torch.bfloat16)
    else:
        pipe.enable_model_cpu_offload()
    backbone = FluxBackbone.from_pipeline(pipe, max_sequence_length=MSL)
    assert backbone.device.type == "cuda"
    settings = _settings(negative_prompt="ugly", extra={"true_cfg_scale": 2.0})
    trace = run_steps(backbone, PROMPTS, SEEDS, settings)
    torch.testing.assert_close(trace.images, _stock(backbone, PROMPTS, SEEDS, settings), rtol=0, atol=1e-5)
    assert torch.equal(trace.x0[-1], trace.latents[-1])
