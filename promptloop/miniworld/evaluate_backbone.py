"""Does a mini-world backbone follow its captions? Per-attribute accuracy of sampled images, read by the recogniser.

    python -m promptloop.miniworld.evaluate_backbone DIR [--device cuda] [--captions 64] [--seeds 8]

DIR is a saved backbone A (StableDiffusionPipeline) or B (StableDiffusion3Pipeline) folder.

Only the attributes each caption names are scored. Held-out captions come from a fixed RNG stream that training
never uses; seeds are fixed, so two backbones are compared on the same noise.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from PIL import Image, ImageDraw

from promptloop.backbones.stable_diffusion import absent_components, saved_model_index

from .domain import ATTRIBUTE_VALUES, ATTRIBUTES, sample_caption, sample_scene
from .recognise import attribute_accuracy

EVAL_CAPTION_SEED = 20261129


@dataclass
class EvalSettings:
    """How a backbone is sampled for evaluation."""

    captions: int = 64
    """Number of held-out captions (none empty)."""
    seeds: int = 8
    """Seeds per caption (0 .. seeds - 1)."""
    steps: int = 20
    """Sampling steps."""
    guidance_scales: list[float] = field(default_factory=lambda: [4.0])
    """Classifier-free guidance scales to evaluate, each separately."""
    batch_size: int = 256
    """Images per pipeline call."""


def held_out_captions(n: int, p_name: float = 0.6) -> list[str]:
    """``n`` non-empty captions from the evaluation RNG stream."""
    rng = random.Random(EVAL_CAPTION_SEED)
    captions: list[str] = []
    while len(captions) < n:
        text = sample_caption(sample_scene(rng), rng, p_name=p_name)
        if text:
            captions.append(text)
    return captions


@torch.no_grad()
def sample_images(pipe: DiffusionPipeline, prompts: list[str], seeds: list[int], steps: int,
                  guidance_scale: float, batch_size: int = 256) -> list[Image.Image]:
    """One image per (prompt, seed) pair, with CPU generators so results do not depend on the device."""
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt.")
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(s) for s in seeds[chunk]]
        images += pipe(prompts[chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=generators, output_type="pil").images
    return images


def evaluate_pipeline(pipe: DiffusionPipeline, settings: EvalSettings) -> dict:
    """{"settings", "chance", "by_guidance": {scale: attribute_accuracy(...)}} over held-out captions x seeds."""
    captions = held_out_captions(settings.captions)
    prompts = [c for c in captions for _ in range(settings.seeds)]
    seeds = [s for _ in captions for s in range(settings.seeds)]
    by_guidance = {}
    for scale in settings.guidance_scales:
        images = sample_images(pipe, prompts, seeds, settings.steps, scale, settings.batch_size)
        by_guidance[str(scale)] = attribute_accuracy(images, prompts)
    return {"settings": asdict(settings), "chance": {a: 1 / len(v) for a, v in ATTRIBUTE_VALUES.items()},
            "by_guidance": by_guidance}


def weakest_values(accuracy: dict, k: int = 3) -> list[tuple[str, str, float, int]]:
    """Up to ``k`` (attribute, value, accuracy, images) below 1.0, lowest first, in one ``attribute_accuracy``
    result."""
    rows = [(name, value, v["accuracy"], v["count"])
            for name, a in accuracy.items() for value, v in a.get("by_value", {}).items() if v["accuracy"] < 1.0]
    return sorted(rows, key=lambda row: (row[2], -row[3]))[:k]


def format_table(result: dict) -> str:
    """A markdown table: one row per guidance scale, one column per attribute (accuracy, chance in brackets); then,
    per guidance scale, the named values drawn least often (an attribute's average can hide one value it misses)."""
    columns = list(ATTRIBUTES) + ["all_named"]
    chance = result["chance"]
    head = "| guidance | " + " | ".join(
        f"{c} ({chance[c]:.2f})" if c in chance else c for c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for scale, accuracy in result["by_guidance"].items():
        cells = [f"{accuracy[c]['accuracy']:.2f}" if c in accuracy else "-" for c in columns]
        lines.append(f"| {scale} | " + " | ".join(cells) + " |")
    lines.append("")
    for scale, accuracy in result["by_guidance"].items():
        weakest = ", ".join(f"{name} {value} {acc:.2f} ({n} images)"
                            for name, value, acc, n in weakest_values(accuracy))
        lines.append(f"Weakest named values at guidance {scale}: {weakest or 'none below 1.00'}.")
    return "\n".join(lines)


def sample_grid(pipe: DiffusionPipeline, captions: list[str], seeds: int, steps: int,
                guidance_scale: float, scale: int = 2) -> Image.Image:
    """Rows are captions (written on the left), columns are seeds 0 .. seeds - 1."""
    prompts = [c for c in captions for _ in range(seeds)]
    images = sample_images(pipe, prompts, [s for _ in captions for s in range(seeds)], steps, guidance_scale)
    side = images[0].width * scale
    label = 200
    grid = Image.new("RGB", (label + seeds * (side + 2), len(captions) * (side + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, text in enumerate(captions):
        draw.text((4, r * (side + 2) + side // 2 - 6), text, fill="black")
        for c in range(seeds):
            image = images[r * seeds + c].resize((side, side), Image.NEAREST)
            grid.paste(image, (label + c * (side + 2), r * (side + 2)))
    return grid


PIPELINE_CLASSES = {"StableDiffusionPipeline": StableDiffusionPipeline,
                    "StableDiffusion3Pipeline": StableDiffusion3Pipeline}
"""The pipeline classes of the mini world's backbones (A: SD, B: SD3), by the name ``model_index.json`` gives."""


def load_pipeline(pipeline_dir: str | Path, device: str = "cpu") -> DiffusionPipeline:
    """Load a saved mini-world backbone with the stock loader of the class its ``model_index.json`` names.

    Components saved as absent (``[null, null]``: A's safety checker, B's T5) are passed as None, which diffusers
    requires for a non-optional component such as SD3's ``text_encoder_3``.
    """
    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise ValueError(f"{pipeline_dir} holds no model_index.json; pass a folder written by save_pretrained.")
    index = saved_model_index(pipeline_dir)
    if index["_class_name"] not in PIPELINE_CLASSES:
        raise ValueError(f"{pipeline_dir} holds a {index['_class_name']}; mini-world backbones are "
                         f"{sorted(PIPELINE_CLASSES)}.")
    absent = absent_components(index)
    pipe = PIPELINE_CLASSES[index["_class_name"]].from_pretrained(pipeline_dir, **absent).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate_dir(pipeline_dir: str | Path, settings: EvalSettings, device: str = "cpu",
                 json_path: str | Path | None = None, grid_path: str | Path | None = None) -> dict:
    """Load a saved pipeline (:func:`load_pipeline`), evaluate it, print and write results."""
    pipe = load_pipeline(pipeline_dir, device)
    result = evaluate_pipeline(pipe, settings)
    print(format_table(result), flush=True)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if grid_path is not None:
        sample_grid(pipe, held_out_captions(8), min(settings.seeds, 8), settings.steps,
                    settings.guidance_scales[0]).save(grid_path)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline_dir",
                        help="folder written by save_pretrained (StableDiffusionPipeline or StableDiffusion3Pipeline)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--captions", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    parser.add_argument("--json", default=None, help="where to write the results (default: eval.json beside DIR)")
    parser.add_argument("--grid", default=None, help="also save a sample grid PNG here")
    args = parser.parse_args(argv)
    settings = EvalSettings(captions=args.captions, seeds=args.seeds, steps=args.steps,
                            guidance_scales=args.guidance)
    json_path = args.json or Path(args.pipeline_dir).resolve().parent / "eval.json"
    return evaluate_dir(args.pipeline_dir, settings, args.device, json_path, args.grid)


if __name__ == "__main__":
    main()
