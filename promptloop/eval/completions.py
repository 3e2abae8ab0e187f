"""What a GRPO run's policy did, read from its ``completions.jsonl`` (``logging.log_completions``).

    python -m promptloop.eval.completions RUN_DIR_OR_FILE [--window 50] [--top 5] [--min-count 30] [--json OUT]

Two tables:

- **over training**, per window of steps: the mean training reward, the share of final prompts that keep every word
  of the query, and the words the policy most often adds to it (share of final prompts);
- **edit attribution**: every trajectory is scored against its own group (same step and query, G trajectories;
  with ``grpo.shared_noise`` they share the starting noise, so the prompts are the only difference), by its centred
  reward ``r - mean(group)``. Each word that enters the prompt and is not in the query is counted once at the action
  that added it, split into the first action (the initial rewrite when the run had one) and later actions; the
  table gives the mean centred reward of the trajectories with that edit and its 95% interval. Rows for a dropped
  query word and for trajectories whose prompt never changed come first.

A positive mean says trajectories with that edit scored above their group on average; it is a correlation inside
groups, not a controlled effect (an edit travels with the other edits of its trajectory).
"""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from .stats import Interval, clustered_ci

FIRST, LATER = "first action", "later actions"
DROPPED, UNCHANGED = "dropped a query word", "prompt never changed"


@dataclass(frozen=True)
class Completion:
    """One logged trajectory: ``prompts[0]`` was in force before the first action, ``prompts[k]`` after action k."""

    step: int
    query: str
    prompts: list[str]
    reward: float

    @property
    def keeps_query(self) -> bool:
        final = set(self.prompts[-1].split())
        return all(word in final for word in self.query.split())


def load_completions(path: str | Path) -> list[Completion]:
    """The trajectories of ``path`` (a ``completions.jsonl`` or the run folder holding it); rows whose reward was
    not finite are left out."""
    path = Path(path)
    if path.is_dir():
        path = path / "completions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; train with --logging.log_completions true to write it.")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                item = Completion(int(row["step"]), str(row["query"]), [str(p) for p in row["prompts"]],
                                  float("nan") if row["reward"] is None else float(row["reward"]))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number} is not a completions row ({err}).") from err
            if not item.prompts:
                raise ValueError(f"{path}:{number} has no prompts.")
            if math.isfinite(item.reward):
                rows.append(item)
    return rows


def centred_rewards(rows: list[Completion]) -> list[float]:
    """``r - mean(group)`` for each row, a group being the rows of one (step, query)."""
    groups: dict[tuple[int, str], list[float]] = defaultdict(list)
    for row in rows:
        groups[(row.step, row.query)].append(row.reward)
    means = {key: sum(values) / len(values) for key, values in groups.items()}
    return [row.reward - means[(row.step, row.query)] for row in rows]


def added_words(row: Completion) -> list[tuple[str, int]]:
    """(word, action) for each word not in the query that enters the prompt at action ``action`` (1-based)."""
    query = set(row.query.split())
    out = []
    for action in range(1, len(row.prompts)):
        before = set(row.prompts[action - 1].split())
        out += [(word, action) for word in dict.fromkeys(row.prompts[action].split())
                if word not in before and word not in query]
    return out


def edit_attribution(rows: list[Completion], confidence: float = 0.95) -> dict[tuple[str, str], Interval]:
    """{(edit, where): interval of the centred reward of the rows with that edit}; ``where`` is :data:`FIRST`,
    :data:`LATER` or ``""`` for the :data:`DROPPED` and :data:`UNCHANGED` rows. The rows of one group (step and
    query: same query and noise) are correlated, so the interval is cluster-robust over groups
    (:func:`~promptloop.eval.stats.clustered_ci`; ``samples`` counts the rows, ``n`` their groups). Sorted by count,
    largest first."""
    by_edit: dict[tuple[str, str], dict[tuple[tuple[int, str], int], float]] = defaultdict(dict)
    for index, (row, centred) in enumerate(zip(rows, centred_rewards(rows))):
        item = ((row.step, row.query), index)
        if not row.keeps_query:
            by_edit[(DROPPED, "")][item] = centred
        if all(prompt == row.prompts[0] for prompt in row.prompts) and row.prompts[0] == row.query:
            by_edit[(UNCHANGED, "")][item] = centred
        for key in dict.fromkeys((word, FIRST if action == 1 else LATER) for word, action in added_words(row)):
            by_edit[key][item] = centred
    stats = {key: clustered_ci(values, confidence) for key, values in by_edit.items()}
    return dict(sorted(stats.items(), key=lambda kv: (kv[0][1] != "", -kv[1].samples)))


@dataclass(frozen=True)
class Window:
    """Summary of the rows of steps ``first`` to ``last``."""

    first: int
    last: int
    trajectories: int
    mean_reward: float
    keeps_query: float
    top_added: list[tuple[str, float]]
    """(word, share of final prompts that hold it and whose query does not)."""


def windows(rows: list[Completion], size: int = 50, top: int = 5) -> list[Window]:
    """Rows grouped by training step into windows of ``size`` steps (1-``size``, ``size``+1-...)."""
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}.")
    by_window: dict[int, list[Completion]] = defaultdict(list)
    for row in rows:
        by_window[(row.step - 1) // size].append(row)
    out = []
    for index in sorted(by_window):
        members = by_window[index]
        counts: Counter[str] = Counter()
        for row in members:
            counts.update(set(row.prompts[-1].split()) - set(row.query.split()))
        n = len(members)
        out.append(Window(first=index * size + 1, last=(index + 1) * size, trajectories=n,
                          mean_reward=sum(r.reward for r in members) / n,
                          keeps_query=sum(r.keeps_query for r in members) / n,
                          top_added=[(word, count / n) for word, count in counts.most_common(top)]))
    return out


def render(rows: list[Completion], summary: list[Window], attribution: dict[tuple[str, str], Interval],
           min_count: int = 30) -> str:
    """The :func:`windows` ``summary`` and the :func:`edit_attribution` of ``rows`` as markdown tables; attribution
    rows with fewer than ``min_count`` trajectories are left out; intervals are over groups (step, query)."""
    lines = [f"{len(rows)} trajectories, steps {min(r.step for r in rows)}-{max(r.step for r in rows)}.", "",
             "| steps | trajectories | mean reward | keeps the query | most added words (share of final prompts) |",
             "|---|---|---|---|---|"]
    for w in summary:
        added = ", ".join(f"{word} {share:.2f}" for word, share in w.top_added) or "-"
        lines.append(f"| {w.first}-{w.last} | {w.trajectories} | {w.mean_reward:.3f} | {w.keeps_query:.2f} | {added} |")
    lines += ["", "Centred reward (r - group mean) of the trajectories with each edit, 95% interval over groups:", "",
              "| edit | where | trajectories | groups | mean centred reward |", "|---|---|---|---|---|"]
    for (edit, where), stat in attribution.items():
        if stat.samples >= min_count:
            lines.append(f"| {edit} | {where or '-'} | {stat.samples} | {stat.n} | {stat.mean:+.3f} ± "
                         f"{stat.half_width:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="run folder (logging.output_dir) or its completions.jsonl")
    parser.add_argument("--window", type=int, default=50, help="training steps per row of the first table")
    parser.add_argument("--top", type=int, default=5, help="added words listed per window")
    parser.add_argument("--min-count", type=int, default=30, help="fewest trajectories for an attribution row")
    parser.add_argument("--json", help="also write both tables as JSON here")
    args = parser.parse_args(argv)
    if args.window < 1 or args.top < 0 or args.min_count < 1:
        parser.error("--window and --min-count must be >= 1 and --top >= 0")
    rows = load_completions(args.path)
    if not rows:
        parser.error(f"{args.path} holds no trajectory with a finite reward")
    summary, attribution = windows(rows, args.window, args.top), edit_attribution(rows)
    text = render(rows, summary, attribution, args.min_count)
    print(text, end="")
    if args.json:
        payload = {"windows": [w.__dict__ for w in summary],
                   "attribution": [{"edit": e, "where": where, **s.as_dict()} for (e, where), s in attribution.items()]}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return text


if __name__ == "__main__":
    main()
