import random

import numpy as np
import pytest
from PIL import Image

from promptloop.miniworld.domain import Scene, all_scenes, caption, render, sample_jitter, sample_scene
from promptloop.miniworld.evaluate_backbone import format_table, weakest_values
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
    assert result["colour"] == {"accuracy": 0.5, "count": 2, "by_value": {"blue": {"accuracy": 0.0, "count": 1},
                                                                          "red": {"accuracy": 1.0, "count": 1}}}
    assert result["shape"] == {"accuracy": 1.0, "count": 2, "by_value": {"square": {"accuracy": 1.0, "count": 2}}}
    assert result["size"] == {"accuracy": 1.0, "count": 2, "by_value": {"big": {"accuracy": 1.0, "count": 2}}}
    assert result["background"]["count"] == 1
    assert result["all_named"]["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one target per image"):
        attribute_accuracy([image], [])


def test_backbone_table_names_the_value_an_attribute_average_hides():
    circle, square = render(Scene("red", "circle", "big", "middle", "left", "white")), render(
        Scene("red", "square", "big", "middle", "left", "white"))
    # asked for a circle four times and drawn as a square three of them; squares always right
    images = [square, square, square, circle] + [square] * 4
    accuracy = attribute_accuracy(images, ["circle"] * 4 + ["square"] * 4)
    assert accuracy["shape"]["accuracy"] == pytest.approx(5 / 8)
    assert weakest_values(accuracy, k=1) == [("shape", "circle", 0.25, 4)]
    table = format_table({"chance": {}, "by_guidance": {"2.0": accuracy}})
    assert "Weakest named values at guidance 2.0: shape circle 0.25 (4 images)." in table
    perfect = attribute_accuracy([square], ["square"])
    assert weakest_values(perfect) == []
    assert "none below 1.00" in format_table({"chance": {}, "by_guidance": {"4.0": perfect}})
