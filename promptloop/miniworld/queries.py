"""The mini world's user queries, split into training and held-out sets that never share a query.

A query is a caption naming some attributes of a random scene (``domain.sample_caption``). Which split a query
belongs to is a property of the query itself: the CRC-32 of its canonical form (words in vocabulary order) modulo
``SPLIT_MODULUS``; one residue in five is held out. So a held-out query is never seen in training, whatever the
number of queries drawn, and both sets are reproducible from their seeds.

Registered prompt sets (``promptloop.eval.load_prompt_set``): ``miniworld:heldout`` (``NUM_HELDOUT`` distinct
held-out queries) and ``miniworld:train`` (``NUM_TRAIN`` training queries, repeats allowed as drawn).
"""
from __future__ import annotations

import random
import zlib
from typing import Literal

from promptloop.eval.prompt_sets import register_prompt_set

from .domain import VOCABULARY, sample_caption, sample_scene

SPLIT_MODULUS = 5
HELDOUT_RESIDUE = 0
TRAIN_SEED = 4242
HELDOUT_SEED = 20261130
NUM_TRAIN = 2000
NUM_HELDOUT = 128
QUERY_P_NAME = 0.5
"""Each attribute is named with this probability (at most 5): users leave about half of a scene unsaid."""

Split = Literal["train", "heldout"]


def canonical_query(text: str) -> str:
    """The query's domain words in vocabulary order (word order carries no meaning in the mini world)."""
    words = set(text.lower().split())
    return " ".join(word for word in VOCABULARY if word in words)


def query_split(text: str) -> Split:
    """``"heldout"`` for one query in ``SPLIT_MODULUS`` (by the CRC-32 of its canonical form), else ``"train"``."""
    residue = zlib.crc32(canonical_query(text).encode("utf-8")) % SPLIT_MODULUS
    return "heldout" if residue == HELDOUT_RESIDUE else "train"


def sample_queries(split: Split, n: int, seed: int, p_name: float = QUERY_P_NAME, distinct: bool = False) -> list[str]:
    """``n`` non-empty queries of ``split`` drawn from the caption stream of ``seed`` (``distinct``: no repeats)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    rng = random.Random(seed)
    queries: list[str] = []
    seen: set[str] = set()
    while len(queries) < n:
        text = sample_caption(sample_scene(rng), rng, p_name=p_name)
        if not text or query_split(text) != split or (distinct and text in seen):
            continue
        seen.add(text)
        queries.append(text)
    return queries


def training_queries(n: int = NUM_TRAIN) -> list[str]:
    """The training queries (``miniworld:train``): the first ``n`` of the training stream."""
    return sample_queries("train", n, TRAIN_SEED)


def heldout_queries(n: int = NUM_HELDOUT) -> list[str]:
    """The held-out evaluation queries (``miniworld:heldout``): the first ``n`` distinct ones."""
    return sample_queries("heldout", n, HELDOUT_SEED, distinct=True)


register_prompt_set("miniworld:train", training_queries)
register_prompt_set("miniworld:heldout", heldout_queries)
