"""The mini world's tokenizer (the real ``CLIPTokenizer``, built in code) and a batched caption encoder.

Every domain word is one token and the tokenizer length is the text budget plus BOS and EOS, so a prompt holds at
most ``MAX_CAPTION_WORDS`` domain words; longer prompts are truncated like any CLIP prompt.
"""
from __future__ import annotations

import torch
from transformers import CLIPTokenizer

from ..testing.tokenizers import make_clip_tokenizer
from .domain import ATTRIBUTE_VALUES, ATTRIBUTES, MAX_CAPTION_WORDS, VOCABULARY


def make_miniworld_tokenizer(max_words: int = MAX_CAPTION_WORDS) -> CLIPTokenizer:
    """A CLIPTokenizer with each word of ``domain.VOCABULARY`` as one token and room for ``max_words`` tokens."""
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}.")
    return make_clip_tokenizer(model_max_length=max_words + 2, words=VOCABULARY)


class CaptionTokenizer:
    """Builds the token ids of many captions at once from attribute indices, on any device.

    Equal, id for id, to ``tokenizer(caption(...), padding="max_length", truncation=True)`` of the same words in the
    same order; used in training, where tokenizing 1000 strings per step would starve a GPU.
    """

    def __init__(self, tokenizer: CLIPTokenizer, device: torch.device | str = "cpu"):
        width = max(len(v) for v in ATTRIBUTE_VALUES.values())
        table = torch.full((len(ATTRIBUTES), width), -1, dtype=torch.long)
        for a, name in enumerate(ATTRIBUTES):
            for v, word in enumerate(ATTRIBUTE_VALUES[name]):
                ids = tokenizer(word, add_special_tokens=False).input_ids
                if len(ids) != 1:
                    raise ValueError(f"Domain word {word!r} is {len(ids)} tokens; build the tokenizer with "
                                     "make_miniworld_tokenizer so each domain word is one token.")
                table[a, v] = ids[0]
        self.word_ids = table.to(device)
        self.length = tokenizer.model_max_length
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def __call__(self, values: torch.Tensor, named: torch.Tensor, order_key: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Token ids (B, length) of captions naming ``values[b, a]`` for each attribute ``a`` with ``named[b, a]``.

        ``values``: (B, 6) long value indices in ``ATTRIBUTE_VALUES`` order; ``named``: (B, 6) bool;
        ``order_key``: (B, 6) float, words are written in ascending key order (default: canonical order).
        Named words beyond the budget (``length - 2``) are truncated.
        """
        batch, n_attr = values.shape
        if order_key is None:
            order_key = torch.arange(n_attr, device=values.device, dtype=torch.float32).expand(batch, n_attr)
        words = self.word_ids[torch.arange(n_attr, device=values.device), values]
        order = torch.argsort(order_key + (~named) * 1e4, dim=1)
        words = torch.gather(words, 1, order)
        keep = torch.gather(named, 1, order)
        budget = self.length - 2
        words, keep = words[:, :budget], keep[:, :budget]
        ids = torch.full((batch, self.length), self.pad, dtype=torch.long, device=values.device)
        ids[:, 0] = self.bos
        ids[:, 1:1 + words.shape[1]] = torch.where(keep, words, torch.full_like(words, self.pad))
        n_words = keep.sum(dim=1)
        ids[torch.arange(batch, device=values.device), 1 + n_words] = self.eos
        return ids
