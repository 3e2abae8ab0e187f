"""Pictures of what happened: trajectory strips (x0 previews with the prompt written at each step)."""
from __future__ import annotations

import textwrap
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from .backbones.types import Trajectory

_BG = (255, 255, 255)
_FG = (20, 20, 20)
_MUTED = (110, 110, 110)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _caption_block(lines: Sequence[tuple[str, tuple[int, int, int]]], width: int, font_size: int) -> Image.Image:
    font = _font(font_size)
    chars = max(8, int(width / (font_size * 0.55)))
    wrapped: list[tuple[str, tuple[int, int, int]]] = []
    for text, colour in lines:
        for line in textwrap.wrap(text, chars) or [""]:
            wrapped.append((line, colour))
    line_h = font_size + 3
    block = Image.new("RGB", (width, 6 + line_h * len(wrapped)), _BG)
    draw = ImageDraw.Draw(block)
    for i, (line, colour) in enumerate(wrapped):
        draw.text((3, 3 + i * line_h), line, fill=colour, font=font)
    return block


def trajectory_strip(
    trajectory: Trajectory, final_image: Optional[Image.Image] = None, tile: int = 192, font_size: int = 11
) -> Image.Image:
    """One row per trajectory: a tile for each decision step (the x0 preview the refiner saw, the step, the
    prompt it wrote) and a last tile with the final image and the prompt in force at the end. The query is written
    above."""
    columns: list[tuple[Optional[Image.Image], list[tuple[str, tuple[int, int, int]]]]] = []
    for k, step in enumerate(trajectory.decision_steps):
        prompt = trajectory.prompts[k + 1]
        mark = " [cut]" if trajectory.truncated[k + 1] else ""
        columns.append((trajectory.previews[k] if k < len(trajectory.previews) else None,
                        [(f"step {step}/{trajectory.num_steps}", _MUTED), (prompt + mark, _FG)]))
    columns.append((final_image, [("final", _MUTED), (f"final prompt: {trajectory.prompts[-1]}", _FG)]))

    captions = [_caption_block(lines, tile, font_size) for _, lines in columns]
    cap_h = max(c.height for c in captions)
    header = _caption_block([(f"query: {trajectory.query}   (seed {trajectory.seed})", _FG)],
                            tile * len(columns), font_size + 1)
    strip = Image.new("RGB", (tile * len(columns), header.height + tile + cap_h), _BG)
    strip.paste(header, (0, 0))
    for j, ((image, _), caption) in enumerate(zip(columns, captions)):
        x = j * tile
        if image is None:
            ImageDraw.Draw(strip).rectangle([x + 2, header.height + 2, x + tile - 3, header.height + tile - 3],
                                            outline=_MUTED)
            ImageDraw.Draw(strip).text((x + 8, header.height + tile // 2), "no preview", fill=_MUTED,
                                       font=_font(font_size))
        else:
            strip.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC), (x, header.height))
        strip.paste(caption, (x, header.height + tile))
    return strip


def stack_rows(rows: Sequence[Image.Image], gap: int = 6) -> Image.Image:
    """Stack images vertically (e.g. several trajectory strips) on a white background."""
    width = max(r.width for r in rows)
    out = Image.new("RGB", (width, sum(r.height for r in rows) + gap * (len(rows) - 1)), _BG)
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + gap
    return out
