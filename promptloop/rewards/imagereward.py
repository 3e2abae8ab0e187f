"""ImageReward v1.0 on transformers' BLIP modules.

The published ``ImageReward.pt`` holds a BLIP ViT-L/16 (``blip.visual_encoder.*``, timm layout), a BERT with
cross-attention (``blip.text_encoder.*``, BLIP's med.py layout) and a score head (``mlp.layers.*``). Its keys are
renamed onto ``BlipVisionModel`` + ``BlipTextModel`` + ``MLPHead``; the reference package is never imported.
The score is the head's output on the [CLS] state, normalised as the reference does.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from .base import ModelReward
from .checkpoints import KeyMap, load_strict, read_state_dict
from .heads import MLPHead
from .preprocess import ImageTransform
from .registry import register_reward
from .weights import EXPECTED_FILES, resolve_weights

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
PROMPT_MAX_LENGTH = 35  # the reference tokenizes every prompt to 35 tokens
VISION_HEAD_DIM = 64  # BLIP's ViT-L/16 uses 16 heads of 64 dims; the checkpoint does not store the head count
VISION_LAYER_NORM_EPS = 1e-6  # timm ViT default used by BLIP

IMAGEREWARD_KEYS = KeyMap([
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{n}.norm1.", "vision.encoder.layers.{n}.layer_norm1."),
    ("blip.visual_encoder.blocks.{n}.attn.qkv.", "vision.encoder.layers.{n}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{n}.attn.proj.", "vision.encoder.layers.{n}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{n}.norm2.", "vision.encoder.layers.{n}.layer_norm2."),
    ("blip.visual_encoder.blocks.{n}.mlp.", "vision.encoder.layers.{n}.mlp."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    ("blip.text_encoder.", "text."),
    ("mlp.", "head."),
])


def vision_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> BlipVisionConfig:
    """The ViT's config read off the shapes of its (renamed) weights."""
    width = state_dict["vision.embeddings.class_embedding"].shape[-1]
    patch = state_dict["vision.embeddings.patch_embedding.weight"].shape[-1]
    grid = math.isqrt(state_dict["vision.embeddings.position_embedding"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[3]) for k in state_dict if k.startswith("vision.encoder.layers."))
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=state_dict["vision.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // VISION_HEAD_DIM),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
    )


def text_config_from_med_config(med: dict, encoder_width: int) -> BlipTextConfig:
    """``BlipTextConfig`` equivalent to BLIP's ``med_config.json`` with cross-attention to ``encoder_width``."""
    if not med.get("add_cross_attention", False):
        raise ValueError("med_config.json must have add_cross_attention: true (ImageReward's text encoder reads "
                         "the image through cross-attention).")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "hidden_dropout_prob",
            "attention_probs_dropout_prob")
    # bos is BLIP's added [DEC] token; sep/eos are not used when scoring
    return BlipTextConfig(**{k: med[k] for k in keys if k in med}, encoder_hidden_size=encoder_width,
                          is_decoder=True, bos_token_id=med["vocab_size"] - 2, sep_token_id=None, eos_token_id=None)


class ImageRewardModel(nn.Module):
    """BLIP vision tower + cross-attending BERT + score head; ``forward`` returns normalised rewards (B,)."""

    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig, head: MLPHead):
        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = head

    @classmethod
    def from_published(cls, state_dict: dict[str, torch.Tensor], med_config: dict) -> "ImageRewardModel":
        """Build from an ``ImageReward.pt`` state dict (published keys) and its ``med_config.json``."""
        ours, _ = IMAGEREWARD_KEYS.to_ours(state_dict)  # unmatched: BLIP's unused vision_proj/text_proj
        vision_config = vision_config_from_state_dict(ours)
        text_config = text_config_from_med_config(med_config, vision_config.hidden_size)
        head = MLPHead.from_state_dict({k[len("head."):]: v for k, v in ours.items() if k.startswith("head.")})
        model = cls(vision_config, text_config, head)
        load_strict(model, ours, "ImageReward.pt")
        return model

    def published_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the published ``ImageReward.pt`` key names."""
        return IMAGEREWARD_KEYS.to_published(self.state_dict())

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_mask).last_hidden_state
        raw = self.head(text[:, 0].to(self.head.layers[0].weight.dtype))
        return (raw - REWARD_MEAN) / REWARD_STD


def make_blip_tokenizer(vocab_file: Path) -> BertTokenizer:
    """BLIP's tokenizer: uncased BERT WordPiece plus the [DEC] and [ENC] tokens (vocabulary of 30524)."""
    # one WordPiece per line, id = line number (transformers 5 takes the vocabulary itself, not its file)
    vocab = {token: i for i, token in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)
    return tokenizer


@register_reward("imagereward")
class ImageReward(ModelReward):
    """ImageReward v1.0: human-preference score of an image for its query (roughly standard-normal).

    Files (see ``EXPECTED_FILES["imagereward"]``): ``ImageReward.pt`` (or a ``.safetensors`` conversion) and
    ``med_config.json`` from THUDM/ImageReward, ``vocab.txt`` from google-bert/bert-base-uncased, in one folder.
    """

    name = "imagereward"

    def __init__(self, path=None, cache_dir=None, download: bool = False, device=None, dtype=None,
                 on_nonfinite: str = "warn"):
        super().__init__(device=device, dtype=dtype, on_nonfinite=on_nonfinite)
        files = resolve_weights(EXPECTED_FILES["imagereward"], path, cache_dir, download).files
        med_config = json.loads(files["med_config.json"].read_text())
        self.tokenizer = make_blip_tokenizer(files["vocab.txt"])
        model = ImageRewardModel.from_published(read_state_dict(files["ImageReward.pt"]), med_config)
        self.model = self.place(model)
        self.model.head.float()  # the reference scores the [CLS] state in float32
        self.transform = ImageTransform(size=self.model.vision.config.image_size)

    def score_batch(self, images, queries, metadata):
        tokens = self.tokenizer(queries, padding="max_length", truncation=True, max_length=PROMPT_MAX_LENGTH,
                                return_tensors="pt").to(self.device)
        pixels = self.transform(images).to(self.device, self.dtype)
        return self.model(pixels, tokens.input_ids, tokens.attention_mask)
