from pathlib import Path

import pytest

from promptloop.miniworld.domain import MAX_CAPTION_WORDS, parse_caption
from promptloop.miniworld.queries import (canonical_query, heldout_queries, query_split, sample_queries,
                                          training_queries)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_the_split_depends_on_the_words_not_their_order():
    assert canonical_query("left big red") == canonical_query("red big left") == "red big left"
    assert query_split("left big red") == query_split("red big left")


def test_training_and_heldout_queries_never_overlap_even_reordered():
    train = {canonical_query(q) for q in training_queries()}
    heldout = heldout_queries()
    assert len(set(heldout)) == len(heldout) == 128
    assert not train & {canonical_query(q) for q in heldout}
    assert all(query_split(q) == "heldout" for q in heldout)
    assert all(1 <= len(q.split()) <= MAX_CAPTION_WORDS and len(parse_caption(q)) == len(q.split()) for q in heldout)


def test_queries_are_reproducible_and_the_shipped_files_match():
    assert training_queries(50) == training_queries(50)
    assert (CONFIGS / "miniworld_train_queries.txt").read_text().split("\n")[:-1] == training_queries()
    assert (CONFIGS / "miniworld_heldout_queries.txt").read_text().split("\n")[:-1] == heldout_queries()


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="split must be"):
        sample_queries("test", 3, seed=0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        sample_queries("train", -1, seed=0)
