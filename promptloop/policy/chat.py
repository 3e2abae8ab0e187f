"""Observation -> chat messages for the policy, one builder per mode.

Messages use the transformers multimodal chat format (``{"type": "image"}`` / ``{"type": "text", "text": ...}``
parts); the image itself travels separately to the processor, in message order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from PIL import Image

from promptloop.backbones.types import Observation

CLOSED_LOOP_SYSTEM_PROMPT = """\
You refine prompts for a text-to-image diffusion model while it is generating an image.
You are shown the user's query, the prompt in use so far, and the model's current estimate of the final image \
(a blurry preview early on, sharper later). Write ONE improved prompt for the model's text encoder.
Rules:
- Keep the user's intent and every subject, attribute, count and relation the query asks for; never replace the \
query's content with something else.
- Fix what the preview gets wrong or misses, and add concrete visual detail (composition, lighting, style, colours, \
textures) that makes a better picture.
- Mind the progress: early steps (much noise left) decide layout, composition and colours; late steps (little \
noise left) only refine details and textures, so late changes should be small and about details.
- Be concise: one or two sentences, at most about 50 words. The text encoder reads a limited number of tokens and \
ignores the rest.
- Answer with the prompt only: no explanation, no quotes, no labels, no lists."""

ONE_SHOT_SYSTEM_PROMPT = """\
You rewrite prompts for a text-to-image diffusion model before it starts generating.
Write ONE improved prompt for the model's text encoder from the user's query.
Rules:
- Keep the user's intent and every subject, attribute, count and relation the query asks for.
- Add concrete visual detail (composition, lighting, style, colours, textures) that makes a better picture.
- Be concise: one or two sentences, at most about 50 words. The text encoder reads a limited number of tokens and \
ignores the rest.
- Answer with the prompt only: no explanation, no quotes, no labels, no lists."""

A_PRIORI_SYSTEM_PROMPT = """\
You write a schedule of prompts for a text-to-image diffusion model before it starts generating. The model switches \
to the next prompt at evenly spaced points of its denoising process.
Rules:
- Every prompt keeps the user's intent and every subject, attribute, count and relation the query asks for.
- The first prompts (much noise left) decide layout, composition and colours; the last prompts (little noise left) \
refine details and textures, so they should change little and concern details.
- Each prompt is concise: one or two sentences, at most about 50 words. The text encoder reads a limited number of \
tokens and ignores the rest.
- Answer with exactly one line per prompt, numbered "1: ...", "2: ...", and nothing else."""

DEFAULT_SYSTEM_PROMPTS = {
    "closed": CLOSED_LOOP_SYSTEM_PROMPT,
    "oneshot": ONE_SHOT_SYSTEM_PROMPT,
    "apriori": A_PRIORI_SYSTEM_PROMPT,
}


@dataclass
class Chat:
    """The messages for one observation and the images they reference, in order."""

    messages: list[dict[str, Any]]
    images: list[Image.Image]


def _progress_line(observation: Observation) -> str:
    return (
        f"Progress: refinement {observation.refinement_index + 1} of {observation.num_refinements}, at sampler step "
        f"{observation.step} of {observation.num_steps}; {observation.noise_level:.0%} of the noise is left."
    )


def _closed_loop_text(observation: Observation) -> str:
    lines = [f"User query: {observation.query}", f"Current prompt: {observation.prompt}"]
    earlier = observation.history[:-1]
    if earlier:
        lines.append("Earlier prompts, oldest first:")
        lines.extend(f"{i}. {prompt}" for i, prompt in enumerate(earlier, start=1))
    lines.append(_progress_line(observation))
    if observation.preview is not None:
        lines.append("The image above is the model's current estimate of the final image.")
    else:
        lines.append("No preview image is available.")
    lines.append("Write the next prompt.")
    return "\n".join(lines)


def _one_shot_text(observation: Observation) -> str:
    return f"User query: {observation.query}\nWrite the prompt."


def _a_priori_text(observation: Observation) -> str:
    n = observation.num_refinements
    return (
        f"User query: {observation.query}\n"
        f"Write {n} prompts, one per line, numbered 1 to {n}: prompt 1 is used first (pure noise), prompt {n} last "
        f"(fine details)."
    )


def build_chat(observation: Observation, mode: str, system_prompt: Optional[str] = None) -> Chat:
    """The chat for ``observation`` in ``mode`` ('closed', 'oneshot' or 'apriori').

    Only the closed loop shows the preview (when there is one); the one-shot and a-priori modes see the query alone.
    ``system_prompt`` replaces the mode's default system prompt.
    """
    if mode not in DEFAULT_SYSTEM_PROMPTS:
        raise ValueError(f"mode={mode!r} is not one of {tuple(DEFAULT_SYSTEM_PROMPTS)}.")
    system = DEFAULT_SYSTEM_PROMPTS[mode] if system_prompt is None else system_prompt
    images: list[Image.Image] = []
    content: list[dict[str, Any]] = []
    if mode == "closed":
        if observation.preview is not None:
            images.append(observation.preview.convert("RGB"))
            content.append({"type": "image"})
        text = _closed_loop_text(observation)
    elif mode == "oneshot":
        text = _one_shot_text(observation)
    else:
        text = _a_priori_text(observation)
    content.append({"type": "text", "text": text})
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": content},
    ]
    return Chat(messages=messages, images=images)
