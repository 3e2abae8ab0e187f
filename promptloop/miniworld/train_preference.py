"""Train the mini world's learned preference reward on synthetic pairs labelled by the hidden gold rule.

    python -m promptloop.miniworld.train_preference --out promptloop/miniworld/assets/preference [--seed 0]

Data: a pool of rendered scenes (jittered and degraded like generated images: blur, noise, colour shift, washed-out
contrast; a few without any object), each read once by the gold rule. A pair is a query (a caption of one pool
image naming a random subset of its attributes) and two pool images, the second one satisfying the query with
probability ``p_consistent``. Its label is drawn from the Bradley-Terry model of the gold scores at temperature
``label_temperature``: label noise, so that the learned reward is an imperfect proxy. Loss: logistic loss on the
score difference. Agreement with gold is measured on pairs from a separately seeded pool and written to
``metrics.json`` next to the weights.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .degrade import degrade, sample_degradation
from .domain import ATTRIBUTE_VALUES, ATTRIBUTES, Scene, caption, render, sample_jitter, sample_named_attributes
from .gold import gold_score, read_scene
from .preference_model import PreferenceModel, PreferenceModelConfig
from .rewards import DEFAULT_PREFERENCE_DIR, to_pixel_tensor

METRICS_NAME = "metrics.json"


@dataclass
class PreferenceTrainingConfig:
    """Everything that defines a training run of the learned preference reward (with the seed, reproducible)."""

    seed: int = 0
    """Seeds the pools, the pairs, the label noise and the initial weights."""
    pool_size: int = 8000
    """Training images (rendered, degraded and read by the gold rule once)."""
    eval_pool_size: int = 2000
    """Held-out images for the agreement measurement (a different seed)."""
    eval_pairs: int = 8000
    """Held-out pairs for the agreement measurement."""
    steps: int = 1200
    """Optimizer steps."""
    batch_pairs: int = 128
    """Pairs per step."""
    lr: float = 3e-3
    """AdamW learning rate (cosine decay to 0)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    label_temperature: float = 0.35
    """Bradley-Terry temperature of the label noise: P(a preferred) = sigmoid((gold_a - gold_b) / T)."""
    p_consistent: float = 0.7
    """Probability that a pair's second image satisfies the query (else it is any pool image)."""
    max_degradation: float = 1.5
    """Each image's degradation strength is uniform in [0, max_degradation] (see ``degrade.sample_degradation``)."""
    p_empty: float = 0.04
    """Fraction of pool images with no object (background only)."""
    channels: tuple[int, ...] = (8, 16, 32, 32)
    """``PreferenceModelConfig.channels``."""
    embed_dim: int = 64
    """``PreferenceModelConfig.embed_dim``."""

    def __post_init__(self):
        self.channels = tuple(self.channels)
        for name in ("pool_size", "eval_pool_size", "eval_pairs", "steps", "batch_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.label_temperature <= 0:
            raise ValueError(f"label_temperature must be > 0, got {self.label_temperature}.")
        for name in ("p_consistent", "p_empty"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")


@dataclass
class ImagePool:
    """Rendered images with their true scenes and the gold rule's reading."""

    pixels: torch.Tensor
    """(N, 3, 32, 32) float in [0, 1]."""
    values: np.ndarray
    """(N, 6) true attribute value indices (``ATTRIBUTE_VALUES`` order)."""
    readings: list
    """The gold rule's ``SceneReading`` of each image."""
    strengths: np.ndarray
    """(N,) degradation strength of each image (0: clean render)."""


def build_pool(size: int, seed: int, max_degradation: float, p_empty: float) -> ImagePool:
    """``size`` random scenes, jittered and degraded, read by the gold rule (deterministic in ``seed``)."""
    rng = random.Random(seed)
    images, values, readings, strengths = [], [], [], []
    for i in range(size):
        scene = Scene(**{name: rng.choice(v) for name, v in ATTRIBUTE_VALUES.items()})
        image = render(scene, jitter=sample_jitter(rng))
        if rng.random() < p_empty:
            image.paste(image.getpixel((0, 0)), (0, 0, *image.size))
        strength = rng.uniform(0.0, max_degradation)
        image = degrade(image, sample_degradation(rng, strength), seed=seed * 1_000_003 + i)
        images.append(image)
        values.append([ATTRIBUTE_VALUES[name].index(getattr(scene, name)) for name in ATTRIBUTES])
        readings.append(read_scene(image))
        strengths.append(strength)
    return ImagePool(to_pixel_tensor(images), np.array(values), readings, np.array(strengths))


def sample_pairs(pool: ImagePool, count: int, rng: random.Random, p_consistent: float):
    """``count`` pairs: (queries, index a, index b, gold a, gold b, both satisfy the query)."""
    queries, first, second, gold_a, gold_b, consistent = [], [], [], [], [], []
    for _ in range(count):
        a = rng.randrange(len(pool.values))
        named = sample_named_attributes(rng, p_name=rng.uniform(0.2, 0.9))
        scene = Scene(**{name: ATTRIBUTE_VALUES[name][pool.values[a, k]] for k, name in enumerate(ATTRIBUTES)})
        query = caption(scene, named)
        columns = [ATTRIBUTES.index(name) for name in named]
        if rng.random() < p_consistent:
            matches = np.flatnonzero((pool.values[:, columns] == pool.values[a, columns]).all(axis=1))
            b = int(matches[rng.randrange(len(matches))])
        else:
            b = rng.randrange(len(pool.values))
        queries.append(query)
        first.append(a)
        second.append(b)
        gold_a.append(gold_score(pool.readings[a], query))
        gold_b.append(gold_score(pool.readings[b], query))
        consistent.append(gold_a[-1] > -1.0 and gold_b[-1] > -1.0 and
                          (pool.values[b, columns] == pool.values[a, columns]).all())
    return (queries, torch.tensor(first), torch.tensor(second), torch.tensor(gold_a), torch.tensor(gold_b),
            torch.tensor(consistent))


@torch.no_grad()
def score_pool(model: PreferenceModel, pool: ImagePool, indices: torch.Tensor, queries: list[str],
               chunk: int = 1024) -> torch.Tensor:
    scores = [model(pool.pixels[indices[i:i + chunk]], model.encode_queries(queries[i:i + chunk]))
              for i in range(0, len(queries), chunk)]
    return torch.cat(scores)


def agreement(model: PreferenceModel, pool: ImagePool, pairs, min_gap: float = 0.05) -> dict[str, float]:
    """Fraction of pairs (gold gap > ``min_gap``) that the model orders like gold: all pairs, pairs where both images
    satisfy the query (free choices only), and pairs of two lightly degraded images (strength < 0.5)."""
    queries, a, b, gold_a, gold_b, consistent = pairs
    model.eval()
    agree = (torch.sign(score_pool(model, pool, a, queries) - score_pool(model, pool, b, queries))
             == torch.sign(gold_a - gold_b)).float()
    decided = (gold_a - gold_b).abs() > min_gap
    light = torch.from_numpy((pool.strengths[a.numpy()] < 0.5) & (pool.strengths[b.numpy()] < 0.5))
    result = {}
    for name, mask in (("all", decided), ("free_choice", decided & consistent), ("light", decided & light)):
        result[f"agreement_{name}"] = float(agree[mask].mean())
        result[f"pairs_{name}"] = int(mask.sum())
    return result


@torch.no_grad()
def generated_agreement(model: PreferenceModel, pipeline_dir: str | Path, num_queries: int = 16, group: int = 8,
                        seed: int = 0, num_inference_steps: int = 20) -> dict[str, float]:
    """Agreement with gold within groups of images a backbone generates for one query (the comparisons GRPO makes):
    ``group`` seeds for each of ``num_queries`` held-out queries, every pair of a group with a gold gap > 0.05."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(seed + 30_000)
    agree, total = 0, 0
    for q in range(num_queries):
        scene = Scene(**{name: rng.choice(v) for name, v in ATTRIBUTE_VALUES.items()})
        query = caption(scene, sample_named_attributes(rng, p_name=0.5))
        generator = torch.Generator().manual_seed(seed + q)
        images = pipe([query] * group, num_inference_steps=num_inference_steps, generator=generator,
                      output_type="pil").images
        gold = torch.tensor([gold_score(read_scene(image), query) for image in images])
        scores = model.eval()(to_pixel_tensor(images), model.encode_queries([query] * group))
        for i in range(group):
            for j in range(i + 1, group):
                if abs(gold[i] - gold[j]) > 0.05:
                    total += 1
                    agree += int(torch.sign(scores[i] - scores[j]) == torch.sign(gold[i] - gold[j]))
    return {"agreement_generated": agree / max(total, 1), "pairs_generated": total}


def train(config: PreferenceTrainingConfig, log=print) -> tuple[PreferenceModel, dict]:
    """Train a preference model; returns it and its metrics (agreement with gold on held-out pairs, timings)."""
    start = time.time()
    torch.manual_seed(config.seed)
    pool = build_pool(config.pool_size, config.seed, config.max_degradation, config.p_empty)
    eval_pool = build_pool(config.eval_pool_size, config.seed + 10_000, config.max_degradation, config.p_empty)
    eval_pairs = sample_pairs(eval_pool, config.eval_pairs, random.Random(config.seed + 20_000), config.p_consistent)
    log(f"pools built in {time.time() - start:.0f} s ({config.pool_size} training, {config.eval_pool_size} held out)")

    model = PreferenceModel(PreferenceModelConfig(channels=config.channels, embed_dim=config.embed_dim))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / config.steps)))
    rng = random.Random(config.seed + 1)
    noise = torch.Generator().manual_seed(config.seed + 2)
    train_start = time.time()
    for step in range(1, config.steps + 1):
        model.train()
        queries, a, b, gold_a, gold_b, _ = sample_pairs(pool, config.batch_pairs, rng, config.p_consistent)
        labels = torch.bernoulli(torch.sigmoid((gold_a - gold_b) / config.label_temperature), generator=noise)
        words = model.encode_queries(queries)
        margin = model(pool.pixels[a], words) - model(pool.pixels[b], words)
        loss = F.binary_cross_entropy_with_logits(margin, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == config.steps:
            log(f"step {step}/{config.steps} loss {loss.item():.4f} "
                f"held-out agreement {agreement(model, eval_pool, eval_pairs)['agreement_all']:.3f} "
                f"({time.time() - train_start:.0f} s)")
    metrics = agreement(model, eval_pool, eval_pairs)
    # How often the noisy training labels themselves agree with gold (on the held-out pairs' gold gaps).
    _, _, _, gold_a, gold_b, _ = eval_pairs
    decided = (gold_a - gold_b).abs() > 0.05
    label_agreement = torch.sigmoid((gold_a - gold_b).abs() / config.label_temperature)[decided].mean()
    metrics.update(label_agreement=float(label_agreement), parameters=sum(p.numel() for p in model.parameters()),
                   seconds=round(time.time() - start, 1))
    return model.eval(), metrics


def _parse_args(argv) -> tuple[Path, PreferenceTrainingConfig, int, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PREFERENCE_DIR, help="Folder for the model and metrics.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--pipeline", type=Path, default=None,
                        help="Also measure agreement on images this saved mini-world pipeline generates.")
    defaults = PreferenceTrainingConfig()
    for f in fields(PreferenceTrainingConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=list(value))
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out, threads, pipeline = args.pop("out"), args.pop("threads"), args.pop("pipeline")
    return out, PreferenceTrainingConfig(**args), threads, pipeline


def main(argv=None) -> None:
    out, config, threads, pipeline = _parse_args(argv)
    torch.set_num_threads(threads)
    model, metrics = train(config)
    if pipeline is not None:
        metrics.update(generated_agreement(model, pipeline, seed=config.seed), pipeline=str(pipeline))
    model.save_pretrained(out)
    command = "python -m promptloop.miniworld.train_preference " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / METRICS_NAME).write_text(json.dumps({"command": command.strip(), "config": asdict(config),
                                                **metrics}, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
