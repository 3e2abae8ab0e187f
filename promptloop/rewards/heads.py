"""The linear score head shared by ImageReward and the LAION aesthetic predictor.

Both publish the same layout (no activations between the layers):
``layers = Sequential(Linear(d, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
Linear(64, 16), Linear(16, 1))``, so state-dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``.
"""
from __future__ import annotations

import torch
from torch import nn

HEAD_WIDTHS = (1024, 128, 64, 16, 1)
_DROPOUTS = (0.2, 0.2, 0.1)  # after the first three linear layers (inactive in eval)


class MLPHead(nn.Module):
    """The published score head, with widths taken from the checkpoint."""

    def __init__(self, in_features: int, widths: tuple[int, ...] = HEAD_WIDTHS):
        super().__init__()
        if len(widths) != len(HEAD_WIDTHS):
            raise ValueError(f"MLPHead needs {len(HEAD_WIDTHS)} widths; got {widths}.")
        dims = (in_features,) + tuple(widths)
        modules: list[nn.Module] = []
        for i in range(len(widths)):
            modules.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(_DROPOUTS):
                modules.append(nn.Dropout(_DROPOUTS[i]))
        self.layers = nn.Sequential(*modules)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> "MLPHead":
        """Build a head shaped like ``state_dict`` (keys ``layers.N.weight``) and load it strictly."""
        weights = sorted((int(k.split(".")[1]), v) for k, v in state_dict.items() if k.endswith(".weight"))
        if len(weights) != len(HEAD_WIDTHS):
            raise ValueError(f"Expected {len(HEAD_WIDTHS)} linear layers in the score head; found keys "
                             f"{sorted(state_dict)}.")
        head = cls(weights[0][1].shape[1], tuple(w.shape[0] for _, w in weights))
        head.load_state_dict(state_dict, strict=True)
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)
