"""The training command end to end at tiny sizes: phases, checkpoint, resume, save, load, sample, evaluate."""
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

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
