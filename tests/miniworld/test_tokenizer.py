import random

import torch

from promptloop.miniworld.domain import ATTRIBUTE_VALUES, ATTRIBUTES, MAX_CAPTION_WORDS, VOCABULARY, sample_scene
from promptloop.miniworld.tokenizer import CaptionTokenizer, make_miniworld_tokenizer


def test_each_domain_word_is_one_token_and_budget_is_the_length():
    tokenizer = make_miniworld_tokenizer()
    ids = {w: tokenizer(w, add_special_tokens=False).input_ids for w in VOCABULARY}
    assert all(len(v) == 1 for v in ids.values())
    assert len({v[0] for v in ids.values()}) == len(VOCABULARY)
    assert tokenizer.model_max_length == MAX_CAPTION_WORDS + 2
    long = " ".join(VOCABULARY)
    assert len(tokenizer(long, truncation=True).input_ids) == MAX_CAPTION_WORDS + 2


def test_batched_caption_ids_equal_the_tokenizer():
    tokenizer = make_miniworld_tokenizer()
    encode = CaptionTokenizer(tokenizer)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(100):
        scene = sample_scene(rng)
        named = [a for a in ATTRIBUTES if rng.random() < 0.7]
        key = torch.rand(1, len(ATTRIBUTES), generator=gen)
        order = [ATTRIBUTES[i] for i in key[0].argsort().tolist() if ATTRIBUTES[i] in named]
        text = " ".join(getattr(scene, a) for a in order)
        expected = tokenizer(text, padding="max_length", truncation=True).input_ids
        values = torch.tensor([[ATTRIBUTE_VALUES[a].index(getattr(scene, a)) for a in ATTRIBUTES]])
        mask = torch.tensor([[a in named for a in ATTRIBUTES]])
        assert encode(values, mask, key)[0].tolist() == expected, text
