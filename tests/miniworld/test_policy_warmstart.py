import json
import random

import pytest

from promptloop.miniworld.domain import MAX_CAPTION_WORDS, VOCABULARY, parse_caption
from promptloop.miniworld.policy_warmstart import (DEFAULT_POLICY_DIR, METRICS_NAME, MODES, WarmStartConfig,
                                                   caption_check, evaluation_examples, make_policy_tokenizer,
                                                   measure_prompts, miniworld_policy_config, rewrite_chain,
                                                   sample_example, sample_query, target_prompt, warm_start,
                                                   _parse_args)
from promptloop.policy import PromptPolicy
from promptloop.policy.chat import DEFAULT_SYSTEM_PROMPTS


def test_caption_check():
    assert caption_check("big red circle", "red") == (True, True)
    assert caption_check("big blue circle", "red") == (True, False)
    assert caption_check("red blue", "red") == (False, False)  # colour named twice
    assert caption_check("a red circle", "red") == (False, False)  # not a domain word
    assert caption_check("big red circle top left", "red") == (True, True)
    assert caption_check("big red circle top left white", "red") == (False, False)  # over the budget
    assert caption_check("", "red") == (False, False)


@pytest.mark.parametrize("edit_later", [False, True])
def test_targets_keep_the_query_within_the_budget(edit_later):
    rng = random.Random(0)
    for mode in MODES:
        for _ in range(50):
            observation, target = sample_example(mode, rng, edit_later)
            lines = [line.split(": ", 1)[1] for line in target.split("\n")] if mode == "apriori" else [target]
            assert len(lines) == (observation.num_refinements if mode == "apriori" else 1)
            for line in lines:
                assert caption_check(line, observation.query) == (True, True)
            assert (observation.preview is not None) <= (mode == "closed")
    assert len({target_prompt("red", random.Random(i)) for i in range(30)}) > 5  # free slots vary


def test_later_rewrites_edit_the_prompt_in_force():
    rng = random.Random(1)
    changed = 0
    for _ in range(200):
        query = sample_query(rng)
        chain = rewrite_chain(query, 4, rng)
        assert all(caption_check(p, query) == (True, True) for p in chain)
        for before, after in zip(chain, chain[1:]):
            b, a = parse_caption(before), parse_caption(after)
            # at most one attribute added, replaced or removed, never one the query names
            assert len(set(b.items()) ^ set(a.items())) <= 2 and len(set(b) ^ set(a)) <= 1
            changed += before != after
    assert 150 < changed < 450  # about half of the 600 later rewrites edit, when an edit is possible
    _, config, _ = _parse_args(["--edit-later", "--steps", "3"])
    assert config.edit_later is True and config.steps == 3 and _parse_args([])[1].edit_later is False


def test_tokenizer_makes_domain_words_and_system_prompts_short():
    tokenizer = make_policy_tokenizer(seed=0, corpus_size=60)
    for word in VOCABULARY:
        assert len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1
    system = DEFAULT_SYSTEM_PROMPTS["closed"]
    ids = tokenizer(system, add_special_tokens=False).input_ids
    assert len(ids) < len(system) / 3
    assert tokenizer.decode(ids) == system
    assert tokenizer.decode(tokenizer("Ünïcode façade 42%").input_ids) == "Ünïcode façade 42%"  # bytes fall back


def test_warm_start_runs_end_to_end():
    config = WarmStartConfig(hidden_size=32, num_layers=1, steps=2, batch_size=3, eval_examples=2, tokenizer_corpus=30)
    model, processor, metrics = warm_start(config, log=lambda _: None)
    assert set(metrics["after"]) == set(MODES)
    assert all(0.0 <= m["valid"] <= 1.0 for m in metrics["after"].values())


@pytest.fixture(scope="module")
def shipped_metrics():
    return json.loads((DEFAULT_POLICY_DIR / METRICS_NAME).read_text())


def test_shipped_policy_writes_valid_prompts_that_keep_the_query(shipped_metrics):
    policies = {mode: PromptPolicy.from_pretrained(DEFAULT_POLICY_DIR, miniworld_policy_config(mode), device="cpu")
                for mode in MODES}
    assert all(policy.has_adapter for policy in policies.values())  # a fresh LoRA for RL
    measured = measure_prompts(policies, evaluation_examples(seed=99, per_mode=24), seed=3)
    for mode in MODES:
        shipped = shipped_metrics["after"][mode]
        assert measured[mode]["valid"] >= shipped["valid"] - 0.2, (mode, measured[mode], shipped)
        assert measured[mode]["keeps_query"] >= shipped["keeps_query"] - 0.2, (mode, measured[mode], shipped)
        assert shipped_metrics["before"][mode]["valid"] < 0.05  # the random initial model wrote no captions


def test_shipped_policy_prompts_fit_the_text_budget():
    policy = PromptPolicy.from_pretrained(DEFAULT_POLICY_DIR, miniworld_policy_config("oneshot"), device="cpu")
    examples = evaluation_examples(seed=5, per_mode=8)["oneshot"]
    actions = policy.act([observation for observation, _ in examples], seed=0)
    for prompt, (observation, _) in zip(actions.prompts, examples):
        assert len(prompt.split()) <= MAX_CAPTION_WORDS
        assert set(parse_caption(prompt)) or prompt == observation.prompt


def test_miniworld_config_states_the_vocabulary_and_budget():
    for mode in MODES:
        config = miniworld_policy_config(mode)
        assert all(word in config.system_prompt for word in VOCABULARY)
        assert config.max_prompt_words == MAX_CAPTION_WORDS and config.mode == mode
    with pytest.raises(ValueError, match="mode"):
        miniworld_policy_config("sometimes")
