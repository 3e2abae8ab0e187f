"""Fixtures shared by the mini-world tests."""
import pytest
import torch

from promptloop.miniworld.backbone import TINY_SIZES, assemble_pipeline, build_text_encoder, build_unet, build_vae
from promptloop.miniworld.tokenizer import make_miniworld_tokenizer


@pytest.fixture(scope="session")
def tiny_backbone_a_dir(tmp_path_factory):
    """A tiny backbone A folder (the real SD classes, random weights, seed 0), written by save_pretrained."""
    torch.manual_seed(0)
    tokenizer = make_miniworld_tokenizer()
    pipe = assemble_pipeline(build_vae(TINY_SIZES), build_text_encoder(TINY_SIZES, tokenizer), tokenizer,
                             build_unet(TINY_SIZES))
    path = tmp_path_factory.mktemp("tiny_backbone_a") / "pipeline"
    pipe.save_pretrained(path, safe_serialization=True)
    return path
