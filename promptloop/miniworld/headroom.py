"""How much can rewriting gain over the query on a mini-world backbone? An oracle bound for one added word.

For each held-out query with room in its text budget, every single-word addition (a value of an attribute the
query leaves free) is sampled on ``2 * seeds_per_half`` fixed seeds next to the query itself. The oracle picks, per
query, the addition with the best training reward on the first half of the seeds and is scored on the second
half, so the choice is not judged on the noise it was chosen on. Also reported: each added word's mean effect.

``--at-step K`` adds the word at sampler step K instead of from the start (the query is in force before it): what
a closed-loop rewrite at step K can still change, the bound for a policy that acts part-way through sampling.

    python -m promptloop.miniworld.headroom [--queries 24] [--seeds-per-half 4] [--at-step K] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .domain import ATTRIBUTE_VALUES, MAX_CAPTION_WORDS, parse_caption
from .queries import heldout_queries

REWARDS = {"preference": "miniworld-preference", "gold": "miniworld-gold", "fidelity": "miniworld-fidelity"}


def single_word_variants(query: str) -> list[str]:
    """The query, then the query plus each value of each attribute it leaves free (if its budget has room)."""
    named = parse_caption(query)
    if len(query.split()) >= MAX_CAPTION_WORDS:
        return [query]
    return [query] + [f"{query} {value}" for attribute, values in ATTRIBUTE_VALUES.items() if attribute not in named
                      for value in values]


def measure(pipeline_dir: str | Path, queries: list[str], seeds_per_half: int = 4, steps: int = 10,
            guidance_scale: float = 2.0, at_step: int = 0, log=print) -> dict:
    from promptloop.backbones import RefinementSchedule, SamplerSettings, auto_backbone, rollout
    from promptloop.rewards import load_reward

    if not 0 <= at_step < steps:
        raise ValueError(f"at_step={at_step} must be in [0, {steps - 1}] for {steps} sampler steps.")
    backbone = auto_backbone(str(pipeline_dir))
    settings = SamplerSettings(num_inference_steps=steps, guidance_scale=guidance_scale)
    rewards = {name: load_reward(spec) for name, spec in REWARDS.items()}
    seeds = 2 * seeds_per_half
    base, oracle, effects = defaultdict(list), defaultdict(list), defaultdict(list)
    for query in queries:
        variants = single_word_variants(query)
        rows = [v for v in variants for _ in range(seeds)]
        row_seeds = [s for _ in variants for s in range(seeds)]
        if at_step == 0:
            out = rollout(backbone, [query] * len(rows), row_seeds, settings, initial_prompts=rows)
        else:
            out = rollout(backbone, [query] * len(rows), row_seeds, settings, RefinementSchedule.explicit([at_step]),
                          prompts=[[query, v] for v in rows])
        images = out.images
        scores = {name: reward(images, [query] * len(images)).scores.view(len(variants), seeds).numpy()
                  for name, reward in rewards.items()}
        choose, held = slice(0, seeds_per_half), slice(seeds_per_half, seeds)
        best = 1 + int(scores["preference"][1:, choose].mean(1).argmax()) if len(variants) > 1 else 0
        for name, table in scores.items():
            base[name].append(float(table[0, held].mean()))
            oracle[name].append(float(table[best, held].mean()))
        for i, variant in enumerate(variants[1:], 1):
            effects[variant.split()[-1]].append(float(scores["preference"][i].mean() - scores["preference"][0].mean()))
        log(f"{query!r}: {len(variants) - 1} additions, best {variants[best]!r}")
    return {
        "queries": len(queries), "seeds_per_half": seeds_per_half, "steps": steps, "guidance_scale": guidance_scale,
        "at_step": at_step,
        "base": {k: float(np.mean(v)) for k, v in base.items()},
        "oracle_one_word": {k: float(np.mean(v)) for k, v in oracle.items()},
        "word_effect_on_preference": {w: {"mean": float(np.mean(v)), "n": len(v)}
                                      for w, v in sorted(effects.items(), key=lambda kv: -np.mean(kv[1]))},
    }


def main(argv=None) -> dict:
    from .backbone import SHIPPED_BACKBONE_A

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=str(SHIPPED_BACKBONE_A), help="mini-world pipeline folder")
    parser.add_argument("--queries", type=int, default=24, help="held-out queries (miniworld:heldout)")
    parser.add_argument("--seeds-per-half", type=int, default=4)
    parser.add_argument("--at-step", type=int, default=0,
                        help="sampler step from which the added word is in force (0: from the start)")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    result = measure(args.pipeline, heldout_queries(args.queries), args.seeds_per_half, at_step=args.at_step)
    print(json.dumps({k: v for k, v in result.items() if k != "word_effect_on_preference"}, indent=2))
    print("mean effect of each added word on the training reward:",
          ", ".join(f"{w} {e['mean']:+.2f}" for w, e in result["word_effect_on_preference"].items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
