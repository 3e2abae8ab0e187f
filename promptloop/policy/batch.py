"""Per-sample records of generated answers, and their re-batching for a teacher-forced forward."""
from __future__ import annotations

from dataclasses import dataclass, field
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
    vision: dict[str, torch.Tensor] = field(default_factory=dict)
    """This sample's image inputs as the processor gives them, its own rows only: ``pixel_values`` (Qwen-VL: one row
    per patch, with ``image_grid_thw``, one row per image; Gemma 3: one image per row; Idefics3: one row of its
    crops, ``(1, crops, ...)``, with ``pixel_attention_mask``); empty without images."""

    def __post_init__(self) -> None:
        if self.prompt_ids.ndim != 1 or self.completion_ids.ndim != 1:
            raise ValueError("prompt_ids and completion_ids must be 1-D (one unpadded sample).")
        if self.mm_token_type_ids.shape != self.prompt_ids.shape:
            raise ValueError("mm_token_type_ids must have the shape of prompt_ids.")


TEXT_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
"""Processor outputs laid out per token; every other output is an image input."""


def split_image_inputs(encoding: dict[str, torch.Tensor], images_per_sample: Sequence[int],
                       by_sample: bool = False) -> list[dict]:
    """Each sample's rows of a batched processor output's image inputs (samples in order, ``images_per_sample[i]``
    images in sample i): one row per image, or for Qwen-VL's ``pixel_values`` one row per patch of the
    ``image_grid_thw`` grid; ``by_sample`` (Idefics3): row i is sample i's images, of which the all-zero padding
    ones are dropped (kept as a batch of one). Any other layout is an error rather than a silent mix-up of images."""
    if by_sample:
        return _split_by_sample(encoding, images_per_sample)
    num_images = sum(images_per_sample)
    grid = encoding.get("image_grid_thw")
    pieces: list[dict] = [{} for _ in images_per_sample]
    for key, value in encoding.items():
        if key in TEXT_INPUTS or not isinstance(value, torch.Tensor):
            continue
        rows = grid.prod(-1).tolist() if key == "pixel_values" and grid is not None else [1] * num_images
        if sum(rows) != value.shape[0]:
            raise ValueError(f"The processor's {key!r} has {value.shape[0]} rows for {num_images} images; the policy "
                             "splits image inputs by image (one row each, or Qwen-VL's patches).")
        start, image = 0, 0
        for sample, count in zip(pieces, images_per_sample):
            size = sum(rows[image:image + count])
            if count:
                sample[key] = value[start:start + size].clone()
            start, image = start + size, image + count
    return pieces


def _split_by_sample(encoding: dict[str, torch.Tensor], images_per_sample: Sequence[int]) -> list[dict]:
    pieces: list[dict] = [{} for _ in images_per_sample]
    pixels = encoding.get("pixel_values")
    if pixels is None:
        return pieces
    if pixels.ndim != 5 or pixels.shape[0] != len(images_per_sample):
        raise ValueError(f"The processor's 'pixel_values' has shape {tuple(pixels.shape)}; batched by sample it "
                         f"should be ({len(images_per_sample)}, images, channels, height, width).")
    for row, (sample, count) in enumerate(zip(pieces, images_per_sample)):
        real = pixels[row].flatten(1).ne(0).any(1)  # padding images are all zeros
        if count:
            for key, value in encoding.items():
                if key not in TEXT_INPUTS and isinstance(value, torch.Tensor):
                    sample[key] = value[row][real].unsqueeze(0).clone()
    return pieces


def _pad_images(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``(1, n_i, ...)`` tensors as one ``(batch, max n_i, ...)`` batch, padded with zeros (images the model skips)."""
    count = max(t.shape[1] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), count) + tuple(tensors[0].shape[2:]))
    for row, t in enumerate(tensors):
        out[row, :t.shape[1]] = t[0]
    return out


@dataclass
class CollatedBatch:
    """Samples laid out as ``[left padding, prompt, completion, right padding]`` rows."""

    model_inputs: dict[str, Any]
    """Keyword arguments of the model's forward."""
    completion_ids: torch.Tensor
    """``(B, C)`` completion ids, right-padded; they occupy the last ``C`` columns of ``input_ids``."""
    completion_mask: torch.Tensor
    """``(B, C)`` bool, True at real completion tokens."""


def collate_samples(samples: Sequence[PolicySample], pad_token_id: int, device: torch.device,
                    token_types_key: Optional[str] = "mm_token_type_ids", images_by_sample: bool = False
                    ) -> CollatedBatch:
    """Re-batch samples: prompts left-padded to a common length, completions right-padded after them.

    This is the layout ``generate`` works in. Multimodal RoPE positions are computed from the attention mask; in
    text-only rows they may be offset by the padding, which rotary embeddings do not see (relative positions).
    Image inputs are concatenated in sample order (``images_by_sample``: one row per sample, padded with all-zero
    images, a row of them for a sample without images); the token types (passed as ``token_types_key``, the model
    family's name for them; not passed when None) are zero over completions and padding.
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

    model_inputs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if token_types_key is not None:
        model_inputs[token_types_key] = mm_token_type_ids.to(device)
    with_images = [s for s in samples if s.vision]
    for key in with_images[0].vision if with_images else ():
        if images_by_sample:
            empty = with_images[0].vision[key][:, :0]
            model_inputs[key] = _pad_images([s.vision[key] if s.vision else empty for s in samples]).to(device)
        else:
            model_inputs[key] = torch.cat([s.vision[key] for s in with_images]).to(device)
    return CollatedBatch(
        model_inputs=model_inputs,
        completion_ids=input_ids[:, prompt_len:].to(device),
        completion_mask=completion_mask.to(device),
    )
