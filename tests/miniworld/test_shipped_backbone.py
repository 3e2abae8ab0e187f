"""The shipped backbone A loads through the standard loaders, samples, and follows captions above chance; the
export keeps it small and loadable with no dtype argument."""
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from promptloop.backbones import StableDiffusionBackbone, auto_backbone
from promptloop.miniworld.backbone import SHIPPED_BACKBONE_A
from promptloop.miniworld.export_backbone import export_pipeline
from caption_following import caption_following


def test_shipped_backbone_is_a_few_megabytes_of_safetensors():
    files = [p for p in SHIPPED_BACKBONE_A.rglob("*") if p.is_file()]
    assert (SHIPPED_BACKBONE_A / "model_index.json").is_file()
    assert all(p.suffix != ".bin" for p in files)
    assert sum(p.stat().st_size for p in files) < 8_000_000


def test_shipped_backbone_loads_with_the_stock_pipeline_and_samples():
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_BACKBONE_A)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    generators = [torch.Generator().manual_seed(s) for s in range(2)]
    images = pipe(["red circle", "blue square black"], num_inference_steps=4, guidance_scale=4.0,
                  generator=generators).images
    assert [im.size for im in images] == [(32, 32), (32, 32)]


def test_shipped_backbone_follows_background_and_position_through_the_adapter():
    backbone = auto_backbone(str(SHIPPED_BACKBONE_A))
    assert isinstance(backbone, StableDiffusionBackbone)
    accuracy = caption_following(backbone, ("row", "column", "background"))
    # Chance is 0.25 (background) and 0.33 (row, column); the shipped model scored 1.00 on all three.
    assert min(accuracy.values()) >= 0.6, accuracy


def _stored_dtypes(path) -> set:
    with safe_open(path, "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_export_halves_unet_and_vae_and_loads_back_as_float32(tiny_backbone_a_dir, tmp_path):
    dest = export_pipeline(tiny_backbone_a_dir, tmp_path / "shipped")
    assert _stored_dtypes(dest / "unet" / "diffusion_pytorch_model.safetensors") == {"F16"}
    assert _stored_dtypes(dest / "vae" / "diffusion_pytorch_model.safetensors") == {"F16"}
    assert _stored_dtypes(dest / "text_encoder" / "model.safetensors") == {"F32"}
    original = StableDiffusionPipeline.from_pretrained(tiny_backbone_a_dir)
    shipped = StableDiffusionPipeline.from_pretrained(dest)
    assert {shipped.unet.dtype, shipped.vae.dtype, shipped.text_encoder.dtype} == {torch.float32}
    for name, p in original.unet.named_parameters():
        torch.testing.assert_close(dict(shipped.unet.named_parameters())[name], p.half().float())
    image = shipped("red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert not (tmp_path / "shipped.tmp").exists()


def test_export_rejects_a_folder_without_a_pipeline(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        export_pipeline(tmp_path, tmp_path / "out")
