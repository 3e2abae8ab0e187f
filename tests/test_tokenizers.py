"""Tokenizers built in code must give the same ids in every process (a trained text encoder depends on them)."""
import os
import subprocess
import sys

SNIPPET = ("from promptloop.testing.tokenizers import make_clip_tokenizer;"
           "t = make_clip_tokenizer(words=('red', 'big', 'top', 'left', 'blue', 'green', 'square', 'circle'));"
           "print(sorted(t.get_vocab().items(), key=lambda kv: kv[1])[-12:])")


def test_word_token_ids_do_not_depend_on_the_hash_seed():
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        result = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
        outputs.add(result.stdout)
    assert len(outputs) == 1, outputs
