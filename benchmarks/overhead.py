"""Cost of PromptLoop against plain sampling, by number of refinements N_R (closed loop and a-priori).

Prints a table and writes JSON. Scales:
  tiny  - tiny random SDXL pipeline + tiny Qwen2.5-VL policy (CPU smoke test of this script; numbers mean little)
  miniworld - the shipped mini-world backbone A (Stable Diffusion classes, 32 px) and warm-started tiny
          Qwen2.5-VL policy, with the mini world's policy settings (112 px previews, 48 new tokens at most; the
          policy stops at its own EOS): the CPU benchmark of a trained backbone and policy
  full  - SDXL-base-1.0 and Qwen2.5-VL-3B shapes with random weights (GPU; the paper's Table 4 setting:
          1024 px, 50 steps, batch 8). Random weights never emit EOS, so every refinement decodes the full
          max_new_tokens (77 by default, the CLIP budget): an upper bound on the policy's decode cost.

    python benchmarks/overhead.py --scale tiny
    python benchmarks/overhead.py --scale miniworld
    python benchmarks/overhead.py --scale full --device cuda --dtype bf16 --clip-tokenizer DIR
    python benchmarks/overhead.py --scale miniworld --modes plain,closed,pipelined --feedback-delay 1
    python benchmarks/overhead.py --scale full --device cuda --dtype bf16 --policy-backend vllm   # pip install vllm

Times are medians over --repeats runs (one warm-up run per mode first); "per image" divides a batch's wall time by
its size.
The policy's prefill/decode split is measured by re-running each policy call with max_new_tokens=1 (outside
the timed run): prefill ~ that call, decode = the full call - prefill. With ``--policy-backend vllm`` the policy (saved
to a folder first at the tiny and full scales) is served by vLLM in its own process: ``peak_mem_gib`` then leaves out
vLLM's share of the GPU (``--vllm-memory``).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from promptloop.backbones import RefinementSchedule, SamplerSettings, auto_backbone, check_feedback_delay, rollout
from promptloop.backbones.types import Observation
from promptloop.pipeline import apriori_prompts
from promptloop.policy import PolicyConfig, PromptPolicy, PromptWriter, VLLMPromptPolicy
from promptloop.testing.tiny_vlm import make_tiny_vlm

QUERIES = [
    "a red fox in a snowy forest at dawn", "a bowl of ramen on a wooden table", "an astronaut riding a horse",
    "a lighthouse on a cliff during a storm", "a watercolor painting of a city street", "a cat wearing a tiny hat",
    "a futuristic car parked in the desert", "a portrait of an old fisherman",
]
MINIWORLD_QUERIES = ["red circle", "big blue square top", "triangle left white", "green small bottom center",
                     "yellow", "purple square black", "orange big middle right", "circle gray"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):  # the calling thread's stream: a pipelined policy call runs on its own
        torch.cuda.current_stream().synchronize()


def build_miniworld(args):
    from diffusers import StableDiffusionPipeline

    from promptloop.miniworld.backbone import SHIPPED_BACKBONE_A
    from promptloop.miniworld.policy_warmstart import DEFAULT_POLICY_DIR, miniworld_policy_config

    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_BACKBONE_A).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    config = miniworld_policy_config("closed", max_new_tokens=args.max_new_tokens)
    policy = None
    if args.policy_backend == "transformers" or scores_answers(args):
        policy = PromptPolicy.from_pretrained(DEFAULT_POLICY_DIR, config, device=args.device)
    if args.policy_backend == "vllm":
        served = VLLMPromptPolicy.from_pretrained(DEFAULT_POLICY_DIR, config, gpu_memory_utilization=args.vllm_memory)
        return pipe, served, policy
    return pipe, policy, None


def scores_answers(args) -> bool:
    """Training rollouts with vLLM also score the answers with the transformers policy: kept for the train rows."""
    return args.policy_backend == "vllm" and "train" in args.modes.split(",")


def served_by_vllm(policy: PromptPolicy, args) -> tuple[VLLMPromptPolicy, Optional[PromptPolicy]]:
    """The same (random-weight) policy saved to a folder and served by vLLM, and the transformers copy where the
    train rows score answers with it (else freed before vLLM starts)."""
    folder = Path(args.policy_dir or tempfile.mkdtemp(prefix="overhead_policy_"))
    policy.base_model.save_pretrained(folder)
    policy.processor.save_pretrained(folder)
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype]
    config = dataclasses.replace(policy.config, model_name_or_path=str(folder), dtype=dtype)
    suppressed = policy.suppressed_token_ids
    scorer = policy if scores_answers(args) else None
    del policy
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    served = VLLMPromptPolicy.from_pretrained(folder, config, gpu_memory_utilization=args.vllm_memory)
    served.suppressed_token_ids = suppressed
    return served, scorer


def build(args):
    if args.scale == "miniworld":
        return build_miniworld(args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, processor = make_tiny_vlm("qwen2_5_vl", seed=0, max_pixels=args.preview_size ** 2)
    if args.scale == "full":
        sys.path.insert(0, str(Path(__file__).parent))
        from full_scale_models import qwen25_vl_3b, sdxl_pipeline
        from transformers import CLIPTokenizer

        from promptloop.testing.tokenizers import make_real_clip_tokenizer

        clip_tok = CLIPTokenizer.from_pretrained(args.clip_tokenizer) if args.clip_tokenizer \
            else make_real_clip_tokenizer()
        pipe = sdxl_pipeline(clip_tok, args.device, dtype)
        model = qwen25_vl_3b(processor, args.device, dtype)
    else:
        from promptloop.testing.tiny_pipelines import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline(seed=0).to(args.device, dtype)
        model.to(args.device, dtype).eval()
    config = PolicyConfig(model_name_or_path="random", max_new_tokens=args.max_new_tokens, temperature=1.0,
                          top_p=1.0, max_pixels=args.preview_size ** 2, min_pixels=28 * 28)
    policy = PromptPolicy(model, processor, config)
    # ids the small tokenizer lacks (the full-size vocabulary is larger) must never be sampled
    vocab = model.config.get_text_config().vocab_size
    policy.suppressed_token_ids = sorted(set(policy.suppressed_token_ids) | set(range(len(processor.tokenizer), vocab)))
    if args.policy_backend == "vllm":
        return (pipe, *served_by_vllm(policy, args))
    return pipe, policy, None


class TimedRefiner:
    """The policy as a RefineFn, timing each call and (untimed) its prefill share; with ``scorer`` (vLLM training
    rollouts) each call's answers are also scored by the transformers policy, timed apart. With ``image_seeds``
    each row samples from its own stream, as ``PromptLoopPipeline`` does; without, a call's rows share one, as in
    training."""

    def __init__(self, policy: PromptWriter, device: str, split: bool, scorer: Optional[PromptPolicy] = None,
                 image_seeds: Optional[list[int]] = None):
        self.policy, self.device, self.split, self.scorer = policy, device, split, scorer
        self.image_seeds = image_seeds
        self.calls = 0
        self.policy_s = 0.0
        self.prefill_s = 0.0
        self.score_s = 0.0

    def _act(self, observations: list[Observation]):
        if self.image_seeds is None:
            return self.policy.act(observations)
        return self.policy.act_per_image(observations, self.image_seeds, seed=0)

    def __call__(self, observations: list[Observation]) -> list[str]:
        _sync(self.device)
        t0 = time.perf_counter()
        actions = self._act(observations)
        _sync(self.device)
        self.policy_s += time.perf_counter() - t0
        self.calls += 1
        if self.scorer is not None:
            t0 = time.perf_counter()
            self.scorer.score_answers(observations, actions.answer_token_ids)
            _sync(self.device)
            self.score_s += time.perf_counter() - t0
        if self.split:
            self.prefill_s += self._prefill_time(observations)
        return actions.prompts

    def _prefill_time(self, observations: list[Observation]) -> float:
        full = self.policy.config.max_new_tokens
        self.policy.config.max_new_tokens = 1
        try:
            _sync(self.device)
            t0 = time.perf_counter()
            self._act(observations)
            _sync(self.device)
            return time.perf_counter() - t0
        finally:
            self.policy.config.max_new_tokens = full


def run_case(args, pipe, backbone, policy, mode: str, n_r: int, settings: SamplerSettings, split: bool,
             scorer: Optional[PromptPolicy] = None) -> dict:
    """One timed batch. ``mode``: plain (stock pipe call), loop (rollout), closed, pipelined (closed with
    ``--feedback-delay``), apriori, train (with ``scorer``: vLLM's answers scored as in training)."""
    batch = args.batch
    pool = MINIWORLD_QUERIES if args.scale == "miniworld" else QUERIES
    queries = (pool * (batch // len(pool) + 1))[:batch]
    seeds = list(range(batch))
    refiner = TimedRefiner(policy, args.device, split, scorer if mode == "train" else None,
                           image_seeds=None if mode == "train" else seeds)
    apriori_s = 0.0
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(args.device)
    t0 = time.perf_counter()
    times = None
    if mode == "plain":
        gens = [torch.Generator(args.device).manual_seed(s) for s in seeds]
        pipe(queries, num_inference_steps=settings.num_inference_steps, height=settings.height,
             width=settings.width, generator=gens, output_type="pt")
    elif mode == "apriori":
        t1 = time.perf_counter()
        prompts = apriori_prompts(policy, queries, n_r, settings.num_inference_steps, seed=0, image_seeds=seeds)
        _sync(args.device)
        apriori_s = time.perf_counter() - t1
        out = rollout(backbone, queries, seeds, settings, RefinementSchedule.uniform(n_r), prompts=prompts)
        times = out.times
    else:
        if mode == "train":
            schedule = [RefinementSchedule.random(n_r, seed=1000 + i) for i in range(batch)]
        else:
            schedule = RefinementSchedule.uniform(n_r) if n_r else RefinementSchedule.none()
        delay = args.feedback_delay if mode == "pipelined" else 0
        out = rollout(backbone, queries, seeds, settings, schedule, refine=refiner if n_r else None,
                      feedback_delay=delay)
        times = out.times
    _sync(args.device)
    total = time.perf_counter() - t0
    row = {"mode": mode, "n_r": n_r, "batch": batch, "total_s": total, "per_image_s": total / batch,
           "policy_calls": refiner.calls + (1 if mode == "apriori" else 0)}
    if times is not None:
        row.update({f"{k}_s": v for k, v in times.as_dict().items()})
    policy_s = refiner.policy_s + apriori_s
    row["policy_s"] = policy_s
    if refiner.scorer is not None:
        row["policy_score_s"] = refiner.score_s
    if split and refiner.calls:
        row["policy_prefill_s"] = refiner.prefill_s
        row["policy_decode_s"] = max(refiner.policy_s - refiner.prefill_s, 0.0)
    if args.device.startswith("cuda"):
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def median_row(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, float):
            out[k] = statistics.median(r[k] for r in rows)
    out["repeats"] = len(rows)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["tiny", "miniworld", "full"], default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 50 full, 10 tiny and miniworld)")
    p.add_argument("--size", type=int, default=None, help="image side (default: 1024 full, 64 tiny, 32 miniworld)")
    p.add_argument("--preview-size", type=int, default=None,
                   help="longest side of the x0 preview the policy sees (default 448; 32 miniworld: the image)")
    p.add_argument("--refinements", default="0,1,3,5")
    p.add_argument("--train-refinements", default="5", help="N_R values of the training-rollout cases")
    p.add_argument("--max-new-tokens", type=int, default=None, help="policy answer cap (default 77; 48 miniworld)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default="plain,loop,closed,apriori,train",
                   help="comma-separated cases: plain, loop, closed, pipelined, apriori, train")
    p.add_argument("--feedback-delay", type=int, default=1, help="sampler steps a pipelined policy call overlaps")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up runs (when time is short)")
    p.add_argument("--no-split", action="store_true", help="skip the prefill/decode split (saves time)")
    p.add_argument("--policy-backend", choices=["transformers", "vllm"], default="transformers",
                   help="what samples the policy's answers (vllm: `pip install vllm`, CUDA)")
    p.add_argument("--vllm-memory", type=float, default=0.35,
                   help="--policy-backend vllm: share of the GPU vLLM reserves (weights + KV cache)")
    p.add_argument("--policy-dir", default=None,
                   help="--policy-backend vllm, tiny/full scales: folder the random policy is saved to (default: temp)")
    p.add_argument("--clip-tokenizer", default=None, help="saved real CLIP tokenizer (full scale, offline GPU)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/overhead_<scale>.json)")
    args = p.parse_args(argv)
    steps = args.steps or (50 if args.scale == "full" else 10)
    size = args.size or {"full": 1024, "tiny": 64, "miniworld": 32}[args.scale]
    args.preview_size = args.preview_size or (32 if args.scale == "miniworld" else 448)
    args.max_new_tokens = args.max_new_tokens or (48 if args.scale == "miniworld" else 77)
    refinements = [int(x) for x in args.refinements.split(",")]
    modes = args.modes.split(",")
    train_refinements = [int(x) for x in args.train_refinements.split(",")]

    t0 = time.perf_counter()
    pipe, policy, scorer = build(args)
    backbone = auto_backbone(pipe)
    build_s = time.perf_counter() - t0
    settings = SamplerSettings(num_inference_steps=steps, height=size, width=size, preview_size=args.preview_size)

    cases = [("plain", 0)] if "plain" in modes else []
    cases += [("loop", 0)] if "loop" in modes else []
    for n in refinements:
        if n == 0:
            continue
        cases += [(m, n) for m in ("closed", "apriori") if m in modes]
        if "pipelined" in modes:
            try:
                check_feedback_delay(args.feedback_delay, [RefinementSchedule.uniform(n)], steps)
                cases.append(("pipelined", n))
            except ValueError as error:
                print(f"  pipelined N_R={n} skipped: {error}")
    if "train" in modes:
        cases += [("train", n) for n in train_refinements]
    results = []
    out = Path(args.out or Path(__file__).parent / "results" / f"overhead_{args.scale}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "scale": args.scale, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "dtype": args.dtype, "policy_backend": args.policy_backend, "batch": args.batch, "steps": steps, "size": size,
        "preview_size": args.preview_size,
        "max_new_tokens": args.max_new_tokens, "build_s": build_s, "torch": torch.__version__,
        "command": "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results,
    }
    # by the time training rollouts run, every kernel is warm
    warmed = {"train", "plain", "loop", "closed", "pipelined", "apriori"} if args.no_warmup else {"train"}
    for mode, n in cases:
        if mode not in warmed:  # one warm-up per mode (first use of its kernels and caches)
            run_case(args, pipe, backbone, policy, mode, n, settings, split=False, scorer=scorer)
            warmed.add(mode)
        rows = [run_case(args, pipe, backbone, policy, mode, n, settings, split=False, scorer=scorer)
                for _ in range(args.repeats)]
        merged = median_row(rows)
        if mode == "closed" and not args.no_split:  # an extra, untimed run: the split calls inflate its total
            split = run_case(args, pipe, backbone, policy, mode, n, settings, split=True)
            merged["policy_prefill_s"] = split["policy_prefill_s"]
            merged["policy_decode_s"] = split["policy_decode_s"]
        results.append(merged)
        base = next((r for r in results if r["mode"] == "plain"), None) or results[0]
        for r in results:
            r["ratio_to_plain"] = r["per_image_s"] / base["per_image_s"]
        out.write_text(json.dumps(report, indent=2))  # after every case: a killed run keeps what it measured
        print(f"  {mode:8s} N_R={n}: {merged['per_image_s']:.3f} s/image", flush=True)
    cols = ["mode", "n_r", "per_image_s", "ratio_to_plain", "denoise_s", "preview_s", "refine_s",
            "policy_prefill_s", "policy_decode_s", "encode_s", "decode_s", "policy_calls", "peak_mem_gib"]
    if scorer is not None:
        cols.insert(9, "policy_score_s")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        print("| " + " | ".join(cells) + " |")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
