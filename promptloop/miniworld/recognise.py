"""A programmatic recogniser of mini-world scenes: reads the six attributes back from an image.

Background: the median of the border ring, nearest background colour. Object: the largest connected blob of pixels
far from the background; its colour is the nearest object colour to the blob's core. Each pixel's coverage is its
projection between the background and object colours; the coverage map is compared with a clean render of each
shape with the blob's area and centroid. The closest gives the shape, its fitted half-width the size (nearest on a
log scale) and its centre the row and column.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .domain import (ATTRIBUTES, BACKGROUNDS, COLOURS, COLUMNS, GRID_CENTRES, REFERENCE_SIZE, ROWS, SHAPES, SIZES,
                     Scene, parse_caption)

_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float32)
_OBJ_NAMES = tuple(COLOURS)
_OBJ_RGB = np.array([COLOURS[n] for n in _OBJ_NAMES], dtype=np.float32)
_MIN_OBJECT_DISTANCE = 40.0  # RGB distance from the background above which a pixel may belong to the object
_TEMPLATE_SUPERSAMPLE = 8
_AREA_PER_HALF_SQUARED = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
_SIZE_NAMES = tuple(SIZES)


def _nearest(palette: np.ndarray, rgb: np.ndarray) -> int:
    return int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        component, queue = [], deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            component.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if len(component) > len(best):
            best = component
    out = np.zeros_like(mask)
    ys, xs = zip(*best)
    out[list(ys), list(xs)] = True
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def _centroid_offset(shape: str, half: float) -> float:
    """Vertical offset of a shape's centroid from its drawing centre (the triangle's is lower)."""
    return half / 3.0 if shape == "triangle" else 0.0


def shape_coverage(shape: str, half: float, cx: float, cy: float, size: int = REFERENCE_SIZE) -> np.ndarray:
    """Fractional pixel coverage of a shape drawn like ``domain.render`` at centre (cx, cy) in 32-px units."""
    big = size * _TEMPLATE_SUPERSAMPLE
    unit = big / REFERENCE_SIZE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, h = cx * unit, cy * unit, half * unit
    if shape == "circle":
        draw.ellipse((x - h, y - h, x + h, y + h), fill=255)
    elif shape == "square":
        draw.rectangle((x - h, y - h, x + h, y + h), fill=255)
    else:
        draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=255)
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


@dataclass(frozen=True)
class Recognition:
    """What the recogniser read from one image; object attributes are None when no object was found."""

    attributes: dict[str, str | None]
    """{attribute: value or None} for every attribute in ``domain.ATTRIBUTES``."""
    fit_error: float
    """Mean squared difference between the coverage map and the best template (0 on clean renders)."""


def recognise_detailed(image: Image.Image) -> Recognition:
    """Read all attributes of ``image`` (any size; it is resized to 32 px)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"recognise expects a PIL.Image, got {type(image).__name__}.")
    image = image.convert("RGB")
    if image.size != (REFERENCE_SIZE, REFERENCE_SIZE):
        image = image.resize((REFERENCE_SIZE, REFERENCE_SIZE), Image.BOX)
    pixels = np.asarray(image, dtype=np.float32)
    ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                           pixels[2:-2, :2].reshape(-1, 3), pixels[2:-2, -2:].reshape(-1, 3)])
    bg_rgb = np.median(ring, axis=0)
    attributes: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    attributes["background"] = _BG_NAMES[_nearest(_BG_RGB, bg_rgb)]

    distance = np.linalg.norm(pixels - bg_rgb, axis=-1)
    candidates = distance > _MIN_OBJECT_DISTANCE
    if not candidates.any():
        return Recognition(attributes, float("inf"))
    blob = _largest_component(candidates)
    core = blob & (distance >= 0.75 * distance[blob].max())
    obj_rgb = np.median(pixels[core], axis=0)
    attributes["colour"] = _OBJ_NAMES[_nearest(_OBJ_RGB, obj_rgb)]

    direction = obj_rgb - bg_rgb
    coverage = np.clip((pixels - bg_rgb) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    coverage = coverage * _dilate(blob)
    total = float(coverage.sum())
    ys, xs = np.mgrid[0:REFERENCE_SIZE, 0:REFERENCE_SIZE].astype(np.float32) + 0.5
    cx, cy = float((coverage * xs).sum() / total), float((coverage * ys).sum() / total)

    best = (float("inf"), "", 0.0, 0.0)
    for shape in SHAPES:
        half = (total / _AREA_PER_HALF_SQUARED[shape]) ** 0.5  # fitted, so that shrunken squares stay squares
        centre_y = cy - _centroid_offset(shape, half)
        error = float(((shape_coverage(shape, half, cx, centre_y) - coverage) ** 2).mean())
        if error < best[0]:
            best = (error, shape, half, centre_y)
    error, attributes["shape"], half, centre_y = best
    attributes["size"] = _SIZE_NAMES[int(np.argmin([abs(np.log(half / h)) for h in SIZES.values()]))]
    attributes["column"] = COLUMNS[int(np.argmin([abs(cx - c) for c in GRID_CENTRES]))]
    attributes["row"] = ROWS[int(np.argmin([abs(centre_y - c) for c in GRID_CENTRES]))]
    return Recognition(attributes, error)


def recognise(image: Image.Image) -> dict[str, str | None]:
    """{attribute: value} read from ``image``; object attributes are None when no object is visible."""
    return recognise_detailed(image).attributes


def _targets(target) -> dict[str, str]:
    if isinstance(target, Scene):
        return target.as_dict()
    if isinstance(target, str):
        return parse_caption(target)
    if isinstance(target, dict):
        return dict(target)
    raise TypeError(f"A target must be a Scene, a caption string or an {{attribute: value}} dict, got {type(target)}.")


def attribute_accuracy(images, targets) -> dict[str, dict]:
    """Per-attribute accuracy over the attributes each target names.

    ``targets`` holds, per image, a ``Scene`` (all attributes count), a caption (only the attributes it names count)
    or an {attribute: value} dict. Returns {attribute: {"accuracy", "count", "by_value"}} for each attribute named
    at least once, where "by_value" holds {"accuracy", "count"} for each value asked for (a backbone that draws most
    circles as squares shows it there, not in the shape average), plus "all_named": the fraction of images with a
    non-empty target whose named attributes are all right.
    """
    images, targets = list(images), list(targets)
    if len(images) != len(targets):
        raise ValueError(f"Got {len(images)} images but {len(targets)} targets; pass one target per image.")
    tallies: dict[str, dict[str, list[int]]] = {name: {} for name in ATTRIBUTES}
    all_right, with_target = 0, 0
    for image, target in zip(images, targets):
        wanted = _targets(target)
        if not wanted:
            continue
        seen = recognise(image)
        hits = [seen[name] == value for name, value in wanted.items()]
        for (name, value), hit in zip(wanted.items(), hits):
            tally = tallies[name].setdefault(value, [0, 0])
            tally[0] += int(hit)
            tally[1] += 1
        with_target += 1
        all_right += int(all(hits))
    result = {}
    for name in ATTRIBUTES:
        if tallies[name]:
            right, count = (sum(column) for column in zip(*tallies[name].values()))
            result[name] = {"accuracy": right / count, "count": count,
                            "by_value": {value: {"accuracy": hit / n, "count": n}
                                         for value, (hit, n) in sorted(tallies[name].items())}}
    if with_target:
        result["all_named"] = {"accuracy": all_right / with_target, "count": with_target}
    return result
