"""Tokenizers of the real classes built in code (no hub files)."""
from __future__ import annotations

import string

from transformers import CLIPTokenizer, T5Tokenizer


def byte_symbols() -> list[str]:
    """The 256 printable symbols GPT-2-style byte-level BPE uses for raw bytes (byte order of the GPT-2 table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_clip_tokenizer(model_max_length: int = 77, words: tuple[str, ...] = ()) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over single byte symbols (encodes any text); each of ``words`` becomes one token.

    Merges for ``words`` are emitted longest word first so that a long word is not split by the merges of a
    shorter one.
    """
    chars = byte_symbols()
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words), key=lambda w: (-len(w), w)):  # deterministic across processes
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            merges.append((symbols[0], symbols[1]))
            vocab.setdefault(merged, len(vocab))
            symbols = [merged] + symbols[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def make_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """A unigram ``T5Tokenizer`` over ASCII characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces.append((c, -3.0))
        pieces.append(("\u2581" + c, -2.5))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def make_real_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The real 49408-token CLIP BPE tokenizer (ids identical to OpenAI CLIP), built from the BPE merges file that
    the ``open-clip-torch`` wheel ships. Raises ImportError with the fix when open_clip is missing."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ImportError("make_real_clip_tokenizer needs the BPE file shipped with open_clip: "
                          "pip install open-clip-torch (or pip install 'promptloop[rewards]').")
    bpe = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = byte_symbols()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=model_max_length)
