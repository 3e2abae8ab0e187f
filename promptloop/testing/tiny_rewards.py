"""Tiny random-weight reward models of the real architectures, saved in the published file layouts.

Each ``save_tiny_<reward>(folder)`` builds the same classes the reward loads (tiny dimensions), writes the same
file names with the same key names as the published checkpoint, and returns ``folder``; loading it goes through the
very loader that reads the real files: ``load_reward(name, path=folder)``.
"""
from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import BlipVisionConfig, CLIPConfig, CLIPModel

from promptloop.rewards.heads import HEAD_WIDTHS, MLPHead
from promptloop.rewards.hpsv2 import ARCHITECTURE_FILE, build_open_clip
from promptloop.rewards.imagereward import ImageRewardModel, text_config_from_med_config
from promptloop.rewards.weights import AESTHETIC_CHECKPOINT, HPSV2_CHECKPOINTS
from promptloop.testing.tokenizers import make_clip_tokenizer

TINY_IMAGE_SIZE = 32
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@torch.no_grad()
def randomize_(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Draw every matrix and bias from N(0, std); norm scales stay at 1 (some configs init weights near zero)."""
    for name, param in module.named_parameters():
        if param.ndim >= 2 or name.endswith("bias"):
            param.normal_(0.0, std)
    return module


def save_tiny_imagereward(folder: str | Path, seed: int = 0) -> Path:
    """``ImageReward.pt`` + ``med_config.json`` + ``vocab.txt``: a 2-layer ViT (width 64) and 2-layer BERT (32)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = BERT_SPECIAL_TOKENS + chars + ["##" + c for c in chars]  # WordPiece spells any word from these
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(vocab) + 2,
           "encoder_width": 64, "add_cross_attention": True}
    (folder / "med_config.json").write_text(json.dumps(med, indent=2))
    vision = BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                              image_size=TINY_IMAGE_SIZE, patch_size=16, layer_norm_eps=1e-6)
    model = randomize_(ImageRewardModel(vision, text_config_from_med_config(med, 64), MLPHead(32)))
    randomize_(model.head, std=0.2)  # spread the scores
    state_dict = model.published_state_dict()
    # BLIP's contrastive projections ship in the real file but are unused by ImageReward
    state_dict["blip.vision_proj.weight"] = torch.randn(16, 64)
    state_dict["blip.text_proj.weight"] = torch.randn(16, 32)
    torch.save(state_dict, folder / "ImageReward.pt")
    return folder


def _save_tiny_clip(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = make_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TINY_IMAGE_SIZE, patch_size=8),
        projection_dim=32,
    )
    CLIPModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def save_tiny_pickscore(folder: str | Path, seed: int = 0) -> Path:
    """A tiny ``CLIPModel`` folder (``config.json``, ``model.safetensors``) with its tokenizer, like PickScore_v1."""
    return _save_tiny_clip(Path(folder), seed)


def save_tiny_clipscore(folder: str | Path, seed: int = 1) -> Path:
    """A tiny ``CLIPModel`` folder, like openai/clip-vit-base-patch32."""
    return _save_tiny_clip(Path(folder), seed)


def save_tiny_aesthetic(folder: str | Path, seed: int = 2) -> Path:
    """``sac+logos+ava1-l14-linearMSE.pth`` (head on 32-d embeddings) and a tiny CLIP in ``clip/``."""
    folder = Path(folder)
    _save_tiny_clip(folder / "clip", seed)
    head = randomize_(MLPHead(32, HEAD_WIDTHS), std=0.2)
    torch.save(head.state_dict(), folder / AESTHETIC_CHECKPOINT)
    return folder


def save_tiny_hpsv2(folder: str | Path, version: str = "v2.1", seed: int = 3) -> Path:
    """``HPS_v2*.pt`` (``{"state_dict": ...}`` as published) and the tiny architecture as ``open_clip_config.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    (folder / ARCHITECTURE_FILE).write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CONFIG}, indent=2))
    model = build_open_clip(TINY_OPEN_CLIP_CONFIG)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, folder / HPSV2_CHECKPOINTS[version])
    return folder


TINY_REWARD_BUILDERS: dict[str, Callable[..., Path]] = {
    "imagereward": save_tiny_imagereward,
    "pickscore": save_tiny_pickscore,
    "hpsv2": save_tiny_hpsv2,
    "aesthetic": save_tiny_aesthetic,
    "clipscore": save_tiny_clipscore,
}
