"""Reading published checkpoints safely and renaming their keys onto maintained modules."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_state_dict(path: Path, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a torch pickle read with ``weights_only=True``.

    ``nested_key`` picks a sub-dict of a pickle (HPSv2 stores ``{"state_dict": ...}``); a safetensors conversion is
    always flat.
    """
    if path.suffix == ".safetensors":
        return load_file(str(path))
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if nested_key is not None and nested_key in payload:
        payload = payload[nested_key]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors.")
    return payload


class KeyMap:
    """Renames state-dict keys between a published layout and our modules, in both directions.

    Each rule is a pair of templates ``(published, ours)``. ``{n}`` stands for a layer index. A template ending in
    "." is a prefix (the rest of the key is kept); any other template matches the whole key. The first matching
    rule wins; keys that no rule matches are returned separately so the caller decides what to do with them.
    """

    def __init__(self, rules: list[tuple[str, str]]):
        self.rules = rules

    @staticmethod
    def _pattern(template: str) -> re.Pattern:
        body = re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)")
        return re.compile(f"^{body}(?P<rest>.*)$" if template.endswith(".") else f"^{body}$")

    def _rename(self, state_dict, source: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        compiled = [(self._pattern(rule[source]), rule[1 - source]) for rule in self.rules]
        renamed, unmatched = {}, []
        for key, value in state_dict.items():
            for pattern, target in compiled:
                match = pattern.match(key)
                if match:
                    groups = match.groupdict()
                    renamed[target.replace("{n}", groups.get("n") or "") + (groups.get("rest") or "")] = value
                    break
            else:
                unmatched.append(key)
        return renamed, unmatched

    def to_ours(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Published keys -> our keys; also returns the published keys no rule matched."""
        return self._rename(state_dict, 0)

    def to_published(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our keys -> published keys (every key must match a rule)."""
        renamed, unmatched = self._rename(state_dict, 1)
        if unmatched:
            raise KeyError(f"No published name for keys {unmatched[:5]}.")
        return renamed


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state_dict`` into ``module``; every parameter and persistent buffer of ``module`` must be present."""
    result = module.load_state_dict(state_dict, strict=False)
    if result.missing_keys:
        raise ValueError(f"{what}: the checkpoint lacks {len(result.missing_keys)} weights, e.g. "
                         f"{result.missing_keys[:5]}; is it the right file?")
