"""The mini world: procedural one-object scenes, a deterministic renderer and captions of varying detail.

A scene has six attributes (colour, shape, size, row, column, background: 6 x 3 x 2 x 3 x 3 x 4 = 1296 scenes).
Every attribute value is named by exactly one domain word and the value sets are disjoint, so a caption is a bag of
words whose order carries no meaning ("big red circle top left white"). A caption names only some attributes; the
others are left to the sampler's noise. The text budget (``MAX_CAPTION_WORDS``) is smaller than the number of
attributes, so one prompt can never pin down a whole scene.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, fields

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 3.0, "big": 5.5}  # half-width in pixels at 32 px
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "center", "right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "brown": (115, 70, 35),
}
GRID_CENTRES: tuple[float, ...] = (6.0, 16.0, 26.0)  # cell centres at 32 px, for rows and columns alike
REFERENCE_SIZE = 32

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "row": ROWS,
    "column": COLUMNS,
    "background": tuple(BACKGROUNDS),
}
"""Each attribute's values in canonical order; the canonical caption order is this dict's order."""
ATTRIBUTES: tuple[str, ...] = tuple(ATTRIBUTE_VALUES)
VOCABULARY: tuple[str, ...] = tuple(word for values in ATTRIBUTE_VALUES.values() for word in values)
"""The domain words: one per attribute value, all distinct."""
WORD_TO_ATTRIBUTE: dict[str, str] = {w: a for a, values in ATTRIBUTE_VALUES.items() for w in values}
MAX_CAPTION_WORDS = 5
"""The text budget: a prompt holds at most this many words (the tokenizer length is this plus BOS and EOS)."""
NUM_SCENES = 1
for _values in ATTRIBUTE_VALUES.values():
    NUM_SCENES *= len(_values)


@dataclass(frozen=True)
class Scene:
    """One object on a plain background."""

    colour: str
    """Object colour, a key of ``COLOURS``."""
    shape: str
    """One of ``SHAPES``."""
    size: str
    """A key of ``SIZES``."""
    row: str
    """Vertical grid position, one of ``ROWS``."""
    column: str
    """Horizontal grid position, one of ``COLUMNS``."""
    background: str
    """Background colour, a key of ``BACKGROUNDS``."""

    def __post_init__(self):
        for name in ATTRIBUTES:
            value = getattr(self, name)
            if value not in ATTRIBUTE_VALUES[name]:
                raise ValueError(f"Scene.{name}={value!r} is not one of {ATTRIBUTE_VALUES[name]}.")

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def index(self) -> int:
        """Position of this scene in ``all_scenes()``."""
        i = 0
        for name in ATTRIBUTES:
            values = ATTRIBUTE_VALUES[name]
            i = i * len(values) + values.index(getattr(self, name))
        return i


def all_scenes() -> list[Scene]:
    """All ``NUM_SCENES`` scenes, in ``Scene.index`` order."""
    scenes = [{}]
    for name in ATTRIBUTES:
        scenes = [{**s, name: v} for s in scenes for v in ATTRIBUTE_VALUES[name]]
    return [Scene(**s) for s in scenes]


def sample_scene(rng: random.Random) -> Scene:
    """A scene with every attribute drawn uniformly."""
    return Scene(**{name: rng.choice(values) for name, values in ATTRIBUTE_VALUES.items()})


@dataclass(frozen=True)
class Jitter:
    """Small geometric variation used for training data; the zero jitter gives the clean render."""

    dx: float = 0.0
    """Horizontal offset in pixels at 32 px."""
    dy: float = 0.0
    """Vertical offset in pixels at 32 px."""
    scale: float = 1.0
    """Multiplier on the object's half-width."""


def sample_jitter(rng: random.Random, max_shift: float = 1.5, max_scale: float = 0.12) -> Jitter:
    return Jitter(rng.uniform(-max_shift, max_shift), rng.uniform(-max_shift, max_shift),
                  1.0 + rng.uniform(-max_scale, max_scale))


_SUPERSAMPLE = 8


def render(scene: Scene, size: int = REFERENCE_SIZE, jitter: Jitter = Jitter()) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` x ``size`` pixels (deterministic, anti-aliased)."""
    if size < 16:
        raise ValueError(f"render size must be at least 16 pixels, got {size}.")
    big = size * _SUPERSAMPLE
    unit = big / REFERENCE_SIZE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cx = (GRID_CENTRES[COLUMNS.index(scene.column)] + jitter.dx) * unit
    cy = (GRID_CENTRES[ROWS.index(scene.row)] + jitter.dy) * unit
    h = SIZES[scene.size] * jitter.scale * unit
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    return image.resize((size, size), Image.BOX)


def caption(scene: Scene, named_attributes) -> str:
    """The words naming ``named_attributes`` of ``scene``, in canonical order ("" when none is named)."""
    named = set(named_attributes)
    unknown = named - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"Unknown attributes {sorted(unknown)}; choose from {ATTRIBUTES}.")
    return " ".join(getattr(scene, name) for name in ATTRIBUTES if name in named)


def sample_named_attributes(rng: random.Random, p_name: float = 0.6,
                            max_words: int = MAX_CAPTION_WORDS) -> list[str]:
    """Each attribute named with probability ``p_name``; if more than ``max_words`` are, a random subset is kept."""
    if not 0.0 <= p_name <= 1.0:
        raise ValueError(f"p_name must be in [0, 1], got {p_name}.")
    named = [name for name in ATTRIBUTES if rng.random() < p_name]
    if len(named) > max_words:
        keep = set(rng.sample(named, max_words))
        named = [name for name in named if name in keep]
    return named


def sample_caption(scene: Scene, rng: random.Random, p_name: float = 0.6,
                   max_words: int = MAX_CAPTION_WORDS) -> str:
    """A caption of ``scene`` naming a random subset of its attributes (see ``sample_named_attributes``)."""
    return caption(scene, sample_named_attributes(rng, p_name, max_words))


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption names: {attribute: value} for each domain word in ``text`` (last one wins)."""
    named: dict[str, str] = {}
    for word in text.lower().replace(",", " ").split():
        if word in WORD_TO_ATTRIBUTE:
            named[WORD_TO_ATTRIBUTE[word]] = word
    return named
