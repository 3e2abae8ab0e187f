import random

import numpy as np
import pytest

from promptloop.miniworld.domain import (ATTRIBUTE_VALUES, ATTRIBUTES, MAX_CAPTION_WORDS, NUM_SCENES, VOCABULARY,
                                         Jitter, Scene, all_scenes, caption, parse_caption, render, sample_caption,
                                         sample_named_attributes, sample_scene)


def test_render_is_deterministic_and_sized():
    rng = random.Random(1)
    for _ in range(20):
        scene = sample_scene(rng)
        a, b = render(scene), render(scene)
        assert a.size == (32, 32) and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert render(scene, size=64).size == (64, 64)


def test_every_attribute_changes_the_image():
    base = Scene("red", "circle", "big", "middle", "center", "white")
    for name in ATTRIBUTES:
        for value in ATTRIBUTE_VALUES[name]:
            if value == getattr(base, name):
                continue
            other = Scene(**{**base.as_dict(), name: value})
            assert not np.array_equal(np.asarray(render(base)), np.asarray(render(other))), (name, value)


def test_jitter_moves_the_object_but_zero_jitter_is_clean():
    scene = Scene("blue", "square", "small", "top", "left", "gray")
    assert np.array_equal(np.asarray(render(scene, jitter=Jitter())), np.asarray(render(scene)))
    assert not np.array_equal(np.asarray(render(scene, jitter=Jitter(dx=1.0))), np.asarray(render(scene)))


def test_scene_space_and_indices():
    scenes = all_scenes()
    assert len(scenes) == NUM_SCENES == 6 * 3 * 2 * 3 * 3 * 4
    assert [s.index() for s in scenes] == list(range(NUM_SCENES))
    with pytest.raises(ValueError, match="colour"):
        Scene("pink", "circle", "big", "top", "left", "white")


def test_vocabulary_words_are_distinct_and_name_one_attribute_each():
    assert len(set(VOCABULARY)) == len(VOCABULARY) == sum(len(v) for v in ATTRIBUTE_VALUES.values())
    assert MAX_CAPTION_WORDS < len(ATTRIBUTES)  # one prompt cannot pin down a whole scene


def test_caption_names_exactly_the_requested_attributes():
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng)
        named = [a for a in ATTRIBUTES if rng.random() < 0.5]
        text = caption(scene, named)
        assert parse_caption(text) == {a: getattr(scene, a) for a in named}
        assert all(word in VOCABULARY for word in text.split())
    assert caption(scene, []) == ""
    with pytest.raises(ValueError, match="Unknown attributes"):
        caption(scene, ["texture"])


def test_sample_caption_respects_budget_and_probability():
    rng = random.Random(0)
    scene = sample_scene(rng)
    lengths = [len(sample_caption(scene, rng, p_name=1.0).split()) for _ in range(50)]
    assert max(lengths) == MAX_CAPTION_WORDS
    assert sample_caption(scene, rng, p_name=0.0) == ""
    counts = [len(sample_named_attributes(rng, p_name=0.5, max_words=6)) for _ in range(2000)]
    assert abs(np.mean(counts) - 3.0) < 0.15
    with pytest.raises(ValueError, match="p_name"):
        sample_caption(scene, rng, p_name=1.5)
