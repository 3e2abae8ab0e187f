"""Where the policy's decode time goes: raw ``generate`` of Qwen2.5-VL-3B shapes (random weights) at batch 8.

    python benchmarks/policy_decode.py --device cuda --dtype bf16 [--out FILE]

Times ``generate`` of 77 new tokens (a) text-only with no logits processors, (b) with the suppression list the
policy needs for a tokenizer smaller than the vocabulary, (c) with logits returned, (d) with a static KV cache
(``cache_implementation="static"``: on CUDA transformers compiles the decode step; the first call, which
compiles, is timed apart), and the policy's ``act`` on 8 observations with a 448 px preview each, with the
dynamic and the static cache (``PolicyConfig.cache_implementation``), one stream for the batch (training) and
row-seeded (``row_seeds``: the inference pipeline's). Prints ms per generated token and writes
JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from promptloop.backbones.types import Observation
from promptloop.policy import PolicyConfig, PromptPolicy
from promptloop.testing.tiny_vlm import make_tiny_vlm


def timed(fn, device):
    torch.cuda.synchronize() if device.startswith("cuda") else None
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize() if device.startswith("cuda") else None
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--scale", choices=["tiny", "full"], default="full")
    p.add_argument("--new-tokens", type=int, default=77)
    p.add_argument("--out", default="benchmarks/results/policy_decode.json")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model, processor = make_tiny_vlm("qwen2_5_vl", seed=0, max_pixels=448 ** 2)
    if args.scale == "full":
        sys.path.insert(0, str(Path(__file__).parent))
        from full_scale_models import qwen25_vl_3b

        model = qwen25_vl_3b(processor, args.device, dtype)
    model.to(args.device, dtype).eval()
    tok = processor.tokenizer
    tok.padding_side = "left"
    ids = tok(["rewrite this prompt: a red fox in a snowy forest at dawn, cinematic light"] * 8, return_tensors="pt",
              padding=True).to(args.device)
    vocab = model.config.get_text_config().vocab_size
    unknown = list(range(len(tok), vocab))
    n = args.new_tokens
    results = {}

    def gen(**kw):
        return model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=0, **kw)

    for name, kw in [("plain", {}), ("suppress_list", {"suppress_tokens": unknown}),
                     ("bad_words_mask_logits", {"output_logits": True, "return_dict_in_generate": True}),
                     ("static_cache", {"cache_implementation": "static"})]:
        first = timed(lambda: gen(**kw), args.device)  # warm-up (compiles, with the static cache on CUDA)
        s = timed(lambda: gen(**kw), args.device)
        results[name] = {"s": s, "ms_per_token": 1000 * s / n, "first_call_s": first}
        print(f"{name:24s} {1000 * s / n:7.2f} ms/token (first call {first:.1f} s)", flush=True)
    policy = PromptPolicy(model, processor, PolicyConfig(model_name_or_path="random", max_new_tokens=n,
                                                         max_pixels=448 ** 2, min_pixels=28 * 28))
    policy.suppressed_token_ids = sorted(set(policy.suppressed_token_ids) | set(unknown))
    preview = Image.new("RGB", (448, 448), (120, 90, 60))
    obs = [Observation(row=i, query="a red fox", prompt="a red fox", history=["a red fox"], preview=preview, step=10,
                       num_steps=50, refinement_index=0, num_refinements=5, noise_level=0.8) for i in range(8)]
    for cache in (None, "static"):
        policy.config.cache_implementation, policy.config.max_new_tokens = cache, n
        suffix = "" if cache is None else "_static_cache"
        first = timed(lambda: policy.act(obs, seed=0), args.device)
        s = timed(lambda: policy.act(obs, seed=0), args.device)
        results["policy_act_b8_448px" + suffix] = {"s": s, "first_call_s": first}
        rows = timed(lambda: policy.act(obs, row_seeds=range(len(obs))), args.device)
        results["policy_act_b8_448px_row_seeded" + suffix] = {"s": rows}
        policy.config.max_new_tokens = 1
        s1 = timed(lambda: policy.act(obs, seed=0), args.device)
        results["policy_act_b8_448px_1token" + suffix] = {"s": s1}
        print(f"policy.act batch 8, 448 px previews, {cache or 'dynamic'} cache: {s:.2f} s ({n} tokens), "
              f"{rows:.2f} s (row-seeded, as PromptLoopPipeline samples), {s1:.2f} s (1 token), "
              f"first call {first:.1f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "scale": args.scale, "results": results}, indent=2))


if __name__ == "__main__":
    main()
