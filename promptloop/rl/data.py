"""Query sources for training and evaluation, and a resumable, seeded stream over them."""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path


def load_queries(source: str, column: str = "prompt") -> list[str]:
    """Queries from a .txt (one per line), .jsonl / .csv (``column``) file, or ``hf:DATASET[:SPLIT]``.

    Blank entries are dropped. Errors name the file, the line and the fix.
    """
    if source.startswith("hf:"):
        return _load_hf(source[3:], column)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source!r} does not exist (give a .txt, .jsonl or .csv file, or "
                                "'hf:DATASET[:SPLIT]').")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {source!r} is not UTF-8 text: {e}") from e
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        queries = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}:{n}: not valid JSON ({e})") from e
            if not isinstance(record, dict) or column not in record:
                raise ValueError(f"{source}:{n}: no {column!r} field (set data.column to the field holding the "
                                 "query)")
            if not isinstance(record[column], str):
                raise ValueError(f"{source}:{n}: field {column!r} holds {type(record[column]).__name__} "
                                 f"{record[column]!r}, not the query text")
            queries.append(record[column])
    elif suffix == ".csv":
        try:
            reader = csv.DictReader(text.splitlines())
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise ValueError(f"{source}: no column {column!r} in header {reader.fieldnames} (set data.column)")
            queries = [row[column] or "" for row in reader]
        except csv.Error as e:  # e.g. a field over csv.field_size_limit()
            raise ValueError(f"{source}:{reader.line_num}: not valid CSV ({e})") from e
    else:
        queries = text.splitlines()
    queries = [" ".join(q.split()) for q in queries]
    queries = [q for q in queries if q]
    if not queries:
        raise ValueError(f"prompt file {source!r} holds no query")
    return queries


def _load_hf(spec: str, column: str) -> list[str]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hf: prompt sources need the datasets package: pip install 'promptloop[datasets]'") from e
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown name, ...: say what to do instead
        raise RuntimeError(f"could not load dataset {name!r} (split {split or 'train'!r}): {e}. Offline? Export "
                           "the queries to a .txt/.jsonl/.csv file and point the prompt setting at it (data.prompts "
                           "for train, prompts.source for eval).") from e
    if column not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {column!r}; columns: {ds.column_names}")
    return [q for q in (" ".join(str(x).split()) for x in ds[column]) if q]


@dataclass
class QueryStream:
    """Endless seeded pass over ``queries``: reshuffled every epoch; ``position`` restores the exact place."""

    queries: list[str]
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    index: int = 0

    def _order(self) -> list[int]:
        order = list(range(len(self.queries)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[str]:
        out = []
        order = self._order()
        while len(out) < n:
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            out.append(self.queries[order[self.index]])
            self.index += 1
        return out

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.index = int(position["epoch"]), int(position["index"])
