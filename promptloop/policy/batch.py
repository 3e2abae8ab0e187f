"""Per-sample records of generated answers, and their re-batching for a teacher-forced forward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch


@dataclass
class PolicySample:
    """Everything needed to re-run the exact forward that produced one answer (tensors on the CPU, unpadded)."""

    prompt_ids: torch.Tensor
    """``(P,)`` token ids of the rendered chat, generation prompt included."""
    mm_token_type_ids: torch.Tensor
    """``(P,)`` 1 at image placeholder tokens, 0 elsewhere."""
    completion_ids: torch.Tensor
    """``(C,)`` generated token ids, up to and including the end token (if one was generated)."""
    pixel_values: Optional[torch.Tensor] = None
    """``(num_patches, patch_dim)`` processor output for this sample's images; None without images."""
    image_grid_thw: Optional[torch.Tensor] = None
    """``(num_images, 3)`` patch grid per image; None without images."""

    def __post_init__(self) -> None:
        if self.prompt_ids.ndim != 1 or self.completion_ids.ndim != 1:
            raise ValueError("prompt_ids and completion_ids must be 1-D (one unpadded sample).")
        if self.mm_token_type_ids.shape != self.prompt_ids.shape:
            raise ValueError("mm_token_type_ids must have the shape of prompt_ids.")
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must be given together.")


@dataclass
class CollatedBatch:
    """Samples laid out as ``[left padding, prompt, completion, right padding]`` rows."""

    model_inputs: dict[str, Any]
    """Keyword arguments of the model's forward."""
    completion_ids: torch.Tensor
    """``(B, C)`` completion ids, right-padded; they occupy the last ``C`` columns of ``input_ids``."""
    completion_mask: torch.Tensor
    """``(B, C)`` bool, True at real completion tokens."""


def collate_samples(samples: Sequence[PolicySample], pad_token_id: int, device: torch.device) -> CollatedBatch:
    """Re-batch samples: prompts left-padded to a common length, completions right-padded after them.

    This is the layout ``generate`` works in. Multimodal RoPE positions are computed from the attention mask; in
    text-only rows they may be offset by the padding, which rotary embeddings do not see (relative positions).
    Image tensors are concatenated in sample order; ``mm_token_type_ids`` is zero over completions and padding.
    """
    if not samples:
        raise ValueError("collate_samples needs at least one sample.")
    prompt_len = max(len(s.prompt_ids) for s in samples)
    completion_len = max(1, max(len(s.completion_ids) for s in samples))
    batch, width = len(samples), prompt_len + completion_len
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    mm_token_type_ids = torch.zeros((batch, width), dtype=torch.long)
    completion_mask = torch.zeros((batch, completion_len), dtype=torch.bool)
    for row, sample in enumerate(samples):
        start = prompt_len - len(sample.prompt_ids)
        end = prompt_len + len(sample.completion_ids)
        input_ids[row, start:prompt_len] = sample.prompt_ids
        input_ids[row, prompt_len:end] = sample.completion_ids
        attention_mask[row, start:end] = 1
        mm_token_type_ids[row, start:prompt_len] = sample.mm_token_type_ids
        completion_mask[row, : len(sample.completion_ids)] = True

    model_inputs: dict[str, Any] = {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "mm_token_type_ids": mm_token_type_ids.to(device),
    }
    with_images = [s for s in samples if s.pixel_values is not None]
    if with_images:
        model_inputs["pixel_values"] = torch.cat([s.pixel_values for s in with_images]).to(device)
        model_inputs["image_grid_thw"] = torch.cat([s.image_grid_thw for s in with_images]).to(device)
    return CollatedBatch(
        model_inputs=model_inputs,
        completion_ids=input_ids[:, prompt_len:].to(device),
        completion_mask=completion_mask.to(device),
    )
