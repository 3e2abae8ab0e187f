"""The chat VLM families the policy runs, and what differs between their processors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class VLMFamily:
    """How one family's processor lays out a chat with images."""

    token_types_key: Optional[str]
    """The processor output (and forward argument) marking image placeholder tokens with 1; None where the
    processor gives none (the policy then marks the model's ``image_token_id``)."""
    pixel_budget: bool
    """The image processor sizes each image between ``min_pixels`` and ``max_pixels`` (Qwen-VL's dynamic
    resolution); otherwise it resizes every image to the model's fixed input size."""
    has_video: bool
    """The processor has a video modality (vLLM is told that chats hold no video)."""
    images_by_sample: bool = False
    """The image inputs are batched by sample (``(samples, images, ...)``, padded with all-zero images, which the
    model skips) rather than concatenated over the batch's images."""
    image_splitting: bool = False
    """The processor can split each image into crops of the model's size plus a global view
    (``do_image_splitting``); the policy passes ``PolicyConfig.image_splitting``."""
    turn_end_token: Optional[str] = None
    """The token its chat template closes a turn with: an end token even where the checkpoint's generation config
    leaves it out."""


VLM_FAMILIES = {
    "qwen2_vl": VLMFamily("mm_token_type_ids", pixel_budget=True, has_video=True),
    "qwen2_5_vl": VLMFamily("mm_token_type_ids", pixel_budget=True, has_video=True),
    "qwen3_vl": VLMFamily("mm_token_type_ids", pixel_budget=True, has_video=True),
    "gemma3": VLMFamily("token_type_ids", pixel_budget=False, has_video=False),
    "idefics3": VLMFamily(None, pixel_budget=False, has_video=False, images_by_sample=True, image_splitting=True,
                          turn_end_token="<end_of_utterance>"),
}
"""``model_type`` -> family, for every family the policy runs and is tested on (tiny models of the real classes)."""

SUPPORTED_MODEL_TYPES = tuple(VLM_FAMILIES)


def vlm_family(model_type: str, name: str) -> VLMFamily:
    """The family of ``name`` (a ``model_type`` model); a clear error for a family the policy does not run."""
    if model_type not in VLM_FAMILIES:
        raise ValueError(f"{name} is a {model_type!r} model; the policy runs the chat VLM families "
                         f"{SUPPORTED_MODEL_TYPES} (their processors' image layouts are what batching and exact "
                         "log-probs are tested on). Use e.g. Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen3-VL-4B-Instruct"
                         ", google/gemma-3-4b-it or HuggingFaceTB/SmolVLM-256M-Instruct (an idefics3 model).")
    return VLM_FAMILIES[model_type]


def image_processor_kwargs(family: VLMFamily, config: Any) -> dict[str, Any]:
    """What the policy tells the processor about preview images (the same to transformers and vLLM), from a
    :class:`~promptloop.policy.PolicyConfig`: the pixel budget, or whether to split images into crops."""
    if family.pixel_budget:
        return {"size": {"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels}}
    if family.image_splitting:
        return {"do_image_splitting": config.image_splitting}
    return {}
