"""The mini world's hidden gold preference and query fidelity: scorers of rendered or generated images.

Both are used ONLY for evaluation (the learned preference reward, trained on pairs labelled by the gold rule, is
the training reward). Everything is read from pixels: the recogniser gives the attributes, and a few continuous
measurements (contrast, fitted size, centring, cleanliness) make the gold score graded, so that washed-out, blurred
or noisy images score lower than clean ones.

The gold rule: ``gold = aesthetic - VIOLATION_PENALTY * (number of query attributes the image gets wrong)`` with

| term | weight | value in [0, 1] |
|---|---|---|
| contrast | 1.0 | luminance difference of object and background (measured), / 255 |
| colour taste | 1.0 | 1 for a warm object on a dark background or a cool object on a light one, else 0 |
| size | 0.5 | fitted half-width, 0 at the small size and 1 at the big size (clipped) |
| centring | 0.5 | 1 at the image centre, 0 at a corner cell's centre or further |
| shape taste | 0.25 | circle 1, square 0.5, triangle 0 |
| cleanliness | 1.0 | ``exp(-fit_error / 0.01) * exp(-border_mad / 10)``: a clean shape on a flat background |

Warm colours: red, orange, yellow (cool: green, blue, purple); dark backgrounds: black, brown (light: white,
gray). ``fit_error`` is the recogniser's template-fit error, ``border_mad`` the median absolute deviation of the 2-px
border from its median colour.

An image without an object has aesthetic 0 and gets every object attribute the query names wrong. The penalty (2.0)
is larger than what any one attribute can add to the aesthetic (at most 1.7, colour or background), so gold never
prefers an image that contradicts the query: it only ranks the choices the query leaves free (and image quality).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .domain import GRID_CENTRES, REFERENCE_SIZE, SIZES, parse_caption
from .recognise import _dilate, _largest_component, recognise_detailed

VIOLATION_PENALTY = 2.0
"""Gold points lost per query attribute the image gets wrong."""
GOLD_WEIGHTS: dict[str, float] = {
    "contrast": 1.0, "colour_taste": 1.0, "size": 0.5, "centring": 0.5, "shape_taste": 0.25, "cleanliness": 1.0,
}
"""Weight of each aesthetic term (each term is in [0, 1])."""
WARM_COLOURS = ("red", "orange", "yellow")
DARK_BACKGROUNDS = ("black", "brown")
SHAPE_TASTE = {"circle": 1.0, "square": 0.5, "triangle": 0.0}
_AREA_PER_HALF_SQUARED = {"circle": np.pi, "square": 4.0, "triangle": 2.0}  # area of each shape / half-width^2
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_OBJECT_DISTANCE = 40.0  # RGB distance from the background above which a pixel may belong to the object
_FIT_ERROR_SCALE = 0.01
_BORDER_SPREAD_SCALE = 10.0
_CORNER_DISTANCE = float(np.hypot(GRID_CENTRES[1] - GRID_CENTRES[0], GRID_CENTRES[1] - GRID_CENTRES[0]))


@dataclass(frozen=True)
class SceneReading:
    """What the gold rule reads from one image."""

    attributes: dict[str, str | None]
    """The recogniser's reading (object attributes None when no object was found)."""
    terms: dict[str, float]
    """Each aesthetic term of ``GOLD_WEIGHTS`` in [0, 1] (all 0 without an object)."""

    @property
    def aesthetic(self) -> float:
        return float(sum(GOLD_WEIGHTS[name] * value for name, value in self.terms.items()))


def to_pil_images(images) -> list[Image.Image]:
    """PIL images from a list of PIL images or a float tensor (B, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        return [Image.fromarray(p.numpy()) for p in pixels]
    return [image.convert("RGB") for image in images]


def _border_spread(ring: np.ndarray, bg_rgb: np.ndarray) -> float:
    """Median absolute deviation of the border ring from its median colour (robust to an object touching it)."""
    return float(np.median(np.abs(ring - bg_rgb), axis=0).mean())


def read_scene(image: Image.Image) -> SceneReading:
    """Recognise ``image`` and measure the gold rule's aesthetic terms on it (resized to 32 px)."""
    image = image.convert("RGB")
    if image.size != (REFERENCE_SIZE, REFERENCE_SIZE):
        image = image.resize((REFERENCE_SIZE, REFERENCE_SIZE), Image.BOX)
    recognition = recognise_detailed(image)
    attributes = recognition.attributes
    if attributes["shape"] is None:
        return SceneReading(attributes, dict.fromkeys(GOLD_WEIGHTS, 0.0))
    pixels = np.asarray(image, dtype=np.float32)
    ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                           pixels[2:-2, :2].reshape(-1, 3), pixels[2:-2, -2:].reshape(-1, 3)])
    bg_rgb = np.median(ring, axis=0)
    distance = np.linalg.norm(pixels - bg_rgb, axis=-1)
    core = distance >= max(0.75 * float(distance.max()), _OBJECT_DISTANCE)
    obj_rgb = np.median(pixels[core], axis=0)
    direction = obj_rgb - bg_rgb
    coverage = np.clip((pixels - bg_rgb) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    coverage = coverage * _dilate(_largest_component(distance > _OBJECT_DISTANCE))  # the object, not noise
    area = float(coverage.sum())
    ys, xs = np.mgrid[0:REFERENCE_SIZE, 0:REFERENCE_SIZE].astype(np.float32) + 0.5
    cx, cy = float((coverage * xs).sum() / area), float((coverage * ys).sum() / area)

    small, big = SIZES["small"], SIZES["big"]
    half = (area / _AREA_PER_HALF_SQUARED[attributes["shape"]]) ** 0.5
    centre = REFERENCE_SIZE / 2
    warm = attributes["colour"] in WARM_COLOURS
    dark = attributes["background"] in DARK_BACKGROUNDS
    terms = {
        "contrast": float(abs((obj_rgb - bg_rgb) @ _LUMA)) / 255.0,
        "colour_taste": float(warm == dark),
        "size": float(np.clip((half - small) / (big - small), 0.0, 1.0)),
        "centring": float(np.clip(1.0 - np.hypot(cx - centre, cy - centre) / _CORNER_DISTANCE, 0.0, 1.0)),
        "shape_taste": SHAPE_TASTE[attributes["shape"]],
        "cleanliness": float(np.exp(-recognition.fit_error / _FIT_ERROR_SCALE)
                             * np.exp(-_border_spread(ring, bg_rgb) / _BORDER_SPREAD_SCALE)),
    }
    return SceneReading(attributes, terms)


def query_matches(attributes: dict[str, str | None], query: str) -> tuple[int, int]:
    """``(attributes the query names that the image shows, attributes the query names)``."""
    wanted = parse_caption(query)
    return sum(attributes[name] == value for name, value in wanted.items()), len(wanted)


def gold_score(reading: SceneReading, query: str) -> float:
    """The gold preference of an image (its reading) for ``query``; see the module docstring."""
    matched, named = query_matches(reading.attributes, query)
    return reading.aesthetic - VIOLATION_PENALTY * (named - matched)


def query_fidelity(attributes: dict[str, str | None], query: str) -> float:
    """Fraction of the attributes ``query`` names that the image shows (1.0 for a query naming none)."""
    matched, named = query_matches(attributes, query)
    return matched / named if named else 1.0


def gold_details(images, queries: Sequence[str]) -> list[dict[str, float]]:
    """Per image: ``gold``, ``fidelity``, ``aesthetic`` and each aesthetic term, scored against its query."""
    details = []
    for image, query in zip(to_pil_images(images), queries):
        reading = read_scene(image)
        details.append({"gold": gold_score(reading, query), "fidelity": query_fidelity(reading.attributes, query),
                        "aesthetic": reading.aesthetic, **reading.terms})
    return details


__all__ = ["GOLD_WEIGHTS", "SceneReading", "VIOLATION_PENALTY", "gold_details", "gold_score",
           "query_fidelity", "query_matches", "read_scene", "to_pil_images"]
