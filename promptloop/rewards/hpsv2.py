"""HPSv2 / HPSv2.1 on open_clip's maintained ViT-H-14 (open_clip is the optional ``rewards`` extra).

The published checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are ``{"state_dict": ...}``
pickles in open_clip's own key layout; they load with ``weights_only=True`` into ``open_clip.CLIP`` built from the
ViT-H-14 config. The score is the cosine of the normalised image and text features (no logit scale), as in the
reference. An ``open_clip_config.json`` beside the checkpoint (open_clip's local-dir layout) overrides the
architecture; tests use it for tiny models.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import ModelReward
from .checkpoints import load_strict, read_state_dict
from .preprocess import ImageTransform
from .registry import register_reward
from .weights import EXPECTED_FILES, HPSV2_CHECKPOINTS, resolve_weights

HPSV2_ARCHITECTURE = "ViT-H-14"
ARCHITECTURE_FILE = "open_clip_config.json"


def _import_open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError("hpsv2 needs open-clip-torch: pip install 'promptloop[rewards]'.") from exc
    return open_clip


def hpsv2_model_config(folder: Path) -> dict:
    """open_clip model config: ``open_clip_config.json`` in ``folder`` if present, else ViT-H-14."""
    config_file = folder / ARCHITECTURE_FILE
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        return config.get("model_cfg", config)
    return _import_open_clip().get_model_config(HPSV2_ARCHITECTURE)


def build_open_clip(model_config: dict) -> torch.nn.Module:
    """A randomly initialised ``open_clip.CLIP`` for ``model_config`` (weights are loaded afterwards)."""
    open_clip = _import_open_clip()
    config = dict(model_config)
    quick_gelu = config.pop("quick_gelu", False)
    return open_clip.CLIP(**config, quick_gelu=quick_gelu, output_dict=True)


@register_reward("hpsv2")
class HPSv2(ModelReward):
    """Human Preference Score v2 / v2.1: cosine of open_clip ViT-H-14 image and query features (about 0.2-0.35).

    Args:
        version: "v2.1" (default) or "v2.0"; picks ``HPS_v2.1_compressed.pt`` or ``HPS_v2_compressed.pt`` of
            xswu/HPSv2 (a ``.safetensors`` conversion of either is accepted).
    """

    name = "hpsv2"

    def __init__(self, path=None, cache_dir=None, download: bool = False, version: str = "v2.1", device=None,
                 dtype=None, on_nonfinite: str = "warn"):
        if version not in HPSV2_CHECKPOINTS:
            raise ValueError(f"Unknown HPSv2 version {version!r}; choose one of {sorted(HPSV2_CHECKPOINTS)}.")
        super().__init__(device=device, dtype=dtype, on_nonfinite=on_nonfinite)
        resolved = resolve_weights(EXPECTED_FILES[f"hpsv2-{version}"], path, cache_dir, download)
        open_clip = _import_open_clip()
        checkpoint = resolved.files[HPSV2_CHECKPOINTS[version]]
        config = hpsv2_model_config(checkpoint.parent)
        state_dict = read_state_dict(checkpoint, nested_key="state_dict")
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        model = build_open_clip(config)
        load_strict(model, state_dict, checkpoint.name)
        self.model = self.place(model)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=config["text_cfg"].get("context_length", 77))
        self.transform = ImageTransform(size=config["vision_cfg"]["image_size"], resize_pil=False)

    def score_batch(self, images, queries, metadata):
        pixels = self.transform(images).to(self.device, self.dtype)
        text = self.tokenizer(queries).to(self.device)
        image_features = self.model.encode_image(pixels, normalize=True).float()
        text_features = self.model.encode_text(text, normalize=True).float()
        return (image_features * text_features).sum(-1)
