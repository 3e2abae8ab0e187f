"""The training command end to end at tiny sizes: phases, checkpoint, resume, save, load, sample, evaluate."""
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load as load_file_bytes
from safetensors.torch import load_file

from transformers import CLIPTokenizer

from promptloop.miniworld import train_backbone
from promptloop.miniworld.backbone import BackboneSizes, build_unet
from promptloop.miniworld.evaluate_backbone import EvalSettings
from promptloop.miniworld.export_backbone import export_run
from promptloop.miniworld.train_backbone import Checkpointer, main, parse_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("backbone")
    common = ["--out", str(out), "--preset", "tiny"]
    main(common + ["--unet-steps", "2"])
    first = Checkpointer(out / "checkpoint").load_progress()
    first_unet = (out / "checkpoint" / "unet.safetensors").read_bytes()
    main(common + ["--unet-steps", "4", "--resume"])
    return out, first, first_unet


def test_first_run_stops_at_its_step_cap(trained):
    _, first, _ = trained
    assert first.phase == "unet" and first.step == 2 and first.scaling_factor > 0


def test_resume_continues_from_the_saved_step(trained):
    out, _, first_unet = trained
    progress = Checkpointer(out / "checkpoint").load_progress()
    assert progress.step == 4
    assert (out / "checkpoint" / "unet.safetensors").read_bytes() != first_unet
    log = (out / "train_log.txt").read_text()
    assert "resumed UNet phase at step 2" in log
    assert "unet step 3 " in log and "unet step 1 " in log
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.old").exists()


def test_saved_pipeline_loads_with_the_stock_loader_and_samples(trained):
    out, _, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.unet.config.addition_embed_type == "text"
    assert all(f.suffix != ".bin" for f in (out / "pipeline").rglob("*"))
    image = pipe("red circle top", num_inference_steps=2, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_evaluation_files_are_written(trained):
    out, _, _ = trained
    result = json.loads((out / "eval.json").read_text())
    accuracy = result["by_guidance"]["4.0"]
    assert accuracy["all_named"]["count"] == 2 * 2
    assert all(0.0 <= v["accuracy"] <= 1.0 for v in accuracy.values())
    assert result["training"]["unet_steps"] == 4
    assert (out / "samples.png").is_file() and "| guidance |" in (out / "eval.md").read_text()


def test_bad_flags_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        parse_args(["--out", str(tmp_path), "--batch-size", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--preset", "huge"])


@pytest.fixture(scope="module")
def decoder_tuned(trained, tmp_path_factory):
    """The trained folder, copied, then resumed with decoder fine-tuning only (UNet step cap already reached)."""
    source, _, _ = trained
    out = tmp_path_factory.mktemp("decoder") / "run"
    shutil.copytree(source, out)
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir() if p.is_file()}
    with pytest.MonkeyPatch.context() as patch:  # a resumed run must take the checkpoint's tokenizer
        patch.setattr(train_backbone, "make_miniworld_tokenizer", _no_new_tokenizer)
        main(["--out", str(out), "--preset", "tiny", "--resume", "--unet-steps", "4", "--decoder-steps", "3"])
    return out, before


def _no_new_tokenizer(*_, **__):
    raise AssertionError("a resumed run built a new tokenizer instead of loading the checkpoint's")


def test_decoder_finetuning_trains_the_decoder_only(decoder_tuned):
    out, before = decoder_tuned
    old = load_file_bytes(before["vae.safetensors"])
    new = load_file(out / "checkpoint" / "vae.safetensors")
    encoder_keys = [k for k in new if k.startswith(("encoder.", "quant_conv."))]
    decoder_keys = [k for k in new if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder_keys and decoder_keys
    assert all(torch.equal(old[k], new[k]) for k in encoder_keys)
    assert any(not torch.equal(old[k], new[k]) for k in decoder_keys)


def test_decoder_finetuning_keeps_the_unet_state_and_records_its_progress(decoder_tuned):
    out, before = decoder_tuned
    progress = Checkpointer(out / "checkpoint").load_progress()
    assert progress.phase == "unet" and progress.step == 4 and progress.decoder_step == 3
    for name in ("unet.safetensors", "text_encoder.safetensors", "ema.safetensors", "optimizer.pt"):
        assert (out / "checkpoint" / name).read_bytes() == before[name], name
    assert (out / "checkpoint" / "decoder_optimizer.pt").is_file()
    log = (out / "train_log.txt").read_text()
    assert "decoder step 3 reconstruction accuracy" in log
    assert "resumed UNet phase at step 4" in log


def test_decoder_finetuning_resumes_from_its_step(decoder_tuned, tmp_path):
    out, _ = decoder_tuned
    again = tmp_path / "again"
    shutil.copytree(out, again)
    main(["--out", str(again), "--preset", "tiny", "--resume", "--unet-steps", "4", "--decoder-steps", "4"])
    assert Checkpointer(again / "checkpoint").load_progress().decoder_step == 4
    assert "resumed decoder fine-tuning at step 3" in (again / "train_log.txt").read_text()
    assert "decoder step 1 " not in (again / "train_log.txt").read_text().split("resumed decoder")[-1]


def test_curve_points_are_recorded(tmp_path):
    out = tmp_path / "curve"
    main(["--out", str(out), "--preset", "tiny", "--unet-steps", "2", "--curve-every", "1", "--curve-captions", "2",
          "--curve-seeds", "1"])
    points = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [p["unet_step"] for p in points] == [1, 2]
    assert all(p["settings"]["captions"] == 2 and 0.0 <= p["accuracy"]["all_named"] <= 1.0 for p in points)


def test_the_checkpoint_holds_the_tokenizer_the_pipeline_was_saved_with(trained):
    out, _, _ = trained
    in_checkpoint = CLIPTokenizer.from_pretrained(out / "checkpoint" / "tokenizer")
    in_pipeline = StableDiffusionPipeline.from_pretrained(out / "pipeline").tokenizer
    assert in_checkpoint.get_vocab() == in_pipeline.get_vocab()


def test_a_checkpoint_without_a_tokenizer_cannot_be_resumed(trained, tmp_path):
    out, _, _ = trained
    legacy = tmp_path / "checkpoint"
    shutil.copytree(out / "checkpoint", legacy)
    shutil.rmtree(legacy / "tokenizer")
    with pytest.raises(ValueError, match="tokenizer/"):
        Checkpointer(legacy).load_tokenizer()


def test_decoder_finetuning_stops_once_the_target_is_reached(trained, tmp_path):
    source, _, _ = trained
    out = tmp_path / "target"
    shutil.copytree(source, out)
    main(["--out", str(out), "--preset", "tiny", "--resume", "--unet-steps", "4", "--decoder-steps", "6",
          "--decoder-target", "0.0"])
    progress = Checkpointer(out / "checkpoint").load_progress()
    assert progress.decoder_done and progress.decoder_step == 2  # the first check (tiny preset: every 2 steps)
    assert "decoder reached reconstruction accuracy 0.0" in (out / "train_log.txt").read_text()


def test_weighted_l1_is_plain_l1_at_unit_weight_and_counts_heavy_pixels_more():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 4, 4)
    recon = torch.rand(2, 3, 4, 4)
    ones = torch.ones(2, 1, 4, 4)
    assert torch.allclose(train_backbone.weighted_l1(recon, target, ones), torch.nn.functional.l1_loss(recon, target))
    wrong_on_one_pixel = target.clone()
    wrong_on_one_pixel[0, :, 0, 0] += 1.0
    heavy = ones.clone()
    heavy[0, 0, 0, 0] = 11.0
    assert train_backbone.weighted_l1(wrong_on_one_pixel, target, heavy) > \
        5 * train_backbone.weighted_l1(wrong_on_one_pixel, target, ones)


def test_pixel_weights_mark_object_pixels_only():
    data = train_backbone.render_dataset(1)
    weights = train_backbone.pixel_weights(data, 10.0)
    mask = train_backbone.object_mask(data)
    assert set(weights.unique().tolist()) == {1.0, 11.0}
    assert torch.equal(weights == 11.0, mask)
    assert 0.0 < mask.float().mean() < 0.5  # objects are a minority of the pixels


def test_the_vae_phase_uses_the_object_weight(tmp_path, monkeypatch):
    seen = []
    original = train_backbone.pixel_weights

    def spy(data, object_weight):
        seen.append(object_weight)
        return original(data, object_weight)

    monkeypatch.setattr(train_backbone, "pixel_weights", spy)
    main(["--out", str(tmp_path), "--preset", "tiny", "--unet-steps", "1", "--vae-object-weight", "7"])
    assert seen == [7.0]
    assert Checkpointer(tmp_path / "checkpoint").load_progress().phase == "unet"


def test_vae_blocks_set_the_latent_side_of_the_saved_pipeline(tmp_path):
    main(["--out", str(tmp_path), "--preset", "tiny", "--unet-steps", "1", "--vae-blocks", "3"])
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert len(pipe.vae.config.block_out_channels) == 3 and pipe.vae_scale_factor == 4
    assert pipe.unet.config.sample_size == 8  # 32 px / 4
    latents = pipe("red circle top", num_inference_steps=1, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape[-2:] == (8, 8)


def test_bad_vae_blocks_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="vae_blocks"):
        parse_args(["--out", str(tmp_path), "--vae-blocks", "5"])
    assert train_backbone.backbone_sizes(parse_args(["--out", str(tmp_path)])).latent_size == 8
    assert train_backbone.backbone_sizes(parse_args(["--out", str(tmp_path), "--vae-blocks", "2"])).latent_size == 16


def test_full_size_16x16_latents_get_a_deeper_unet_without_attention_at_full_resolution(tmp_path):
    sizes = train_backbone.backbone_sizes(parse_args(["--out", str(tmp_path), "--vae-blocks", "2"]))
    assert sizes.unet_channels == (32, 64, 64, 64) and sizes.unet_attention_from == 1
    unet = build_unet(sizes)
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                            "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    out = unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=torch.randn(1, 7, 64)).sample
    assert out.shape == (1, 4, 16, 16)
    default = train_backbone.backbone_sizes(parse_args(["--out", str(tmp_path)]))
    assert build_unet(default).config.down_block_types == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                            "DownBlock2D")


def test_unet_attention_from_must_leave_an_attention_block():
    with pytest.raises(ValueError, match="unet_attention_from"):
        BackboneSizes(unet_channels=(32, 64), unet_attention_from=1)


def test_init_from_continues_an_exported_pipeline_and_the_export_records_the_chain(trained, tmp_path):
    source_run, _, _ = trained
    settings = EvalSettings(captions=2, seeds=1, steps=2, guidance_scales=[4.0])
    source = tmp_path / "backbone_a"
    export_run(source_run, source, settings)  # float16 copy with backbone_a.eval.json beside it, as shipped
    run = tmp_path / "continued"
    main(["--out", str(run), "--preset", "tiny", "--unet-steps", "2", "--init-from", str(source),
          "--vae-blocks", "3"])  # size flags are ignored: the saved models decide
    log = (run / "train_log.txt").read_text()
    assert "vae step" not in log and f"initialised from {source}" in log
    progress = Checkpointer(run / "checkpoint").load_progress()
    assert progress.phase == "unet" and progress.step == 2
    before = StableDiffusionPipeline.from_pretrained(source)
    after = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    assert after.vae.config.scaling_factor == before.vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(before.vae.state_dict().values(), after.vae.state_dict().values()))
    assert after.tokenizer.get_vocab() == before.tokenizer.get_vocab()
    assert after.unet.config.block_out_channels == before.unet.config.block_out_channels
    assert any(not torch.equal(a, b) for a, b in zip(before.unet.state_dict().values(),
                                                       after.unet.state_dict().values()))
    main(["--out", str(run), "--preset", "tiny", "--unet-steps", "3", "--init-from", str(source), "--resume"])
    assert Checkpointer(run / "checkpoint").load_progress().step == 3
    assert "resumed UNet phase at step 2" in (run / "train_log.txt").read_text()

    training = export_run(run, tmp_path / "backbone_a2", settings)["training"]
    assert training["step"] == 3 and training["init_from"] == str(source)
    assert training["init_from_training"]["step"] == 4  # the source run's own record


def test_init_from_must_be_a_pipeline_folder(tmp_path):
    with pytest.raises(ValueError, match="--init-from .* holds no unet/ folder"):
        parse_args(["--out", str(tmp_path / "run"), "--init-from", str(tmp_path)])
