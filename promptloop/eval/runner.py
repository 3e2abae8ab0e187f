"""``run_evaluation(config)``: every method on every backbone, scored by every reward, with fixed seeds."""
from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..backbones import Backbone, SamplerSettings, check_feedback_delay, load_backbone
from ..configuration import to_dict
from ..processes import process_state
from ..policy import PromptPolicy, PromptWriter, VLLMPromptPolicy
from ..policy.vllm_backend import import_vllm
from ..policy.writer import resolve_policy_config
from ..rewards import Reward, load_reward
from ..rewards.registry import check_reward_spec
from ..visualize import trajectory_strip
from .config import BackboneEntry, EvalConfig, MethodVariant, PolicySamplingSection
from .journal import BatchKey, EvalJournal, run_identity
from .methods import sample_batch
from .prompt_sets import load_prompt_set
from .report import write_report
from .results import PROMPT_METRICS, EvalResults, Sample, summarise, write_results
from .text_similarity import TextEmbedder, cosine_similarities, load_text_embedder

Log = Callable[[str], None]


def resolve_device(device: str, local_rank: int = 0, num_processes: int = 1) -> torch.device:
    """'auto' -> cuda when available, else cpu; under several processes, 'cuda' is this process's GPU."""
    resolved = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if resolved.type == "cuda" and resolved.index is None and num_processes > 1:
        return torch.device("cuda", local_rank)
    return resolved


def _looks_local(path: str) -> bool:
    """A path (not a hub id ``org/name``): absolute, relative with ./ or ../, ~, or more than one '/'."""
    return path.startswith(("/", "./", "../", "~", ".\\")) or path.count("/") > 1 or Path(path).exists()


def check_config(config: EvalConfig) -> list[MethodVariant]:
    """Errors that need no model: N_R and feedback delays against each backbone's steps, missing local paths,
    unknown rewards, a vLLM backend without vllm installed."""
    variants = config.method_variants()
    for label, reward in config.rewards.items():
        try:
            check_reward_spec(reward.spec)
        except ValueError as e:
            raise ValueError(f"rewards.{label}.spec: {e}") from e
    if config.policy_sampling.backend == "vllm":
        import_vllm()
    for label, backbone in config.backbones.items():
        if _looks_local(backbone.name_or_path) and not Path(backbone.name_or_path).expanduser().exists():
            raise ValueError(f"backbones.{label}.name_or_path {backbone.name_or_path!r} does not exist.")
        for v in variants:
            try:
                v.schedule.steps(backbone.num_inference_steps)
                check_feedback_delay(v.feedback_delay, [v.schedule], backbone.num_inference_steps)
            except ValueError as e:
                raise ValueError(f"method {v.label!r} on backbone {label!r}: {e}") from e
    for v in variants:
        if v.kind != "base" and _looks_local(v.policy) and not Path(v.policy).expanduser().exists():
            raise ValueError(f"methods.{v.method}.policy {v.policy!r} does not exist.")
    return variants


def sampler_settings(entry: BackboneEntry) -> SamplerSettings:
    return SamplerSettings(num_inference_steps=entry.num_inference_steps, guidance_scale=entry.guidance_scale,
                           negative_prompt=entry.negative_prompt, height=entry.height, width=entry.width,
                           preview_size=entry.preview_size)


class PolicyCache:
    """Each policy (path and revision) loaded once (adapter included; methods switch it off where asked), decoding
    settings replaced by the evaluation's. With the vLLM backend, policies on the same base model and preview sizes
    share one engine, started with LoRA enabled up to the largest rank among ``sources`` (the evaluation's
    ``(path, revision)`` pairs)."""

    def __init__(self, sampling: PolicySamplingSection, device: torch.device,
                 sources: Sequence[tuple[str, Optional[str]]] = ()):
        self.sampling, self.device = sampling, device
        self.policies: dict[tuple[str, Optional[str]], PromptWriter] = {}
        self.engines: dict[tuple, Any] = {}
        self.max_lora_rank = None
        if sampling.backend == "vllm":
            saved = [resolve_policy_config(path, revision=revision) for path, revision in sorted(set(sources),
                                                                                                 key=str)]
            self.max_lora_rank = max((config.lora_r for config, folder in saved if folder), default=None)

    def get(self, path: str, revision: Optional[str] = None) -> PromptWriter:
        if (path, revision) not in self.policies:
            policy = self._load(path, revision)
            overrides: dict[str, Any] = dict(do_sample=self.sampling.do_sample, temperature=self.sampling.temperature,
                                             top_p=self.sampling.top_p)
            if self.sampling.max_new_tokens is not None:
                overrides["max_new_tokens"] = self.sampling.max_new_tokens
            policy.config = dataclasses.replace(policy.config, **overrides)
            self.policies[(path, revision)] = policy
        return self.policies[(path, revision)]

    def _load(self, path: str, revision: Optional[str]) -> PromptWriter:
        if self.sampling.backend != "vllm":
            return PromptPolicy.from_pretrained(path, device=self.device, add_adapter=False, is_trainable=False,
                                                revision=revision)
        config, _ = resolve_policy_config(path, revision=revision)
        key = (config.model_name_or_path, config.model_revision, config.dtype, config.min_pixels, config.max_pixels)
        policy = VLLMPromptPolicy.from_pretrained(
            path, revision=revision, llm=self.engines.get(key), max_lora_rank=self.max_lora_rank,
            gpu_memory_utilization=self.sampling.vllm_gpu_memory_utilization)
        self.engines[key] = policy.llm
        return policy


def _policy_seed(seed: int, start: int) -> int:
    return seed * 1_000_003 + start


class _Evaluator:
    """Runs one backbone x method over the prompts and seeds; saves images and strips; measures; records each
    finished batch in the journal. Under several processes, process ``rank`` takes every ``num_processes``-th batch:
    each batch is made exactly as in one process (same prompts, seeds and policy seed), so the results do not
    depend on the number of processes. Batches in ``done`` (a resumed evaluation's) whose images are on disk are
    reused, not made again."""

    def __init__(self, config: EvalConfig, queries: list[str], rewards: dict[str, Reward], embedder: TextEmbedder,
                 out_dir: Path, log: Log, journal: EvalJournal, done: dict[BatchKey, list[Sample]], rank: int = 0,
                 num_processes: int = 1):
        self.config, self.queries, self.rewards, self.embedder = config, queries, rewards, embedder
        self.out_dir, self.log, self.journal, self.done = out_dir, log, journal, done
        self.rank, self.num_processes = rank, num_processes
        self.bar: Any = None
        """A tqdm bar advanced once per batch (made or reused), or None."""

    def batches(self, entry: BackboneEntry) -> list[tuple[int, int]]:
        """This process's batches on a backbone: (seed, index of the first prompt)."""
        starts = range(0, len(self.queries), entry.batch_size)
        return [(seed, start) for seed in self.config.seeds for start in starts][self.rank::self.num_processes]

    def _finished(self, key: BatchKey) -> Optional[list[Sample]]:
        samples = self.done.get(key)
        files = [self.out_dir / path for s in samples or [] for path in (s.image, s.strip) if path]
        return samples if samples and all(f.is_file() for f in files) else None

    def pending(self, backbone_label: str, entry: BackboneEntry, variant: MethodVariant) -> bool:
        """Whether this process has batches of ``variant`` on the backbone left to make."""
        return any(self._finished((backbone_label, variant.label, seed, start)) is None
                   for seed, start in self.batches(entry))

    def run(self, backbone_label: str, backbone: Optional[Backbone], entry: BackboneEntry, variant: MethodVariant,
            policy: Optional[PromptWriter]) -> list[Sample]:
        """This process's samples of ``variant`` on the backbone (``backbone`` and ``policy`` may be None when
        nothing is :meth:`pending`)."""
        settings = sampler_settings(entry)
        if self.config.warmup and self.pending(backbone_label, entry, variant):
            sample_batch(variant, backbone, policy, self.queries[:1], [self.config.seeds[0]], settings, 0)
        folder = Path("images") / backbone_label / variant.folder_name
        strip_folder = Path("strips") / backbone_label / variant.folder_name
        (self.out_dir / folder).mkdir(parents=True, exist_ok=True)
        samples = []
        last_start = range(0, len(self.queries), entry.batch_size)[-1]
        for seed, start in self.batches(entry):
            key = (backbone_label, variant.label, seed, start)
            batch = self._finished(key)
            if batch is None:
                queries = self.queries[start:start + entry.batch_size]
                began = time.perf_counter()
                out = sample_batch(variant, backbone, policy, queries, [seed] * len(queries), settings,
                                   _policy_seed(seed, start))
                per_image = (time.perf_counter() - began) / len(queries)
                batch = self._measure(backbone_label, variant, out, queries, start, seed, per_image, folder,
                                      strip_folder)
                self.journal.record(key, batch)
            samples += batch
            if self.bar is not None:
                self.bar.update(1)
            if start == last_start:
                self.log(f"  {backbone_label} / {variant.label}: seed {seed} done")
        return samples

    def _measure(self, backbone_label, variant, out, queries, start, seed, per_image, folder, strip_folder):
        images = out.pil()
        finals = [t.prompts[-1] for t in out.trajectories]
        rewards = {label: reward(out.images, queries).scores.tolist() for label, reward in self.rewards.items()}
        similarity = cosine_similarities(self.embedder, queries, finals)
        samples = []
        for i, (image, trajectory) in enumerate(zip(images, out.trajectories)):
            index = start + i
            image_path = folder / f"p{index:04d}_s{seed}.png"
            image.save(self.out_dir / image_path)
            strip_path = None
            if variant.kind != "base" and index < self.config.output.strips and seed == self.config.seeds[0]:
                strip_path = strip_folder / f"p{index:04d}_s{seed}.png"
                (self.out_dir / strip_folder).mkdir(parents=True, exist_ok=True)
                trajectory_strip(trajectory, image, tile=128).save(self.out_dir / strip_path)
            metrics = {f"reward/{label}": scores[i] for label, scores in rewards.items()}
            metrics.update(prompt_words=float(len(finals[i].split())), drift=1.0 - similarity[i],
                           seconds_per_image=per_image)
            samples.append(Sample(
                backbone=backbone_label, method=variant.label, prompt_index=index, seed=seed, query=queries[i],
                final_prompt=finals[i], prompts=list(trajectory.prompts),
                decision_steps=list(trajectory.decision_steps), image=image_path.as_posix(),
                strip=strip_path.as_posix() if strip_path else None, metrics=metrics,
            ))
        return samples


def run_evaluation(config: EvalConfig, queries: Optional[Sequence[str]] = None,
                   log: Optional[Log] = print, resume: bool = False,
                   identity: Optional[dict[str, Any]] = None) -> EvalResults:
    """Evaluate, write results.json / samples.csv / summary.csv / results.md (and report.html) into
    ``config.output.output_dir``, and return the results.

    ``queries`` (default: loaded from ``config.prompts``) are the prompts. Cheap checks run first (prompt set, N_R
    against steps, local paths), then rewards and the text embedder load once, then each backbone in turn (freed
    before the next) with every method; policies load once per path. Every finished batch is journaled:
    ``resume`` continues an interrupted evaluation of the same config and prompts (:mod:`.journal`), making only
    the batches it had not finished. ``identity``: :func:`~.journal.run_identity` of ``config`` and ``queries`` when
    already computed (it hashes the models' files).
    """
    state = process_state()
    main = state.is_main_process
    log = log if log and main else (lambda message: None)
    if queries is None:
        queries = load_prompt_set(config.prompts.source, config.prompts.column, config.prompts.limit)
    queries = list(queries)
    variants = check_config(config)
    if state.num_processes > 1 and config.policy_sampling.backend == "vllm":
        raise ValueError(f"policy_sampling.backend='vllm' runs in one process; this evaluation has "
                         f"{state.num_processes}. Use backend 'transformers' under accelerate launch.")
    device = resolve_device(config.device, state.local_process_index, state.num_processes)
    out_dir = Path(config.output.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    journal = EvalJournal(out_dir, state.process_index)
    identity = identity or run_identity(config, queries)
    done = journal.resume(identity) if resume else {}
    if not resume and main:
        journal.begin(identity)
    state.wait_for_everyone()
    if resume:
        log(f"resuming: {len(done)} finished batch(es) found in {journal.folder}")
    log(f"{len(queries)} prompts x {len(config.seeds)} seeds; {len(config.backbones)} backbone(s) x "
        f"{len(variants)} method(s): {[v.label for v in variants]}")
    rewards = {label: load_reward(entry.spec, device=entry.device or device, **entry.kwargs)
               for label, entry in config.rewards.items()}
    embedder = load_text_embedder(config.text_embedder, device=device)
    policies = PolicyCache(config.policy_sampling, device,
                           [(v.policy, v.policy_revision) for v in variants if v.kind != "base"])
    evaluator = _Evaluator(config, queries, rewards, embedder, out_dir, log, journal, done, state.process_index,
                           state.num_processes)
    from tqdm.auto import tqdm

    evaluator.bar = tqdm(total=sum(len(evaluator.batches(entry)) for entry in config.backbones.values()) * len(
        variants), desc="eval", unit="batch", disable=not (main and config.progress))
    samples: list[Sample] = []
    for label, entry in config.backbones.items():
        todo = [v for v in variants if evaluator.pending(label, entry, v)]
        backbone = load_backbone(entry.name_or_path, entry.dtype, device, revision=entry.revision,
                                 variant=entry.variant) if todo else None
        for variant in variants:
            policy = policies.get(variant.policy, variant.policy_revision) if variant in todo and \
                variant.kind != "base" else None
            samples += evaluator.run(label, backbone, entry, variant, policy)
        del backbone
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    evaluator.bar.close()
    if state.num_processes > 1:
        samples = _gather_samples(journal, state, list(config.backbones), [v.label for v in variants],
                                  list(config.seeds))
    results = EvalResults(
        config=to_dict(config), prompt_set={"source": config.prompts.source, "num_prompts": len(queries)},
        seeds=list(config.seeds), baseline=config.baseline, confidence=config.confidence,
        metrics=[f"reward/{label}" for label in config.rewards] + list(PROMPT_METRICS),
        backbones=list(config.backbones), methods=[dataclasses.asdict(v) for v in variants], samples=samples,
    )
    summarise(results)
    if main:
        paths = write_results(results, out_dir)
        if config.output.html:
            paths["html"] = write_report(results, out_dir, config.output.embed_images, config.output.grid_prompts)
        log("wrote " + ", ".join(str(p) for p in paths.values()))
        journal.remove()
    state.wait_for_everyone()
    return results


def _gather_samples(journal: EvalJournal, state, backbones: list[str], methods: list[str],
                    seeds: list[int]) -> list[Sample]:
    """Every process's samples, read from the journal once all have finished, in the order one process makes them
    (backbone, method, seed, prompt)."""
    state.wait_for_everyone()
    everyone = [sample for batch in journal.batches().values() for sample in batch]
    return sorted(everyone, key=lambda x: (backbones.index(x.backbone), methods.index(x.method),
                                           seeds.index(x.seed), x.prompt_index))


__all__ = ["PolicyCache", "check_config", "resolve_device", "run_evaluation", "sampler_settings"]
