import json
import random

import pytest
import torch
from PIL import Image

import promptloop.miniworld.rewards  # noqa: F401  (registers the mini-world rewards)
from promptloop.miniworld.domain import ATTRIBUTE_VALUES
from promptloop.miniworld.domain import ATTRIBUTES, Scene, caption, render, sample_scene
from promptloop.miniworld.gold import VIOLATION_PENALTY, gold_score, query_fidelity, read_scene
from promptloop.miniworld.preference_model import PreferenceModel
from promptloop.miniworld.rewards import DEFAULT_PREFERENCE_DIR, to_pixel_tensor
from promptloop.miniworld.train_preference import (METRICS_NAME, PreferenceTrainingConfig, agreement, build_pool,
                                                   sample_pairs, train)
from promptloop.rewards import load_reward

FAVOURITE = Scene("yellow", "circle", "big", "middle", "center", "black")  # warm on dark, big, centred, circle
DISLIKED = Scene("blue", "triangle", "small", "top", "left", "brown")  # cool on dark, small, corner, triangle


def test_gold_terms_on_clean_renders_match_the_rule():
    liked, disliked = read_scene(render(FAVOURITE)), read_scene(render(DISLIKED))
    assert liked.terms["colour_taste"] == 1.0 and disliked.terms["colour_taste"] == 0.0
    assert liked.terms["size"] > 0.9 and disliked.terms["size"] < 0.1
    assert liked.terms["centring"] > 0.95 and disliked.terms["centring"] < 0.1  # a triangle's centroid sits low
    assert liked.terms["shape_taste"] == 1.0 and disliked.terms["shape_taste"] == 0.0
    assert liked.terms["cleanliness"] > 0.9
    # yellow (luma ~203) on black (25) against blue (~83) on brown (~80)
    assert liked.terms["contrast"] == pytest.approx((203 - 25) / 255, abs=0.02)
    assert disliked.terms["contrast"] < 0.05
    assert gold_score(liked, "") == pytest.approx(0.698 + 1.0 + 0.5 + 0.5 * 0.994 + 0.25 + 1.0, abs=0.02)
    assert gold_score(disliked, "") == pytest.approx(1.05, abs=0.05)  # little but cleanliness


def test_gold_never_prefers_an_image_that_contradicts_the_query():
    rng = random.Random(0)
    for _ in range(40):
        scene = sample_scene(rng)
        name = rng.choice(ATTRIBUTES)
        query = caption(scene, [name])
        faithful = read_scene(render(scene))
        for other in (Scene(**{**scene.as_dict(), name: v}) for v in ATTRIBUTE_VALUES[name]
                      if v != getattr(scene, name)):
            contradicting = read_scene(render(other))
            assert gold_score(contradicting, query) < gold_score(faithful, query)
            assert gold_score(contradicting, query) == pytest.approx(contradicting.aesthetic - VIOLATION_PENALTY)


def test_fidelity_counts_the_query_attributes_the_image_shows():
    image_reading = read_scene(render(FAVOURITE)).attributes
    assert query_fidelity(image_reading, "yellow circle black") == 1.0
    assert query_fidelity(image_reading, "yellow square black") == pytest.approx(2 / 3)
    assert query_fidelity(image_reading, "") == 1.0
    empty = read_scene(Image.new("RGB", (32, 32), (25, 25, 25)))
    assert query_fidelity(empty.attributes, "yellow circle black") == pytest.approx(1 / 3)
    assert sum(empty.terms.values()) == 0.0


def test_degradation_lowers_gold_cleanliness():
    from promptloop.miniworld.degrade import Degradation, degrade

    clean = read_scene(render(FAVOURITE))
    noisy = read_scene(degrade(render(FAVOURITE), Degradation(blur=1.0, noise=12.0), seed=0))
    assert noisy.terms["cleanliness"] < clean.terms["cleanliness"] - 0.2


def test_gold_and_fidelity_load_through_the_registry_and_read_tensors_like_images():
    images = [render(FAVOURITE), render(DISLIKED)]
    queries = ["yellow circle", "yellow circle"]
    gold = load_reward("miniworld-gold")(images, queries)
    assert gold.scores[0] > 0 > gold.scores[1]  # the second image violates both named attributes
    assert gold.details[1]["fidelity"] == 0.0
    fidelity = load_reward("miniworld-fidelity")(images, queries)
    assert fidelity.scores.tolist() == [1.0, 0.0]
    tensor = to_pixel_tensor(images)
    assert torch.equal(load_reward("miniworld-gold")(tensor, queries).scores, gold.scores)


def _shipped_metrics():
    return json.loads((DEFAULT_PREFERENCE_DIR / METRICS_NAME).read_text())


def test_shipped_learned_reward_agrees_with_gold_on_held_out_pairs():
    reward = load_reward("miniworld-preference")
    assert isinstance(reward.model, PreferenceModel)
    pool = build_pool(200, seed=12345, max_degradation=1.5, p_empty=0.04)
    pairs = sample_pairs(pool, 2000, random.Random(1), p_consistent=0.7)
    measured = agreement(reward.model, pool, pairs)
    shipped = _shipped_metrics()
    assert measured["agreement_all"] >= shipped["agreement_all"] - 0.05
    assert measured["agreement_free_choice"] >= shipped["agreement_free_choice"] - 0.07
    # the reward is a proxy: it does not agree with gold everywhere
    assert measured["agreement_all"] < 0.999


def test_learned_reward_scores_images_against_the_query():
    reward = load_reward("miniworld-preference")
    image = render(FAVOURITE)
    scores = reward([image, image], ["yellow circle", "blue square"]).scores
    assert scores[0] > scores[1]
    assert torch.allclose(reward(to_pixel_tensor([image]), ["yellow circle"]).scores, scores[:1], atol=1e-5)


def test_preference_training_runs_and_round_trips(tmp_path):
    config = PreferenceTrainingConfig(pool_size=48, eval_pool_size=24, eval_pairs=64, steps=3, batch_pairs=8,
                                      channels=(4, 8), embed_dim=8)
    model, metrics = train(config, log=lambda _: None)
    assert 0.0 <= metrics["agreement_all"] <= 1.0
    model.save_pretrained(tmp_path)
    loaded = load_reward("miniworld-preference", path=tmp_path)
    pixels = to_pixel_tensor([render(DISLIKED)])
    assert torch.allclose(loaded.model(pixels, loaded.model.encode_queries(["red"])),
                          model(pixels, model.encode_queries(["red"])))


def test_missing_preference_folder_says_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_preference"):
        load_reward("miniworld-preference", path=tmp_path)


def test_miniworld_rewards_resolve_by_name_without_an_explicit_import():
    import subprocess
    import sys

    code = ("from promptloop.rewards import load_reward, available_rewards;"
            "assert {'miniworld-gold', 'miniworld-fidelity', 'miniworld-preference'} <= set(available_rewards());"
            "print(type(load_reward('miniworld-fidelity')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "MiniworldFidelityReward"
