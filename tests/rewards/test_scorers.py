"""Each built-in scorer on a tiny random-weight model of its real architecture, saved and loaded like the real files."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from promptloop.rewards import ImageRewardModel, load_reward
from promptloop.rewards.checkpoints import read_state_dict
from promptloop.testing.tiny_rewards import save_tiny_hpsv2

from promptloop.testing.tiny_rewards import TINY_REWARD_BUILDERS
from reward_test_utils import native_images, pil_to_tensor, random_images

REWARD_NAMES = sorted(TINY_REWARD_BUILDERS)

QUERIES = ["a red cat on a sofa", "a blue dog", "a red cat on a sofa"]


@pytest.mark.parametrize("name", REWARD_NAMES)
def test_scores_are_finite_batched_and_deterministic(tiny_rewards, name):
    reward = tiny_rewards[name]
    images = random_images(3)
    first = reward(images, QUERIES)
    second = reward(images, QUERIES)
    assert first.scores.shape == (3,) and first.scores.dtype == torch.float32
    assert torch.isfinite(first.scores).all() and first.num_nonfinite == 0
    torch.testing.assert_close(first.scores, second.scores, rtol=0, atol=0)
    assert [d[name] for d in first.details] == pytest.approx(first.scores.tolist())


@pytest.mark.parametrize("name", REWARD_NAMES)
def test_scores_depend_on_the_image(tiny_rewards, name):
    a, b = random_images(1, seed=1), random_images(1, seed=2)
    score_a = tiny_rewards[name](a, QUERIES[:1]).scores
    score_b = tiny_rewards[name](b, QUERIES[:1]).scores
    assert (score_a - score_b).abs().item() > 1e-5


@pytest.mark.parametrize("name", REWARD_NAMES)
def test_scores_depend_on_the_query_exactly_when_the_reward_reads_it(tiny_rewards, name):
    reward = tiny_rewards[name]
    images = random_images(1) * 2
    scores = reward(images, ["a red cat", "a blue dog"]).scores
    if reward.reads_query:
        assert (scores[0] - scores[1]).abs().item() > 1e-5
    else:
        assert scores[0].item() == scores[1].item()


@pytest.mark.parametrize("name", REWARD_NAMES)
def test_pil_and_tensor_images_score_alike(tiny_rewards, name):
    images = native_images(2)
    from_pil = tiny_rewards[name](images, QUERIES[:2]).scores
    from_tensor = tiny_rewards[name](pil_to_tensor(images), QUERIES[:2]).scores
    torch.testing.assert_close(from_pil, from_tensor, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", REWARD_NAMES)
def test_reloading_the_files_gives_the_same_scores(tiny_rewards, tiny_dirs, name):
    images = random_images(2)
    again = load_reward(name, path=tiny_dirs[name])
    torch.testing.assert_close(again(images, QUERIES[:2]).scores, tiny_rewards[name](images, QUERIES[:2]).scores)


def test_imagereward_key_mapping_round_trips(tiny_dirs):
    published = read_state_dict(tiny_dirs["imagereward"] / "ImageReward.pt")
    med_config = json.loads((tiny_dirs["imagereward"] / "med_config.json").read_text())
    model = ImageRewardModel.from_published(published, med_config)
    round_trip = model.published_state_dict()
    assert set(round_trip) == {k for k in published if not k.startswith(("blip.vision_proj", "blip.text_proj"))}
    for key, value in round_trip.items():
        assert torch.equal(value, published[key]), key


@pytest.mark.parametrize("name, checkpoint, nested", [("imagereward", "ImageReward.pt", None),
                                                      ("hpsv2", "HPS_v2.1_compressed.pt", "state_dict")])
def test_safetensors_conversion_is_accepted(tiny_rewards, tiny_dirs, tmp_path, name, checkpoint, nested):
    folder = tmp_path / name
    shutil.copytree(tiny_dirs[name], folder)
    state_dict = read_state_dict(folder / checkpoint, nested_key=nested)
    (folder / checkpoint).unlink()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, folder / checkpoint.replace(".pt", ".safetensors"))
    images = random_images(2)
    torch.testing.assert_close(load_reward(name, path=folder)(images, QUERIES[:2]).scores,
                               tiny_rewards[name](images, QUERIES[:2]).scores)


def test_hpsv2_versions_pick_their_checkpoint(tmp_path):
    folder = save_tiny_hpsv2(tmp_path, version="v2.0")
    reward = load_reward("hpsv2", path=folder, version="v2.0")
    assert torch.isfinite(reward(random_images(1), ["a cat"]).scores).all()
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        load_reward("hpsv2", path=folder, version="v2.1")
    with pytest.raises(ValueError, match="v2.0"):
        load_reward("hpsv2", path=folder, version="v3")


def test_pickscore_is_clip_logits_per_image(tiny_rewards):
    reward = tiny_rewards["pickscore"]
    images = native_images(2)
    tokens = reward.tokenizer(QUERIES[:2], padding=True, return_tensors="pt")
    logits = reward.model(pixel_values=reward.transform(images), **tokens).logits_per_image
    torch.testing.assert_close(reward(images, QUERIES[:2]).scores, logits.diagonal(), rtol=1e-5, atol=1e-5)


def test_clipscore_is_weighted_clipped_cosine(tiny_dirs):
    images = random_images(3)
    base = load_reward("clipscore", path=tiny_dirs["clipscore"], weight=1.0)(images, QUERIES).scores
    paper = load_reward("clipscore", path=tiny_dirs["clipscore"])(images, QUERIES).scores
    assert (base >= 0).all() and (base <= 1).all()
    torch.testing.assert_close(paper, 2.5 * base)


def test_model_rewards_follow_dtype(tiny_dirs):
    reward = load_reward("pickscore", path=tiny_dirs["pickscore"], dtype=torch.bfloat16)
    assert next(reward.model.parameters()).dtype == torch.bfloat16
    out = reward(random_images(2), QUERIES[:2])
    assert out.scores.dtype == torch.float32 and torch.isfinite(out.scores).all()
