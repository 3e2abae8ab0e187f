"""A static HTML report: the results table, image grids per method and trajectory strips.

One ``report.html`` that opens from disk in any browser (no server, no script, no external resource). Images are
linked by relative path (``images/``, ``strips/`` beside it) or, with ``embed_images``, inlined as base64 PNG.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from urllib.parse import quote

from .results import EvalResults, Sample, table_rows

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px; color: #1a1a1a;
       background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin-top: 22px; }
table.results { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
table.results th, table.results td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
table.results th:first-child, table.results td:first-child { text-align: left; font-weight: 600; }
table.results th { background: #f0f3f7; }
table.grid { border-collapse: collapse; margin: 6px 0 12px; }
table.grid td { vertical-align: top; padding: 4px; width: 150px; }
table.grid td.query { width: 200px; font-size: 12px; color: #333; }
table.grid img { width: 144px; height: 144px; object-fit: contain; image-rendering: pixelated;
                 border: 1px solid #bbb; background: #eee; }
.caption { font-size: 11px; color: #555; max-width: 144px; overflow-wrap: anywhere; }
img.strip { max-width: 100%; border: 1px solid #ccc; margin: 4px 0 10px; display: block; }
.note { color: #666; font-size: 12px; }
"""


class _Images:
    """``src`` attribute for an image file under the report folder: a relative URL or a base64 data URI."""

    def __init__(self, root: Path, embed: bool):
        self.root, self.embed = root, embed

    def src(self, relative: str) -> str:
        if not self.embed:
            return quote(relative)
        data = base64.b64encode((self.root / relative).read_bytes()).decode("ascii")
        return f"data:image/png;base64,{data}"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _grid(samples: list[Sample], seeds: list[int], num_prompts: int, images: _Images) -> str:
    """Rows: the first prompts; columns: seeds; each cell the image and the final prompt."""
    by_key = {(s.prompt_index, s.seed): s for s in samples}
    prompt_indices = sorted({s.prompt_index for s in samples})[:num_prompts]
    head = '<tr><td class="query"></td>' + "".join(f"<td class=caption>seed {_esc(seed)}</td>" for seed in seeds)
    rows = [head + "</tr>"]
    for p in prompt_indices:
        first = next(by_key[(p, seed)] for seed in seeds if (p, seed) in by_key)
        cells = [f'<td class="query">#{p}: {_esc(first.query)}</td>']
        for seed in seeds:
            s = by_key.get((p, seed))
            if s is None:
                cells.append("<td></td>")
                continue
            cells.append(f'<td><img src="{images.src(s.image)}" alt="{_esc(s.query)} (seed {seed})" '
                         f'title="{_esc(s.final_prompt)}"><div class="caption">{_esc(s.final_prompt)}</div></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return '<table class="grid">' + "".join(rows) + "</table>"


def render_report(results: EvalResults, root: str | Path, embed_images: bool = False, grid_prompts: int = 8) -> str:
    """The report's HTML; image paths in ``results`` are relative to ``root``."""
    root = Path(root)
    images = _Images(root, embed_images)
    level = f"{results.confidence:.0%}"
    kinds = {m["label"]: m for m in results.methods}
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>promptloop evaluation</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>promptloop evaluation</h1>",
        f'<p>Prompt set <code>{_esc(results.prompt_set["source"])}</code> '
        f'({results.prompt_set["num_prompts"]} prompts), seeds {_esc(results.seeds)}. Cells: mean ± half-width of '
        f"the {level} t-interval over prompts (each prompt's seeds together). Rewards are scored against the original "
        "query.</p>",
    ]
    for backbone in results.backbones:
        parts.append(f"<h2>Backbone {_esc(backbone)}</h2>")
        parts.append(_table(table_rows(results, backbone)))
        if results.baseline and results.paired:
            parts.append(f'<p class="note">Paired difference to <b>{_esc(results.baseline)}</b> '
                         f"(same prompt and seed), {level} CI:</p>")
            parts.append(_table(table_rows(results, backbone, paired=True)))
        for label in results.method_labels():
            samples = [s for s in results.samples if s.backbone == backbone and s.method == label]
            if not samples:
                continue
            method = kinds[label]
            first = " + initial rewrite" if method.get("initial_rewrite", False) else ""
            parts.append(f"<h3>{_esc(label)} <span class=note>(kind {_esc(method['kind'])}, "
                         f"N_R = {method['num_refinements']}{first}, policy {_esc(method['policy'])})</span></h3>")
            if grid_prompts:
                parts.append(_grid(samples, results.seeds, grid_prompts, images))
            strips = [s for s in samples if s.strip]
            if strips:
                note = (" The previews were recorded but withheld from the policy (feedback ablation)."
                        if method["kind"] == "closed-noimage" else "")
                parts.append(f'<p class="note">Trajectory strips: the x0 preview at each decision step and the '
                             f"prompt written there, then the final image.{note}</p>")
                parts += [f'<img class="strip" src="{images.src(s.strip)}" alt="trajectory of {_esc(s.query)}">'
                          for s in strips]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: EvalResults, out_dir: str | Path, embed_images: bool = False,
                 grid_prompts: int = 8) -> Path:
    """Write ``out_dir/report.html`` and return its path."""
    path = Path(out_dir) / "report.html"
    path.write_text(render_report(results, out_dir, embed_images, grid_prompts), encoding="utf-8")
    return path


__all__ = ["render_report", "write_report"]
