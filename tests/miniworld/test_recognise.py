import random

import numpy as np
import pytest
from PIL import Image

from promptloop.miniworld.domain import Scene, all_scenes, caption, render, sample_jitter, sample_scene
from promptloop.miniworld.recognise import attribute_accuracy, recognise


def test_recogniser_is_exact_on_every_clean_render():
    wrong = [s for s in all_scenes() if recognise(render(s)) != s.as_dict()]
    assert wrong == []


def test_recogniser_reads_jittered_and_upscaled_renders():
    rng = random.Random(3)
    for _ in range(100):
        scene = sample_scene(rng)
        assert recognise(render(scene, jitter=sample_jitter(rng))) == scene.as_dict()
    scene = Scene("purple", "triangle", "small", "bottom", "right", "brown")
    assert recognise(render(scene, size=64)) == scene.as_dict()


def test_recogniser_survives_noise():
    rng = np.random.default_rng(0)
    scene = Scene("green", "circle", "big", "top", "center", "black")
    noisy = np.asarray(render(scene)).astype(float) + rng.normal(0, 12, (32, 32, 3))
    assert recognise(Image.fromarray(noisy.clip(0, 255).astype(np.uint8))) == scene.as_dict()


def test_empty_image_has_background_only():
    seen = recognise(Image.new("RGB", (32, 32), (240, 240, 240)))
    assert seen["background"] == "white" and seen["colour"] is None and seen["shape"] is None


def test_attribute_accuracy_scores_only_named_attributes():
    scene = Scene("red", "square", "big", "middle", "left", "white")
    image = render(scene)
    wrong_colour = caption(Scene(**{**scene.as_dict(), "colour": "blue"}), ["colour", "shape"])
    result = attribute_accuracy([image, image, image], [scene, wrong_colour, "big"])
    assert result["colour"] == {"accuracy": 0.5, "count": 2}
    assert result["shape"] == {"accuracy": 1.0, "count": 2}
    assert result["size"] == {"accuracy": 1.0, "count": 2}
    assert result["background"]["count"] == 1
    assert result["all_named"]["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one target per image"):
        attribute_accuracy([image], [])
