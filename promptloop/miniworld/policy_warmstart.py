r"""The mini world's policy: a tiny Qwen2.5-VL (the real transformers class), warm-started by supervised fine-tuning.

    python -m promptloop.miniworld.policy_warmstart --out promptloop/miniworld/assets/policy [--seed 0]
    python -m promptloop.miniworld.policy_warmstart --out promptloop/miniworld/assets/policy_edit --edit-later \
        --steps 4000 --threads 1     # the warm start the demo trains from

Before RL the policy must write grammatical mini-world prompts (at most ``MAX_CAPTION_WORDS`` domain words, one per
attribute) that keep every attribute the query names. The warm start teaches exactly that and nothing about what
makes a good image: inputs are the policy's real chats (``build_chat`` with the mini world's system prompts, see
``miniworld_policy_config``: closed loop with x0-preview-like images, one-shot and a-priori), targets copy the
query's words and add random values for a random number of its free attributes (with ``edit_later``, a later
rewrite instead keeps the prompt in force or makes one random edit of it). Which free choices are good, and how to
use the preview, is left for RL to find. Use the policy with ``miniworld_policy_config(mode)``: it was
trained with those system prompts.

The tokenizer is a byte-level ``Qwen2Tokenizer`` whose merges are learned (``tokenizers`` BPE) from the chats, so
the system prompts and the domain words are a few tokens each and any other text still encodes byte by byte. The
shipped folder is a base model (weights + processor), loaded with ``PromptPolicy.from_pretrained(folder, config)``,
which adds the LoRA adapter that RL trains.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, ProcessorMixin, Qwen2Tokenizer

from promptloop.backbones.types import Observation
from promptloop.policy import PolicyConfig, PromptPolicy, build_chat
from promptloop.policy.chat import DEFAULT_SYSTEM_PROMPTS
from promptloop.testing.tiny_vlm import PLAIN_ADDED_TOKENS, SPECIAL_TOKENS, make_tiny_vlm, qwen_vl_chat_template
from promptloop.testing.tokenizers import byte_symbols

from .degrade import degrade, sample_degradation
from .domain import (ATTRIBUTE_VALUES, ATTRIBUTES, MAX_CAPTION_WORDS, VOCABULARY, WORD_TO_ATTRIBUTE, Scene, caption,
                     parse_caption, render, sample_jitter, sample_named_attributes, sample_scene)
from .rewards import ASSETS_DIR

FAMILY = "qwen2_5_vl"
DEFAULT_POLICY_DIR = ASSETS_DIR / "policy"
"""The shipped warm-started policy (base model + processor)."""
PREVIEW_PIXELS = 112 * 112
"""Previews are resized to 112 x 112 by the processor: 8 x 8 patches of 14 px, 16 vision tokens after merging."""
METRICS_NAME = "warmstart_metrics.json"


_RULES = (f"Each prompt has at most {MAX_CAPTION_WORDS} words, each one of: {' '.join(VOCABULARY)}. "
          "Keep every word of the user's query.")
MINIWORLD_SYSTEM_PROMPTS = {
    "closed": "You refine the prompt of a text-to-image model while it generates. You see the user's query, the "
              "current prompt and the model's current estimate of the image. Write the next prompt. " + _RULES +
              " Answer with the prompt only.",
    "oneshot": "You rewrite the prompt of a text-to-image model before it generates. Write one prompt. " + _RULES +
               " Answer with the prompt only.",
    "apriori": "You write the prompts of a text-to-image model before it generates, one per refinement, the first "
               "used from pure noise, the last for fine details. " + _RULES +
               ' Answer with one line per prompt, numbered "1: ...", and nothing else.',
}
"""The mini world's system prompts: its vocabulary and text budget, in place of the defaults written for real
models (which ask for up to 50 words of style and lighting, and cost a tiny model hundreds of tokens)."""


def miniworld_policy_config(mode: str = "closed", model_name_or_path: str | Path = DEFAULT_POLICY_DIR,
                            **overrides) -> PolicyConfig:
    """The ``PolicyConfig`` the mini world uses (its system prompts for every mode, preview size, short answers, the
    text budget, a small LoRA)."""
    if mode not in MINIWORLD_SYSTEM_PROMPTS:
        raise ValueError(f"mode={mode!r} is not one of {tuple(MINIWORLD_SYSTEM_PROMPTS)}.")
    values = dict(model_name_or_path=str(model_name_or_path), mode=mode, system_prompt=MINIWORLD_SYSTEM_PROMPTS[mode],
                  system_prompts=dict(MINIWORLD_SYSTEM_PROMPTS), min_pixels=PREVIEW_PIXELS,
                  max_pixels=PREVIEW_PIXELS, max_new_tokens=48, max_prompt_words=MAX_CAPTION_WORDS, lora_r=8,
                  lora_alpha=16.0)
    values.update(overrides)
    return PolicyConfig(**values)


# --------------------------------------------------------------------------------------------- captions as answers
def caption_check(prompt: str, query: str) -> tuple[bool, bool]:
    """``(valid, keeps_query)``: ``prompt`` is 1 to ``MAX_CAPTION_WORDS`` domain words naming each attribute at most
    once, and (if valid) names every attribute value that ``query`` names."""
    words = prompt.split()
    named = [WORD_TO_ATTRIBUTE.get(word) for word in words]
    valid = 1 <= len(words) <= MAX_CAPTION_WORDS and None not in named and len(set(named)) == len(named)
    keeps = valid and parse_caption(query).items() <= parse_caption(prompt).items()
    return valid, keeps


def target_prompt(query: str, rng: random.Random) -> str:
    """A warm-start target: the query's words (in the query's order) followed by random values for a random number
    of its free attributes (in canonical order). Copying first is what a small model learns fastest; word order
    carries no meaning in the mini world."""
    named = parse_caption(query)
    if len(named) > MAX_CAPTION_WORDS:
        raise ValueError(f"query {query!r} names {len(named)} attributes, over the budget of {MAX_CAPTION_WORDS}.")
    free = [name for name in ATTRIBUTES if name not in named]
    extra = set(rng.sample(free, rng.randint(0, MAX_CAPTION_WORDS - len(named))))
    kept = list(dict.fromkeys(word for word in query.split() if word in named.values()))
    return " ".join(kept + [rng.choice(ATTRIBUTE_VALUES[name]) for name in free if name in extra])


def edited_prompt(prompt: str, query: str, rng: random.Random) -> str:
    """A later refinement's warm-start target: the current ``prompt`` (which keeps ``query``) unchanged half the
    time, else with one random edit of what the query leaves free: a value added for a free attribute (within the
    budget), a value the prompt added replaced by another, or such a value removed. A refiner builds on its
    current prompt; which edits help is left for RL."""
    if rng.random() < 0.5:
        return prompt
    named, fixed = parse_caption(prompt), parse_caption(query)
    words = prompt.split()
    free = [name for name in ATTRIBUTES if name not in named]
    added = [name for name in named if name not in fixed]
    edits = (["add"] if free and len(words) < MAX_CAPTION_WORDS else []) + (["replace", "remove"] if added else [])
    if not edits:
        return prompt
    edit = rng.choice(edits)
    if edit == "add":
        name = rng.choice(free)
        return " ".join(words + [rng.choice(ATTRIBUTE_VALUES[name])])
    name = rng.choice(added)
    if edit == "remove":
        return " ".join(w for w in words if w != named[name])
    other = rng.choice([v for v in ATTRIBUTE_VALUES[name] if v != named[name]])
    return " ".join(other if w == named[name] else w for w in words)


def rewrite_chain(query: str, length: int, rng: random.Random) -> list[str]:
    """``length`` successive warm-start prompts for ``query``: the first rewrites the query freely
    (:func:`target_prompt`), each later one edits the one before (:func:`edited_prompt`)."""
    chain: list[str] = []
    for _ in range(length):
        chain.append(edited_prompt(chain[-1], query, rng) if chain else target_prompt(query, rng))
    return chain


def sample_query(rng: random.Random) -> str:
    """A user query: a caption naming 1 to ``MAX_CAPTION_WORDS`` attributes, in canonical order or shuffled."""
    scene = sample_scene(rng)
    named: list[str] = []
    while not named:
        named = sample_named_attributes(rng, p_name=rng.uniform(0.2, 0.9))
    words = caption(scene, named).split()
    if rng.random() < 0.3:
        rng.shuffle(words)
    return " ".join(words)


def sample_preview(prompt: str, noise_level: float, rng: random.Random) -> Image.Image:
    """An x0-preview-like image: a scene showing ``prompt``'s attributes (others random), degraded by the noise
    left (blurrier, noisier and more washed out early in sampling)."""
    scene = Scene(**{**sample_scene(rng).as_dict(), **parse_caption(prompt)})
    image = render(scene, jitter=sample_jitter(rng))
    return degrade(image, sample_degradation(rng, 0.3 + 2.0 * noise_level), seed=rng.randrange(2**31))


def sample_example(mode: str, rng: random.Random, edit_later: bool = False) -> tuple[Observation, str]:
    """One warm-start example: an observation in ``mode`` and the target answer. Rewrites after the first are
    independent rewrites of the query, or with ``edit_later`` edits of the prompt before (:func:`rewrite_chain`)."""
    query = sample_query(rng)
    if mode == "oneshot":
        return Observation(row=0, query=query, prompt=query, history=[query], preview=None, step=0, num_steps=20,
                           refinement_index=0, num_refinements=1, noise_level=1.0), target_prompt(query, rng)
    num_steps = rng.choice((10, 20, 30, 50))
    num_refinements = rng.randint(1, 5)
    if mode == "apriori":
        prompts = (rewrite_chain(query, num_refinements, rng) if edit_later
                   else [target_prompt(query, rng) for _ in range(num_refinements)])
        lines = [f"{i}: {prompt}" for i, prompt in enumerate(prompts, start=1)]
        return Observation(row=0, query=query, prompt=query, history=[query], preview=None, step=0,
                           num_steps=num_steps, refinement_index=0, num_refinements=num_refinements,
                           noise_level=1.0), "\n".join(lines)
    k = rng.randrange(num_refinements)
    step = round(k * num_steps / num_refinements)
    noise_level = 1.0 - step / num_steps
    if edit_later:
        *earlier, target = rewrite_chain(query, k + 1, rng)
    else:
        earlier, target = [target_prompt(query, rng) for _ in range(k)], None
    history = [query] + earlier
    preview = None if rng.random() < 0.1 else sample_preview(history[-1], noise_level, rng)
    observation = Observation(row=0, query=query, prompt=history[-1], history=history, preview=preview, step=step,
                              num_steps=num_steps, refinement_index=k, num_refinements=num_refinements,
                              noise_level=noise_level)
    return observation, target if target is not None else target_prompt(query, rng)


# ----------------------------------------------------------------------------------------------- model and tokens
def chat_corpus(rng: random.Random, size: int, edit_later: bool = False) -> Iterable[str]:
    """Texts the policy reads and writes: system prompts (the mini world's and the defaults), user turns of every
    mode, targets, domain words."""
    yield from DEFAULT_SYSTEM_PROMPTS.values()
    yield from MINIWORLD_SYSTEM_PROMPTS.values()
    for word in VOCABULARY:
        yield f"{word}\n {word}"
    for i in range(size):
        mode = ("closed", "oneshot", "apriori")[i % 3]
        observation, target = sample_example(mode, rng, edit_later)
        user = build_chat(observation, mode).messages[1]["content"]
        yield from (part["text"] for part in user if part["type"] == "text")
        yield target


def make_policy_tokenizer(seed: int = 0, corpus_size: int = 600, vocab_size: int = 1024,
                          edit_later: bool = False) -> Qwen2Tokenizer:
    """A byte-level ``Qwen2Tokenizer`` (Qwen-VL special tokens, real chat template) with BPE merges learned from
    the mini world's chats: ids 0-255 are the byte symbols, merged tokens follow, special tokens come last."""
    base = Qwen2Tokenizer(vocab={s: i for i, s in enumerate(byte_symbols())}, merges=[], unk_token=None)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = base.backend_tokenizer.pre_tokenizer  # Qwen2's split + byte-level mapping
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(chat_corpus(random.Random(seed), corpus_size, edit_later), trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
    )
    tokenizer.add_tokens(list(PLAIN_ADDED_TOKENS[FAMILY]))
    tokenizer.chat_template = qwen_vl_chat_template(FAMILY)
    return tokenizer


def build_policy_model(tokenizer: Qwen2Tokenizer, hidden_size: int = 64, num_layers: int = 3,
                       seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` over ``tokenizer`` and its stock processor.

    Input and output embeddings are tied (as in Qwen2.5-VL-3B): copying the query's words is then what attention
    does by default, which a small model otherwise learns slowly.
    """
    return make_tiny_vlm(FAMILY, hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                         max_pixels=PREVIEW_PIXELS, min_pixels=PREVIEW_PIXELS, tokenizer=tokenizer,
                         tie_word_embeddings=True)


# ------------------------------------------------------------------------------------------------------ training
MODES = ("closed", "oneshot", "apriori")


@dataclass
class WarmStartConfig:
    """Everything that defines a warm-start run (with the seed, reproducible)."""

    seed: int = 0
    """Seeds the tokenizer corpus, the initial weights, the examples and the evaluation."""
    hidden_size: int = 64
    """Text (and vision output) width of the model."""
    num_layers: int = 3
    """Decoder layers."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 12
    """Examples per step (a third per mode)."""
    lr: float = 3e-3
    """AdamW learning rate (linear warm-up over 20 steps, cosine decay to 0)."""
    eval_examples: int = 32
    """Held-out observations per mode for the before/after measurement."""
    tokenizer_corpus: int = 600
    """Sampled chats (a third per mode) the tokenizer's BPE merges are learned from."""
    device: str = "cpu"
    """Where to train ("cuda" on a GPU: the default run then takes about a minute)."""
    edit_later: bool = False
    """Later closed-loop / a-priori targets edit the prompt before (keep it, or change one free attribute) instead
    of rewriting the query afresh (the shipped policy: false; docs/results.md, section 1, for the measured
    alternative)."""

    def __post_init__(self):
        for f in fields(self):
            if f.name not in ("seed", "device", "edit_later") and getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be positive, got {getattr(self, f.name)}.")


def _policies(model: PreTrainedModel, processor: ProcessorMixin, **overrides) -> dict[str, PromptPolicy]:
    """One adapter-free ``PromptPolicy`` per mode around the same model (the chat depends on the mode)."""
    return {mode: PromptPolicy(model, processor, miniworld_policy_config(mode, **overrides)) for mode in MODES}


def _samples(policy: PromptPolicy, examples: Sequence[tuple[Observation, str]]):
    """PolicySamples whose completions are the targets (then the end token), encoded like ``act`` encodes chats."""
    tokenizer = policy.processor.tokenizer
    # A leading space makes every target word the same token as in the chat (" red"), so keeping the query is a
    # plain copy; the sanitizer strips the space.
    targets = [tokenizer(" " + target, add_special_tokens=False).input_ids + [policy.eos_token_ids[0]]
               for _, target in examples]
    return policy.answer_samples([observation for observation, _ in examples], targets)


def evaluation_examples(seed: int, per_mode: int,
                        edit_later: bool = False) -> dict[str, list[tuple[Observation, str]]]:
    rng = random.Random(seed + 7_777)
    return {mode: [sample_example(mode, rng, edit_later) for _ in range(per_mode)] for mode in MODES}


@torch.no_grad()
def measure_prompts(policies: dict[str, PromptPolicy], examples: dict[str, list[tuple[Observation, str]]],
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Per mode, on sampled answers: the fraction of prompts that are valid captions and the fraction that also keep
    every query attribute (a-priori: every prompt of every schedule; an answer without a prompt counts as invalid)."""
    result = {}
    for mode, policy in policies.items():
        observations = [observation for observation, _ in examples[mode]]
        actions = policy.act(observations, seed=seed)
        checks = []
        for i, observation in enumerate(observations):
            if mode == "apriori":
                schedule = actions.schedules[i]
                prompts, missing = schedule.prompts, schedule.missing
            else:
                prompts, missing = [actions.prompts[i]], [actions.kept_previous[i]]
            checks += [(False, False) if gone else caption_check(prompt, observation.query)
                       for prompt, gone in zip(prompts, missing)]
        result[mode] = {"valid": sum(v for v, _ in checks) / len(checks),
                        "keeps_query": sum(k for _, k in checks) / len(checks), "prompts": len(checks)}
    return result


def warm_start(config: WarmStartConfig, log=print) -> tuple[PreTrainedModel, ProcessorMixin, dict]:
    """Build the tokenizer and model, measure, fine-tune on synthetic examples, measure again."""
    start = time.time()
    tokenizer = make_policy_tokenizer(config.seed, config.tokenizer_corpus, edit_later=config.edit_later)
    model, processor = build_policy_model(tokenizer, config.hidden_size, config.num_layers, config.seed)
    model.to(config.device)
    policies = _policies(model, processor)
    held_out = evaluation_examples(config.seed, config.eval_examples, config.edit_later)
    before = measure_prompts(policies, held_out, seed=config.seed)
    log(f"before: {json.dumps(before)}")

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed + 1)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    warmup = 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * s / config.steps)))
    per_mode = max(1, config.batch_size // len(MODES))
    model.train()
    for step in range(1, config.steps + 1):
        samples = [s for mode in MODES
                   for s in _samples(policies[mode], [sample_example(mode, rng, config.edit_later)
                                                      for _ in range(per_mode)])]
        scored = policies["closed"].log_probs(samples)
        loss = -(scored.log_probs.sum() / scored.mask.sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == config.steps:
            log(f"step {step}/{config.steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    model.eval()
    after = measure_prompts(policies, held_out, seed=config.seed)
    log(f"after: {json.dumps(after)}")
    metrics = {"before": before, "after": after, "parameters": sum(p.numel() for p in model.parameters()),
               "vocab_size": len(tokenizer), "seconds": round(time.time() - start, 1)}
    return model, processor, metrics


def save_policy(model: PreTrainedModel, processor: ProcessorMixin, directory: str | Path) -> Path:
    """Write the base model (safetensors) and the processor so that ``PromptPolicy.from_pretrained`` loads them."""
    directory = Path(directory)
    model.to("cpu").save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _parse_args(argv) -> tuple[Path, WarmStartConfig, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_POLICY_DIR, help="Folder for the warm-started policy.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    for f in fields(WarmStartConfig):
        default = getattr(WarmStartConfig, f.name)
        if isinstance(default, bool):
            parser.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=f.name)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=default, help=f.name)
    args = vars(parser.parse_args(argv))
    out, threads = args.pop("out"), args.pop("threads")
    return out, WarmStartConfig(**args), threads


def main(argv=None) -> None:
    out, config, threads = _parse_args(argv)
    torch.set_num_threads(threads)
    model, processor, metrics = warm_start(config)
    save_policy(model, processor, out)
    command = "python -m promptloop.miniworld.policy_warmstart " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / METRICS_NAME).write_text(json.dumps({"command": command.strip(), "config": asdict(config), **metrics},
                                               indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


__all__ = ["DEFAULT_POLICY_DIR", "METRICS_NAME", "MINIWORLD_SYSTEM_PROMPTS", "MODES", "PREVIEW_PIXELS",
           "WarmStartConfig", "build_policy_model", "caption_check", "make_policy_tokenizer", "measure_prompts",
           "miniworld_policy_config", "edited_prompt", "evaluation_examples", "rewrite_chain", "sample_example",
           "save_policy", "target_prompt", "warm_start"]

if __name__ == "__main__":
    main()
