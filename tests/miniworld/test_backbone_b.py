"""Backbone B (SD3 architecture, flow matching): the training command at tiny sizes, its conditioning against the
stock pipeline's, resume, and the shipped folder through the stock loader and the project's adapter."""
import functools
import json

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from safetensors import safe_open
from safetensors.torch import load_file

from promptloop.backbones import auto_backbone, rollout
from promptloop.backbones.sd3 import SD3Backbone
from promptloop.backbones.types import SamplerSettings
from promptloop.miniworld import train_flow_backbone
from promptloop.miniworld.backbone import SHIPPED_BACKBONE_A
from promptloop.miniworld.backbone_b import NO_T5, SHIPPED_BACKBONE_B, T5_SEQUENCE_LENGTH, BackboneBSizes, \
    build_text_encoders, build_transformer, encode_prompt_ids
from promptloop.miniworld.tokenizer import CaptionTokenizer, make_miniworld_tokenizer
from caption_following import caption_following
from promptloop.miniworld.train_backbone import Checkpointer
from promptloop.miniworld.train_flow_backbone import RepeatedTokenJointAttnProcessor, main, parse_args, \
    sample_token_ids


@pytest.fixture(scope="module")
def backbone_a_tiny(tiny_backbone_a_dir):
    """A tiny backbone A folder: B takes its VAE (frozen) and its tokenizer."""
    return tiny_backbone_a_dir


@pytest.fixture(scope="module")
def runs(backbone_a_tiny, tmp_path_factory):
    """Two tiny runs of 4 steps: one interrupted after 2 and resumed, one uninterrupted."""
    root = tmp_path_factory.mktemp("backbone_b")
    render = functools.lru_cache(maxsize=None)(train_flow_backbone.render_dataset)  # render once for all runs
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_flow_backbone, "render_dataset", render)
        common = ["--preset", "tiny", "--vae-from", str(backbone_a_tiny)]
        main(["--out", str(root / "resumed"), "--steps", "2"] + common)
        first = Checkpointer(root / "resumed" / "checkpoint").load_progress()
        main(["--out", str(root / "resumed"), "--steps", "4", "--resume"] + common)
        main(["--out", str(root / "straight"), "--steps", "4"] + common)
    return root, first


def test_first_run_stops_at_its_step_cap(runs):
    _, first = runs
    assert first.phase == "flow" and first.step == 2


def test_resume_equals_an_uninterrupted_run(runs):
    root, _ = runs
    assert Checkpointer(root / "resumed" / "checkpoint").load_progress().step == 4
    assert "resumed flow phase at step 2" in (root / "resumed" / "train_log.txt").read_text()
    for name in ("transformer", "text_encoder", "text_encoder_2", "ema"):
        resumed = load_file(root / "resumed" / "checkpoint" / f"{name}.safetensors")
        straight = load_file(root / "straight" / "checkpoint" / f"{name}.safetensors")
        assert resumed.keys() == straight.keys()
        for key in resumed:
            torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=f"{name}.{key}")


def test_saved_folder_loads_with_the_stock_loader_and_samples(runs, backbone_a_tiny):
    root, _ = runs
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "straight" / "pipeline", **NO_T5)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert all(f.suffix != ".bin" for f in (root / "straight" / "pipeline").rglob("*"))
    a_vae = AutoencoderKL.from_pretrained(backbone_a_tiny / "vae")
    assert pipe.vae.config.shift_factor == 0.0
    assert pipe.vae.config.scaling_factor == a_vae.config.scaling_factor
    for name, p in a_vae.named_parameters():  # A's VAE, frozen
        torch.testing.assert_close(dict(pipe.vae.named_parameters())[name], p, rtol=0, atol=0)
    images = pipe(["red circle top", ""], num_inference_steps=2, guidance_scale=3.0,
                  generator=[torch.Generator().manual_seed(s) for s in range(2)]).images
    assert [im.size for im in images] == [(32, 32), (32, 32)]


def test_saved_folder_loads_and_samples_through_the_adapter(runs):
    root, _ = runs
    backbone = auto_backbone(str(root / "straight" / "pipeline"))  # T5 saved as absent loads as None
    assert isinstance(backbone, SD3Backbone) and not backbone.has_t5
    out = rollout(backbone, ["blue square", "big"], seeds=[0, 1],
                  settings=SamplerSettings(num_inference_steps=3, guidance_scale=2.0))
    assert [im.size for im in out.pil()] == [(32, 32), (32, 32)]


def test_evaluation_files_are_written(runs):
    root, _ = runs
    result = json.loads((root / "straight" / "eval.json").read_text())
    assert set(result["by_guidance"]) == {"4.0", "2.0"}
    assert result["by_guidance"]["4.0"]["all_named"]["count"] == 2 * 2
    assert result["training"]["steps"] == 4
    assert (root / "straight" / "samples.png").is_file()


def test_training_conditioning_equals_the_pipelines(runs):
    """Captions drawn as training draws them, encoded as training encodes them, equal ``encode_prompt``'s output
    for the decoded text, and the training forward (one zero token standing for 256) equals the stock forward."""
    root, _ = runs
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "straight" / "pipeline", **NO_T5)
    config = parse_args(["--out", str(root / "unused"), "--preset", "tiny", "--vae-from", str(SHIPPED_BACKBONE_A)])
    torch.manual_seed(0)
    values = torch.stack([torch.randint(n, (16,)) for n in (6, 3, 2, 3, 3, 4)], dim=1)
    ids = sample_token_ids(config, CaptionTokenizer(pipe.tokenizer), values, step=0)
    texts = pipe.tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert len(set(texts)) > 8
    expected, _, expected_pooled, _ = pipe.encode_prompt(texts, None, None, do_classifier_free_guidance=False,
                                                         max_sequence_length=T5_SEQUENCE_LENGTH)
    text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
    with torch.no_grad():
        embeds, pooled = encode_prompt_ids(text_encoders, ids)
        short_embeds, _ = encode_prompt_ids(text_encoders, ids, t5_tokens=1)
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, expected_pooled)
    assert embeds.shape[1] == pipe.tokenizer.model_max_length + T5_SEQUENCE_LENGTH

    transformer = build_transformer(BackboneBSizes(num_layers=3, num_heads=2, head_dim=8, patch_size=2,
                                                   text_hidden=(8, 12)))
    for p in transformer.parameters():  # large random weights, so that every path changes the output
        p.data.normal_(0.0, 0.2)
    embeds = torch.randn(16, 7, 20)
    full = torch.cat([embeds, torch.zeros(16, T5_SEQUENCE_LENGTH, 20)], dim=1)
    short = torch.cat([embeds, torch.zeros(16, 1, 20)], dim=1)
    x, t, pooled = torch.randn(16, 4, 8, 8), torch.rand(16) * 1000, torch.randn(16, 20)
    with torch.no_grad():
        stock = transformer(hidden_states=x, timestep=t, encoder_hidden_states=full, pooled_projections=pooled).sample
        transformer.set_attn_processor(RepeatedTokenJointAttnProcessor())
        fast = transformer(hidden_states=x, timestep=t, encoder_hidden_states=short, pooled_projections=pooled,
                           joint_attention_kwargs={"last_context_repeats": T5_SEQUENCE_LENGTH}).sample
        once = transformer(hidden_states=x, timestep=t, encoder_hidden_states=short, pooled_projections=pooled).sample
    torch.testing.assert_close(fast, stock, rtol=1e-4, atol=1e-5)
    assert (once - stock).abs().max() > 1e-3  # the repeat count matters: the check above can fail


def test_text_encoders_are_clip_with_projection_and_penultimate_states_are_used():
    tokenizer = make_miniworld_tokenizer()
    encoders = build_text_encoders(BackboneBSizes(text_hidden=(8, 12), text_layers=2), tokenizer)
    ids = tokenizer(["red circle"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        embeds, pooled = encode_prompt_ids(encoders, ids, t5_tokens=0)
        last = torch.cat([e(ids).last_hidden_state for e in encoders], dim=-1)
    assert embeds.shape == (1, 7, 20) and pooled.shape == (1, 20)
    assert not torch.allclose(embeds, last)


def test_bad_flags_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="timestep_sampling"):
        parse_args(["--out", str(tmp_path), "--timestep-sampling", "cosine"])
    with pytest.raises(ValueError, match="vae/"):
        parse_args(["--out", str(tmp_path), "--vae-from", str(tmp_path)])
    with pytest.raises(ValueError, match="patch_size"):
        parse_args(["--out", str(tmp_path), "--patch-size", "3"])


def _stored_dtypes(path) -> set:
    with safe_open(path, "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_shipped_backbone_b_is_a_few_megabytes_half_precision_sd3_folder():
    files = [p for p in SHIPPED_BACKBONE_B.rglob("*") if p.is_file()]
    assert all(p.suffix != ".bin" for p in files)
    assert sum(p.stat().st_size for p in files) < 8_000_000
    index = json.loads((SHIPPED_BACKBONE_B / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    assert _stored_dtypes(SHIPPED_BACKBONE_B / "transformer" / "diffusion_pytorch_model.safetensors") == {"F16"}
    assert _stored_dtypes(SHIPPED_BACKBONE_B / "text_encoder_2" / "model.safetensors") == {"F32"}
    pipe = StableDiffusion3Pipeline.from_pretrained(SHIPPED_BACKBONE_B, **NO_T5)
    assert {pipe.transformer.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    a_vae = AutoencoderKL.from_pretrained(SHIPPED_BACKBONE_A / "vae")
    assert pipe.vae.config.scaling_factor == a_vae.config.scaling_factor and pipe.vae.config.shift_factor == 0.0


def test_shipped_backbone_b_follows_captions_through_the_adapter():
    backbone = auto_backbone(str(SHIPPED_BACKBONE_B))
    assert isinstance(backbone, SD3Backbone)
    accuracy = caption_following(backbone, ("colour", "row", "column", "background"))
    # Chance is 0.17 (colour), 0.25 (background) and 0.33 (row, column); the shipped model's table
    # (backbone_b.eval.md) has colour 0.79 and 1.00 on the others at guidance 4.
    assert accuracy["colour"] >= 0.4, accuracy
    assert min(accuracy["background"], accuracy["row"], accuracy["column"]) >= 0.6, accuracy


def test_sizes_follow_the_vae_latents_with_16_image_tokens_by_default(tmp_path, tiny_backbone_a_dir):
    shipped = parse_args(["--out", str(tmp_path)]).sizes()
    assert (shipped.latent_size, shipped.patch_size) == (16, 4)  # the shipped A's 16 x 16 latents
    assert build_transformer(shipped).pos_embed.height == 4
    vae_dir = tmp_path / "a8" / "vae"
    vae_dir.mkdir(parents=True)
    config = json.loads((SHIPPED_BACKBONE_A / "vae" / "config.json").read_text())
    config["block_out_channels"] = config["block_out_channels"] + config["block_out_channels"][-1:]  # 8 x 8 latents
    (vae_dir / "config.json").write_text(json.dumps(config))
    sizes = parse_args(["--out", str(tmp_path), "--vae-from", str(tmp_path / "a8")]).sizes()
    assert (sizes.latent_size, sizes.patch_size) == (8, 2)
    explicit = parse_args(["--out", str(tmp_path), "--vae-from", str(tmp_path / "a8"), "--patch-size", "1"]).sizes()
    assert explicit.patch_size == 1
    tiny = parse_args(["--out", str(tmp_path), "--preset", "tiny", "--vae-from", str(tiny_backbone_a_dir)]).sizes()
    assert tiny.latent_size == 16 and tiny.patch_size == 2
