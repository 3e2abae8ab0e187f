"""Names, composite specs, user callables, clear errors, and NaN flagging."""
import textwrap

import numpy as np
import pytest
import torch

from promptloop.rewards import (CompositeReward, MissingRewardWeightsError, NonFiniteRewardError, available_rewards,
                                load_reward, parse_reward_spec)
from promptloop.rewards import imagereward as imagereward_module
from reward_test_utils import random_images

QUERIES = ["a red cat", "a blue dog"]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user module on sys.path with a scorer, a factory, a NaN scorer and a function of the wrong shape."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import torch

        def query_length(images, queries, metadata=None):
            return [float(len(q)) for q in queries]

        def make_scaled(scale=1.0, device=None):
            def scorer(images, queries, metadata):
                return torch.tensor([scale * len(q) for q in queries])
            return scorer

        def with_nan(images, queries, metadata):
            return [1.0, float("nan"), float("inf")][: len(queries)]

        def one_argument(images):
            return [0.0]

        def wrong_length(images, queries, metadata):
            return [0.0, 1.0, 2.0]

        def two_arguments(images, queries):
            return [float(len(q)) for q in queries]

        def keyword_metadata(images, queries, *, metadata=None):
            return [float(m["n"]) for m in metadata]

        def make_two_argument(scale=1.0):
            def scorer(images, queries):
                return [scale * len(q) for q in queries]
            return scorer

        def four_arguments(images, queries, metadata, extra):
            return [0.0] * len(queries)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_all_builtin_names_are_registered():
    assert {"imagereward", "pickscore", "hpsv2", "aesthetic", "clipscore", "composite"} <= set(available_rewards())


@pytest.mark.parametrize("spec, expected, composite", [
    ("pickscore", [("pickscore", 1.0)], False),
    ("pickscore:2", [("pickscore", 2.0)], True),
    ("imagereward:1.0,aesthetic:0.1", [("imagereward", 1.0), ("aesthetic", 0.1)], True),
    ("pkg.mod:fn", [("pkg.mod:fn", 1.0)], False),
    ("pkg.mod:fn:-0.5, aesthetic", [("pkg.mod:fn", -0.5), ("aesthetic", 1.0)], True),
])
def test_parse_reward_spec(spec, expected, composite):
    assert parse_reward_spec(spec) == (expected, composite)


def test_unknown_name_lists_known_rewards():
    with pytest.raises(ValueError, match="Unknown reward 'imagerewad'.*aesthetic.*imagereward.*pickscore"):
        load_reward("imagerewad")


def test_composite_is_the_exact_weighted_sum_and_reports_components(tiny_dirs, tiny_rewards):
    reward = load_reward("pickscore:1.0,aesthetic:0.1", pickscore={"path": tiny_dirs["pickscore"]},
                         aesthetic={"path": tiny_dirs["aesthetic"]})
    images = random_images(2)
    out = reward(images, QUERIES)
    pick = tiny_rewards["pickscore"](images, QUERIES).scores
    aesthetic = tiny_rewards["aesthetic"](images, QUERIES).scores
    torch.testing.assert_close(out.scores, 1.0 * pick + 0.1 * aesthetic, rtol=0, atol=1e-6)
    for i, details in enumerate(out.details):
        assert details["pickscore"] == pytest.approx(pick[i].item())
        assert details["aesthetic"] == pytest.approx(aesthetic[i].item())
        assert details["composite"] == pytest.approx(out.scores[i].item())


def test_composite_by_name_with_weights(tiny_dirs, user_module):
    reward = load_reward("composite", weights={f"{user_module}:query_length": 2.0, "clipscore": -1.0},
                         clipscore={"path": tiny_dirs["clipscore"]})
    assert isinstance(reward, CompositeReward)
    out = reward(random_images(2), QUERIES)
    expected = [2.0 * len(q) - d["clipscore"] for q, d in zip(QUERIES, out.details)]
    assert out.scores.tolist() == pytest.approx(expected)


def test_composite_rejects_kwargs_not_naming_a_component(tiny_dirs):
    with pytest.raises(ValueError, match="component names"):
        load_reward("pickscore:1,aesthetic:1", path=tiny_dirs["pickscore"])


def test_module_function_scorer(user_module):
    reward = load_reward(f"{user_module}:query_length")
    out = reward(random_images(2), QUERIES)
    assert out.scores.tolist() == [9.0, 10.0]
    assert out.details[0] == {f"{user_module}:query_length": 9.0}


def test_module_function_factory_gets_kwargs(user_module):
    reward = load_reward(f"{user_module}:make_scaled", scale=0.5)
    assert reward(random_images(2), QUERIES).scores.tolist() == [4.5, 5.0]


@pytest.mark.parametrize("target, error, match", [
    ("no_such_module_xyz:fn", ValueError, "Cannot import module 'no_such_module_xyz'"),
    ("{m}:missing", ValueError, "has no callable 'missing'"),
    ("{m}:one_argument", TypeError, "scorer taking \\(images, queries"),
    ("{m}:four_arguments", TypeError, "it requires 4 positional arguments"),
])
def test_bad_user_callables_are_explained(user_module, target, error, match):
    with pytest.raises(error, match=match):
        load_reward(target.format(m=user_module))


def test_scorers_get_the_metadata_only_when_they_take_it(user_module):
    images, metadata = random_images(2), [{"n": 1}, {"n": 2}]
    assert load_reward(f"{user_module}:two_arguments")(images, QUERIES, metadata).scores.tolist() == [9.0, 10.0]
    assert load_reward(f"{user_module}:make_two_argument", scale=2.0)(images, QUERIES).scores.tolist() == [18.0, 20.0]
    assert load_reward(f"{user_module}:keyword_metadata")(images, QUERIES, metadata).scores.tolist() == [1.0, 2.0]
    assert load_reward(f"{user_module}:query_length")(images, QUERIES, metadata).scores.tolist() == [9.0, 10.0]


@pytest.mark.parametrize("spec", ["pickscore:nan", "pickscore:1,aesthetic:inf", "pkg.mod:fn:-inf"])
def test_non_finite_weights_are_rejected(spec):
    with pytest.raises(ValueError, match="must be a finite number"):
        parse_reward_spec(spec)
    with pytest.raises(ValueError, match="weight of reward 'clipscore' is nan; it must be a finite number"):
        load_reward("composite", weights={"clipscore": float("nan")})


def test_scorer_output_of_the_wrong_length_is_an_error(user_module):
    with pytest.raises(ValueError, match="shape \\(3,\\) for a batch of 2"):
        load_reward(f"{user_module}:wrong_length")(random_images(2), QUERIES)


def test_nan_scores_are_flagged_counted_and_warned(user_module):
    reward = load_reward(f"{user_module}:with_nan")
    with pytest.warns(RuntimeWarning, match="2 NaN/inf score"):
        out = reward(random_images(3), ["a", "b", "c"])
    assert out.nan_mask.tolist() == [False, True, True]
    assert out.num_nonfinite == 2
    assert out.scores[0].item() == 1.0 and torch.isnan(out.scores[1]) and torch.isinf(out.scores[2])
    with pytest.warns(RuntimeWarning, match="4 so far"):
        reward(random_images(3), ["a", "b", "c"])
    assert reward.num_nonfinite == 4


def test_nan_scores_can_raise(user_module):
    reward = load_reward(f"{user_module}:with_nan")
    reward.on_nonfinite = "raise"
    with pytest.raises(NonFiniteRewardError, match="NaN/inf"):
        reward(random_images(2), ["a", "b"])


def test_nan_in_a_component_is_flagged_on_the_composite(user_module):
    reward = load_reward(f"{user_module}:with_nan:1.0,{user_module}:query_length:1.0")
    with pytest.warns(RuntimeWarning):
        out = reward(random_images(2), ["a", "b"])
    assert out.nan_mask.tolist() == [False, True]
    assert reward.num_nonfinite == 1


@pytest.mark.parametrize("images, error, match", [
    (np.zeros((2, 3, 8, 8), dtype=np.float32), TypeError, "got ndarray"),
    (["a.png", "b.png"], TypeError, "holding str"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError, "torch.uint8"),
    (torch.zeros(2, 8, 8, 3), TypeError, "shape \\(2, 8, 8, 3\\)"),
    (torch.full((2, 3, 8, 8), -1.0), ValueError, "in \\[0, 1\\]"),
    (torch.zeros(3, 3, 8, 8), ValueError, "3 images but 2 queries"),
])
def test_bad_images_are_rejected_with_a_clear_error(tiny_rewards, images, error, match):
    with pytest.raises(error, match=match):
        tiny_rewards["pickscore"](images, QUERIES)


def test_queries_must_be_a_list_of_strings_and_metadata_match(tiny_rewards):
    with pytest.raises(TypeError, match="list of strings"):
        tiny_rewards["pickscore"](random_images(1), "a cat")
    with pytest.raises(ValueError, match="metadata"):
        tiny_rewards["pickscore"](random_images(2), QUERIES, metadata=[{}])


def test_missing_files_are_named_before_any_model_is_built(tmp_path, monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError("a model was built before the files were checked")

    monkeypatch.setattr(imagereward_module.ImageRewardModel, "from_published", must_not_build)
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    with pytest.raises(MissingRewardWeightsError) as info:
        load_reward("imagereward", path=tmp_path)
    message = str(info.value)
    assert "med_config.json" in message and "vocab.txt" in message and str(tmp_path) in message
    assert "ImageReward.pt" not in message
    assert "huggingface.co/THUDM/ImageReward" in message


def test_missing_subfolder_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: put it in .*aesthetic_home/clip/"):
        load_reward("aesthetic", path=tmp_path / "aesthetic_home")


def test_cache_folder_is_used_when_no_path_is_given(tiny_dirs, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_dirs["pickscore"], tmp_path / "pickscore")
    monkeypatch.setenv("PROMPTLOOP_REWARDS_CACHE", str(tmp_path))
    assert torch.isfinite(load_reward("pickscore")(random_images(1), ["a cat"]).scores).all()
    with pytest.raises(MissingRewardWeightsError, match=f"put it in {tmp_path}/imagereward/"):
        load_reward("imagereward")
