from promptloop.miniworld.backbone import SHIPPED_BACKBONE_A
from promptloop.miniworld.domain import parse_caption
from promptloop.miniworld.headroom import measure, single_word_variants


def test_variants_add_one_free_attribute_value_within_the_budget():
    variants = single_word_variants("red big left")
    assert variants[0] == "red big left"
    added = [parse_caption(v).keys() - {"colour", "size", "column"} for v in variants[1:]]
    assert all(len(a) == 1 for a in added)
    assert len(variants) == 1 + 3 + 3 + 4  # shapes, rows, backgrounds
    assert single_word_variants("blue triangle big bottom gray") == ["blue triangle big bottom gray"]


def test_the_oracle_is_scored_on_seeds_it_was_not_chosen_on():
    result = measure(SHIPPED_BACKBONE_A, ["red square left white"], seeds_per_half=1, steps=2, log=lambda *a: None)
    assert set(result["base"]) == set(result["oracle_one_word"]) == {"preference", "gold", "fidelity"}
    assert set(result["word_effect_on_preference"]) == {"small", "big", "top", "middle", "bottom"}
    assert all(0.0 <= result[k]["fidelity"] <= 1.0 for k in ("base", "oracle_one_word"))


def test_a_word_added_part_way_leaves_the_query_rows_alone_and_changes_the_rest():
    import pytest

    quiet = dict(seeds_per_half=1, steps=3, log=lambda *a: None)
    start = measure(SHIPPED_BACKBONE_A, ["red square left white"], at_step=0, **quiet)
    late = measure(SHIPPED_BACKBONE_A, ["red square left white"], at_step=2, **quiet)
    assert late["at_step"] == 2 and start["base"] == late["base"]  # the query alone: the same images
    assert start["word_effect_on_preference"] != late["word_effect_on_preference"]
    with pytest.raises(ValueError, match=r"at_step=3 must be in \[0, 2\]"):
        measure(SHIPPED_BACKBONE_A, ["red square"], at_step=3, **quiet)
