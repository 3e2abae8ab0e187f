"""The learned preference model of the mini world (the ImageReward analogue): a small CNN over the image and a bag
of words over the query, scoring how much the gold rule would like the image for that query.

Saved as ``config.json`` + ``model.safetensors``; ``train_preference`` trains it on pairs labelled by the gold rule.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .domain import REFERENCE_SIZE, VOCABULARY, parse_caption

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class PreferenceModelConfig:
    """Sizes of a :class:`PreferenceModel`."""

    channels: tuple[int, ...] = (8, 16, 32, 32)
    """Output channels of the convolutions: the first keeps 32 px, each next one halves the side."""
    embed_dim: int = 64
    """Width of the image embedding, the query embedding and the head."""
    vocabulary: tuple[str, ...] = field(default=VOCABULARY)
    """The query words the model reads (a bag of words); other words are ignored."""

    def __post_init__(self):
        self.channels, self.vocabulary = tuple(self.channels), tuple(self.vocabulary)
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise ValueError(f"channels needs at least two positive entries, got {self.channels}.")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}.")

    @property
    def feature_side(self) -> int:
        return REFERENCE_SIZE // 2 ** (len(self.channels) - 1)


class PreferenceModel(nn.Module):
    """``model(pixels, words) -> (B,)`` scores; ``pixels`` (B, 3, 32, 32) in [0, 1], ``words`` (B, V) multi-hot."""

    def __init__(self, config: PreferenceModelConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        in_channels = 3
        for i, out_channels in enumerate(config.channels):
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=1 if i == 0 else 2, padding=1), nn.GELU()]
            in_channels = out_channels
        side = config.feature_side
        layers += [nn.Flatten(), nn.Linear(in_channels * side * side, config.embed_dim)]
        self.image_encoder = nn.Sequential(*layers)
        self.query_encoder = nn.Linear(len(config.vocabulary), config.embed_dim)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(3 * config.embed_dim, config.embed_dim), nn.GELU(),
                                  nn.Linear(config.embed_dim, 1))
        self._word_index = {word: i for i, word in enumerate(config.vocabulary)}

    def encode_queries(self, queries: Sequence[str]) -> torch.Tensor:
        """(B, V) float multi-hot of the domain words each query names."""
        words = torch.zeros(len(queries), len(self.config.vocabulary))
        for row, query in enumerate(queries):
            for word in parse_caption(query).values():
                if word in self._word_index:
                    words[row, self._word_index[word]] = 1.0
        return words.to(self.query_encoder.weight.device, self.query_encoder.weight.dtype)

    def forward(self, pixels: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        image = self.image_encoder(pixels * 2.0 - 1.0)
        query = self.query_encoder(words)
        return self.head(torch.cat([image, query, image * query], dim=-1)).squeeze(-1)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "PreferenceModel":
        directory = Path(directory)
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} lacks {missing}; train a model with "
                                    "`python -m promptloop.miniworld.train_preference --out DIR`.")
        model = cls(PreferenceModelConfig(**json.loads((directory / CONFIG_NAME).read_text())))
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.eval()
