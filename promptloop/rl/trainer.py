"""GRPO training of the refinement policy, on accelerate.

One training step: take this process's share of queries, sample G trajectories per query through the frozen
backbone (the policy rewrites the prompt at N_R random steps while looking at x0 previews; or, for the baselines,
with the previews withheld or once before sampling), score the final images
against the original queries, turn rewards into group-relative advantages, then update the LoRA adapter with the
clipped surrogate over every refinement action (each action carries its trajectory's advantage).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ..backbones import Backbone, RefinementSchedule, SamplerSettings, blind_observations, rollout, withhold_preview
from ..backbones.types import Observation, RefineFn, RolloutOutput, Trajectory
from ..configuration import to_dict
from ..policy import PolicySample, PromptPolicy
from ..policy.config import LoopDefaults
from ..policy.hub import TrainingSummary, check_hub_token, policy_model_card, push_policy_folder
from ..policy.vllm_backend import VLLMPromptPolicy, import_vllm
from ..processes import launched_without_cuda
from ..rewards.async_worker import AsyncRewardWorker
from ..visualize import stack_rows, trajectory_strip
from .advantages import group_advantages
from .callbacks import TrainerCallback
from .checkpoint import (
    checkpoints_after,
    load_tensors,
    push_checkpoint,
    read_meta,
    remove_checkpoints,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_folder_atomically,
)
from .config import DerivedSizes, TrainConfig, derive_sizes
from .data import QueryStream
from .loss import grpo_loss
from .sharding import (
    full_adapter_state, is_fully_sharded, load_adapter_state, load_optimizer_state, optimizer_state, whole_parameters,
)

RewardFn = Callable[..., Any]
"""``reward(images, queries, metadata) -> RewardOutput`` (see :mod:`promptloop.rewards`); ``metadata[i]`` holds
the final prompt (``"prompt"``) and every prompt in force (``"prompts"``) of trajectory i."""


METRICS_LOG = "metrics.jsonl"
"""The run folder's log of every training step's metrics (one JSON object per line, with its "step"; written by the
main process, as the trackers are): what TensorBoard shows, for scripts."""

POLICY_DIR = "policy"
"""Where in the run folder the trained policy (with its model card) is written when training completes."""


class RatioCheckError(RuntimeError):
    """The first on-policy micro-batch had a ratio far from 1: training and sampling log-probs disagree."""


class NonFiniteRolloutError(FloatingPointError):
    """Rollouts produced NaN/inf latents in more consecutive steps than ``grpo.nonfinite_rollout_limit``."""


@dataclass
class Action:
    """One refinement action: what the policy saw and wrote, and the log-probs it sampled with."""

    trajectory: int
    refinement_index: int
    sample: PolicySample
    sampling_logps: torch.Tensor
    """``(C,)`` float32 log-probs of the completion tokens at sampling time (the behaviour policy)."""
    kept_previous: bool
    advantage: float = 0.0
    old_logps: Optional[torch.Tensor] = None
    """Old-policy log-probs recomputed by a training-shaped forward (``grpo.old_logprobs``); else sampling's."""


@dataclass
class RolloutBatch:
    queries: list[str]
    group_ids: torch.Tensor
    trajectories: list[Trajectory]
    images: list
    actions: list[Action]
    rewards: torch.Tensor
    reward_details: list[dict[str, Any]]
    times: dict[str, float] = field(default_factory=dict)
    reward_failures: int = 0
    """Items whose reward call raised or timed out (their reward is NaN: dropped from the advantages)."""


class _ActionRecorder:
    """A RefineFn that samples from the policy (or from ``engine``, the answers then scored by the policy) and keeps
    every action for the update."""

    def __init__(self, policy: PromptPolicy, row_offset: int, generator: torch.Generator,
                 engine: Optional[VLLMPromptPolicy] = None):
        self.policy, self.row_offset, self.generator, self.engine = policy, row_offset, generator, engine
        self.actions: list[Action] = []

    def __call__(self, observations: list[Observation]) -> list[str]:
        if self.engine is None:
            out = self.policy.act(observations, generator=self.generator)
        else:
            answers = self.engine.act(observations, generator=self.generator).answer_token_ids
            out = self.policy.score_answers(observations, answers)
        for j, obs in enumerate(observations):
            mask = out.completion_mask[j]
            self.actions.append(Action(
                trajectory=self.row_offset + obs.row, refinement_index=obs.refinement_index, sample=out.samples[j],
                sampling_logps=out.log_probs[j][mask].float().cpu(), kept_previous=out.kept_previous[j],
            ))
        return out.prompts


def make_accelerator(config: TrainConfig):
    """The run's ``accelerate.Accelerator`` (on the CPU, with gloo, for processes launched on a machine without
    CUDA: :func:`~promptloop.processes.launched_without_cuda`)."""
    from accelerate import Accelerator

    accelerator = Accelerator(
        cpu=launched_without_cuda(),
        log_with=None if config.logging.report_to in ("none", ["none"]) else config.logging.report_to,
        project_dir=config.logging.output_dir,
    )
    check_sharding(accelerator, config)
    return accelerator


def check_sharding(accelerator, config: TrainConfig) -> None:
    """FSDP runs as FSDP2 (``fully_shard``, :mod:`promptloop.rl.sharding`), without vLLM rollouts; FSDP1 and
    DeepSpeed are refused before any model loads."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # accelerate's DeepSpeed engine steps the optimizer inside backward at every micro-batch here (no
        # gradient_accumulation boundary), clips inside the engine and partitions the optimizer state across
        # processes: the update's NaN skipping, its accumulation and the checkpoints would all be wrong.
        raise ValueError("The trainer does not run under DeepSpeed. Shard the policy with FSDP2 "
                         "(configs/accelerate/fsdp.yaml, ZeRO-3's sharding) or replicate it with DDP "
                         "(configs/accelerate/ddp.yaml).")
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if not accelerator.is_fsdp2:
        raise ValueError("The accelerate config asks for FSDP1; the trainer runs FSDP2 (fully_shard): set "
                         "`fsdp_version: 2` under fsdp_config (as configs/accelerate/fsdp.yaml does).")
    if config.grpo.rollout_backend == "vllm":
        raise ValueError("grpo.rollout_backend='vllm' runs in one process without FSDP; use an accelerate config "
                         "without FSDP (or none), or grpo.rollout_backend='transformers'.")


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the learning rate for the optimizer step that follows ``step`` completed ones: a linear warm-up
    reaching 1 at step ``warmup_steps``, then 1 (``constant``) or a decay to 0 at ``total_steps`` (``linear``,
    ``cosine``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler_type={kind!r} is not one of 'constant', 'linear', 'cosine'")


def reward_metadata(trajectories: Sequence[Trajectory]) -> list[dict[str, Any]]:
    """What a reward may read besides the image and the query: the final prompt and every prompt in force."""
    return [{"prompt": t.prompts[-1], "prompts": list(t.prompts)} for t in trajectories]


def held_out_queries(config: TrainConfig, eval_queries: Optional[Sequence[str]]) -> list[str]:
    """The first ``data.num_eval_prompts`` held-out queries; none while ``logging.eval_every`` asks for evaluations
    is an error naming the keys."""
    queries = list(eval_queries or [])[: config.data.num_eval_prompts]
    if config.logging.eval_every and not queries:
        raise ValueError(f"logging.eval_every={config.logging.eval_every} evaluates on held-out queries, but there "
                         "are none: give data.eval_prompts (and data.num_eval_prompts > 0), or set "
                         "logging.eval_every 0.")
    return queries


def training_queries(config: TrainConfig) -> tuple[list[str], list[str]]:
    """The training and held-out queries; also checks the reward spec names known rewards. Cheap (no model loads):
    ``promptloop train`` calls it first, so a missing prompt file or an unknown reward fails at once."""
    from ..rewards.registry import check_reward_spec
    from .data import load_queries

    try:
        check_reward_spec(config.reward.spec)
    except ValueError as e:
        raise ValueError(f"reward.spec: {e}") from e
    queries = load_queries(config.data.prompts, config.data.column)
    eval_queries = load_queries(config.data.eval_prompts, config.data.column) if config.data.eval_prompts else None
    return queries, held_out_queries(config, eval_queries)


def _step_seed(*parts: int) -> int:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**31 - 1)
    return seed


@contextlib.contextmanager
def _forward_through(policy: PromptPolicy, module: torch.nn.Module) -> Iterator[None]:
    """Run the policy's forwards through ``module`` (the accelerate-prepared model, so DDP/FSDP hooks fire)."""
    original = policy.model
    policy.model = module
    try:
        yield
    finally:
        policy.model = original


class _LossStats:
    """The update's loss metrics over one training step: token-weighted means over the micro-batches that hold valid
    tokens (one without any describes nothing), true extremes of the ratio, and per optimizer step the loss (the
    sum of its micro-batches' losses) and the gradient norm."""

    _EXTREMES = {"losses/ratio_max": max, "losses/ratio_min": min}

    def __init__(self) -> None:
        self.weighted: dict[str, float] = {}
        self.extremes: dict[str, float] = {}
        self.tokens = 0
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def add(self, metrics: dict[str, float], mask: torch.Tensor, entropy: Optional[torch.Tensor]) -> None:
        tokens = int(mask.sum())
        if not tokens:
            return
        self.tokens += tokens
        for key, value in metrics.items():
            if key in self._EXTREMES:
                self.extremes[key] = self._EXTREMES[key](self.extremes.get(key, value), value)
            else:
                self.weighted[key] = self.weighted.get(key, 0.0) + value * tokens
        if entropy is not None:
            self.weighted["policy/entropy"] = self.weighted.get("policy/entropy", 0.0) + float(entropy[mask].sum())

    def optimizer_step(self, loss: float, grad_norm: Optional[torch.Tensor]) -> None:
        self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(float(grad_norm))

    def metrics(self) -> dict[str, float]:
        out = {key: value / self.tokens for key, value in self.weighted.items()}
        out.update(self.extremes)
        if self.losses:
            out["losses/loss"] = sum(self.losses) / len(self.losses)
        if self.grad_norms:
            out["train/grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        return out


class GRPOTrainer:
    """GRPO for a :class:`PromptPolicy` over a frozen :class:`Backbone` and a reward.

    ``accelerator`` defaults to a fresh ``accelerate.Accelerator`` with the configured tracker. The policy's LoRA
    parameters are the only trainable ones. ``callbacks``: :class:`~promptloop.rl.callbacks.TrainerCallback`
    instances, called at the start, after each step and checkpoint, and at the end; they may stop training.
    """

    def __init__(self, config: TrainConfig, policy: PromptPolicy, backbone: Backbone, reward: RewardFn,
                 queries: Sequence[str], eval_queries: Optional[Sequence[str]] = None, accelerator=None,
                 callbacks: Sequence[TrainerCallback] = ()):
        self.config = config
        self.callbacks = list(callbacks)
        self.should_stop = False
        """Set by a callback to end training after the current step (see :mod:`promptloop.rl.callbacks`)."""
        self.terminated = False
        """A SIGTERM arrived during :meth:`train`: it stopped after that step with a checkpoint, no final policy."""
        self.accelerator = accelerator or make_accelerator(config)
        check_sharding(self.accelerator, config)
        self.sizes: DerivedSizes = derive_sizes(config.grpo, self.accelerator.num_processes)
        self.policy = policy
        # saved with every checkpoint's and the final policy: inference then runs as trained unless told otherwise
        policy.loop_defaults = LoopDefaults(config.grpo.num_refinements, config.grpo.initial_rewrite)
        self.backbone = backbone
        self.reward = reward
        self.stream = QueryStream(list(queries), seed=config.grpo.seed, shuffle=config.data.shuffle)
        self.eval_queries = held_out_queries(config, eval_queries)
        self.run_dir = Path(config.logging.output_dir)
        self.step = 0
        params = policy.trainable_parameters()
        if not params:
            raise ValueError("The policy has no trainable parameters: load it with a LoRA adapter "
                             "(PromptPolicy.from_pretrained(..., add_adapter=True)).")
        optimizer = torch.optim.AdamW(params, lr=config.grpo.learning_rate, weight_decay=config.grpo.weight_decay)
        g = config.grpo
        total = g.max_steps * self.sizes.optimizer_steps_per_training_step
        # Not passed to accelerator.prepare: a prepared scheduler steps once per process per optimizer step, while
        # the sizes here (prompts_per_step, max_steps) are already global.
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: learning_rate_factor(s, g.warmup_steps, total, g.lr_scheduler_type))
        self.model, self.optimizer = self.accelerator.prepare(policy.model, optimizer)
        self.policy.model = self.accelerator.unwrap_model(self.model)
        self._ratio_checked = False
        self._ratio_failure: Optional[str] = None
        self._ratio_settled = False
        """Every process has passed its on-policy ratio check (the same on every process)."""
        self._nonfinite_rollouts = 0
        """Consecutive steps skipped because a rollout produced NaN/inf latents."""
        self._engine: Optional[VLLMPromptPolicy] = None
        self._engine_step = -1
        """The step whose adapter weights the vLLM engine serves (-1: not started)."""
        self._engine_dir: Optional[tempfile.TemporaryDirectory] = None
        self._pushed_step = -1
        """The step whose policy was last uploaded to the hub by this process (-1: none)."""

    @classmethod
    def from_config(cls, config: TrainConfig, accelerator=None, callbacks: Sequence[TrainerCallback] = (),
                    queries: Optional[tuple[list[str], list[str]]] = None) -> "GRPOTrainer":
        """Load the queries (first: cheap errors; ``queries``: :func:`training_queries` already read), then the
        backbone, the policy and the reward."""
        from ..backbones import load_backbone
        from ..rewards import load_reward

        queries, eval_queries = queries or training_queries(config)
        if config.grpo.rollout_backend == "vllm":
            import_vllm()  # before any model loads
        if config.logging.push_to_hub:
            check_hub_token()
        accelerator = accelerator or make_accelerator(config)
        check_sharding(accelerator, config)
        device = accelerator.device
        b = config.backbone
        backbone = load_backbone(b.name_or_path, b.dtype, device, revision=b.revision, variant=b.variant)
        torch.manual_seed(config.grpo.seed)  # a fresh LoRA adapter's init is part of the run's reproducibility
        policy = PromptPolicy.from_pretrained(config.policy.model_name_or_path, config.policy, device=device)
        reward = load_reward(config.reward.spec, device=config.reward.device or device, **config.reward.kwargs)
        return cls(config, policy, backbone, reward, queries, eval_queries, accelerator=accelerator,
                   callbacks=callbacks)

    # ------------------------------------------------------------------------------------------------ rollout
    @contextlib.contextmanager
    def _whole_policy(self) -> Iterator[None]:
        """Under FSDP2 the policy's full weights on every process, which then sample independently (every process
        enters: :func:`~promptloop.rl.sharding.whole_parameters`). Otherwise nothing."""
        if not is_fully_sharded(self.model):
            yield
            return
        with whole_parameters(self.model):
            self.policy.synced_gpus = False  # no collectives left in a forward: no lockstep decoding
            try:
                yield
            finally:
                self.policy.synced_gpus = None

    def answer_engine(self) -> Optional[VLLMPromptPolicy]:
        """The vLLM engine serving the adapter's current weights (``grpo.rollout_backend: vllm``), else None.

        Started on first use from the policy saved to a temporary folder; after an update (or a resume) the adapter
        is saved there again and handed over.
        """
        g = self.config.grpo
        if g.rollout_backend != "vllm" or self._engine_step == self.step:
            return self._engine
        if self._engine is None:
            self._engine_dir = tempfile.TemporaryDirectory(prefix="promptloop-rollout-")
            home = Path(self._engine_dir.name) / "policy"  # the engine's tokenizer and processor: kept
            self.policy.save_pretrained(home)
            base = self.policy.config.model_name_or_path
            self._engine = VLLMPromptPolicy.from_pretrained(
                home, self.policy.config, base_model_name_or_path=str(Path(base).resolve()) if Path(base).exists()
                else base, gpu_memory_utilization=g.vllm_gpu_memory_utilization)
        else:
            adapter = Path(self._engine_dir.name) / f"adapter-{self.step}"
            self.policy.model.save_pretrained(adapter, safe_serialization=True)
            self._engine.load_adapter(adapter)
            for old in Path(self._engine_dir.name).glob("adapter-*"):
                if old != adapter:
                    shutil.rmtree(old)
        self._engine_step = self.step
        return self._engine

    def _settings(self) -> SamplerSettings:
        b = self.config.backbone
        return SamplerSettings(num_inference_steps=b.num_inference_steps, guidance_scale=b.guidance_scale,
                               negative_prompt=b.negative_prompt, height=b.height, width=b.width,
                               preview_size=b.preview_size)

    def _schedules(self, num: int, group: int, seed: int) -> list[RefinementSchedule]:
        g = self.config.grpo

        def schedule(s: int) -> RefinementSchedule:
            return RefinementSchedule.random(g.num_refinements, seed=s, initial_rewrite=g.initial_rewrite)

        if g.schedule == "per_batch":
            return [schedule(seed)] * num
        if g.schedule == "per_group":
            return [schedule(_step_seed(seed, i // group)) for i in range(num)]
        return [schedule(_step_seed(seed, i)) for i in range(num)]

    def _rollout_chunk(self, queries: list[str], seeds: list[int], settings: SamplerSettings,
                       schedules: RefinementSchedule | list[RefinementSchedule], refine: RefineFn) -> RolloutOutput:
        """The policy's loop: closed (previews shown, or withheld with ``grpo.feedback: false``), or for
        ``policy.mode: oneshot`` one rewrite per trajectory before sampling (``schedules`` unused)."""
        if self.config.policy.mode == "oneshot":
            initial = refine(blind_observations(queries, 0, settings.num_inference_steps))
            return rollout(self.backbone, queries, seeds, settings, initial_prompts=initial)
        if not self.config.grpo.feedback:
            refine = withhold_preview(refine)
        return rollout(self.backbone, queries, seeds, settings, schedules, refine=refine)

    def collect(self, queries: Sequence[str], step: int) -> RolloutBatch:
        """G trajectories per query, their rewards and every refinement action (this process's share)."""
        g = self.config.grpo
        rank = self.accelerator.process_index
        expanded = [q for q in queries for _ in range(g.group_size)]
        group_ids = torch.arange(len(queries)).repeat_interleave(g.group_size)
        base = _step_seed(g.seed, step, rank)
        seeds = [_step_seed(base, int(gid) if g.shared_noise else i) for i, gid in enumerate(group_ids)]
        schedules = self._schedules(len(expanded), g.group_size, _step_seed(base, 7))
        generator = torch.Generator().manual_seed(_step_seed(base, 11))
        settings = self._settings()
        trajectories, images, actions, jobs = [], [], [], []
        times = {"rollout": 0.0, "reward_wait": 0.0}
        t0 = time.perf_counter()
        engine = self.answer_engine()
        if engine is not None:
            times["adapter_handover"] = time.perf_counter() - t0
        chunk = self.config.backbone.rollout_batch_size
        with AsyncRewardWorker(self.reward, timeout=self.config.reward.timeout_s) as worker:
            with self._whole_policy():
                for start in range(0, len(expanded), chunk):
                    stop = min(start + chunk, len(expanded))
                    recorder = _ActionRecorder(self.policy, start, generator, engine)
                    t0 = time.perf_counter()
                    out = self._rollout_chunk(expanded[start:stop], seeds[start:stop], settings,
                                              schedules[start:stop], recorder)
                    times["rollout"] += time.perf_counter() - t0
                    pil = out.pil()
                    jobs.append((stop - start, worker.submit(pil, expanded[start:stop],
                                                             reward_metadata(out.trajectories))))
                    trajectories += out.trajectories
                    images += pil
                    actions += recorder.actions
            t0 = time.perf_counter()
            scores, details, failures = [], [], 0
            for n, job in jobs:
                try:
                    result = job.result()
                    scores.append(result.scores)
                    details += result.details
                except Exception as e:  # raised or timed out: these items are dropped (NaN) and counted
                    failures += n
                    scores.append(torch.full((n,), float("nan")))
                    details += [{"error": f"{type(e).__name__}: {e}"}] * n
            times["reward_wait"] = time.perf_counter() - t0
        return RolloutBatch(list(expanded), group_ids, trajectories, images, actions, torch.cat(scores), details,
                            times, failures)

    # ------------------------------------------------------------------------------------------------- update
    def _micro_batch_logps(self, actions: Sequence[Action]):
        with _forward_through(self.policy, self.model):
            out = self.policy.log_probs([a.sample for a in actions])
        old = torch.zeros_like(out.log_probs)
        for i, a in enumerate(actions):
            behaviour = a.sampling_logps if a.old_logps is None else a.old_logps
            old[i, : len(behaviour)] = behaviour.to(old.device)
        return out.log_probs, old, out.mask, out.entropy

    def _recompute_old_logps(self) -> bool:
        mode = self.config.grpo.old_logprobs
        if mode == "auto":  # bf16/fp16 weights, or accelerate's autocast in the training forwards only
            return self.policy.base_model.dtype != torch.float32 or self.accelerator.mixed_precision != "no"
        return mode == "recompute"

    @torch.no_grad()
    def _store_old_logps(self, actions: Sequence[Action], micro_batches: Sequence[Sequence[int]]) -> float:
        """Old-policy log-probs from forwards shaped exactly like the first epoch's training micro-batches, so the
        first ratio is 1 even where sampling's log-probs differ (bf16). Returns the largest |sampling - old| gap."""
        gap = 0.0
        for mb in micro_batches:
            chunk = [actions[i] for i in mb]
            with _forward_through(self.policy, self.model):
                out = self.policy.log_probs([a.sample for a in chunk])
            for row, a in enumerate(chunk):
                a.old_logps = out.log_probs[row][out.mask[row]].float().cpu()
                if len(a.old_logps) == len(a.sampling_logps) and len(a.old_logps):
                    gap = max(gap, float((a.old_logps - a.sampling_logps).abs().max()))
        return gap

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """Advantages, then ``inner_epochs`` x ``mini_batches`` optimizer steps over the batch's actions."""
        g = self.config.grpo
        adv = group_advantages(batch.rewards, batch.group_ids, scale=g.advantage_scale)
        for a in batch.actions:
            a.advantage = float(adv.advantages[a.trajectory])
        valid = [bool(adv.valid[a.trajectory]) for a in batch.actions]
        metrics: dict[str, float] = {
            "advantages/zero_std_ratio": adv.zero_std_ratio,
            "reward/dropped": float(adv.num_dropped),
            "reward/failures": float(batch.reward_failures),
        }
        stats = _LossStats()
        skipped = 0
        order_gen = torch.Generator().manual_seed(_step_seed(g.seed, self.step, 13))
        params = [p for p in self.model.parameters() if p.requires_grad]
        n = len(batch.actions)
        per_step = n // g.mini_batches
        self.model.train()
        partitions = []  # per epoch: mini-batches, each a list of micro-batches of action indices
        for _ in range(g.inner_epochs):
            order = torch.randperm(n, generator=order_gen).tolist()
            minis = [order[m * per_step:(m + 1) * per_step] for m in range(g.mini_batches)]
            partitions.append([[mini[k:k + g.micro_batch_size] for k in range(0, per_step, g.micro_batch_size)]
                               for mini in minis])
        if self._recompute_old_logps():
            metrics["policy/sampling_logprob_gap"] = self._store_old_logps(
                batch.actions, [mb for mini in partitions[0] for mb in mini])
        for epoch_partition in partitions:
            for micro in epoch_partition:
                counted = [i for mb in micro for i in mb if valid[i] and len(batch.actions[i].sampling_logps)]
                tokens = sum(len(batch.actions[i].sampling_logps) for i in counted)
                finite = True
                step_loss = 0.0
                for k, mb in enumerate(micro):
                    actions = [batch.actions[i] for i in mb]
                    sync = contextlib.nullcontext() if k == len(micro) - 1 else self.accelerator.no_sync(self.model)
                    with sync:
                        logps, old, mask, entropy = self._micro_batch_logps(actions)
                        mask = mask & torch.tensor([valid[i] for i in mb], device=mask.device).unsqueeze(1)
                        if not self._ratio_checked and mask.any():
                            self._check_on_policy(logps, old, mask)
                            metrics["losses/on_policy_ratio_deviation"] = self.on_policy_ratio_deviation
                        ref = None
                        if g.beta:
                            with torch.no_grad(), self.policy.reference():
                                ref = self.policy.log_probs([a.sample for a in actions]).log_probs
                        advantages = torch.tensor([a.advantage for a in actions], device=logps.device)
                        # Both normalisations divide by the whole optimizer step's count (tokens or actions with
                        # a valid reward), so the gradient does not depend on the micro-batching.
                        out = grpo_loss(logps, old, advantages, mask, clip_low=g.clip_low, clip_high=g.clip_high,
                                        beta=g.beta, ref_logps=ref, normalisation=g.loss_normalisation,
                                        num_tokens=max(tokens, 1), num_sequences=max(len(counted), 1))
                        if not torch.isfinite(out.loss) or not torch.isfinite(logps[mask]).all():
                            finite = False
                        # Backward even when non-finite: every process must join the gradient all-reduce; the
                        # NaN/inf gradients are then discarded below, never applied.
                        self.accelerator.backward(out.loss)
                    stats.add(out.metrics, mask, entropy)
                    step_loss += float(out.loss.detach())
                self._settle_ratio_check()
                # Decided together before clipping: under FSDP clipping is a collective every process joins.
                finite = not self._any_process(not finite)
                grad_norm = None
                if finite and g.max_grad_norm > 0:
                    grad_norm = self.accelerator.clip_grad_norm_(params, g.max_grad_norm)
                    finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))  # NaN/inf in any gradient
                elif finite:  # clipping off: one reduction over every gradient, one device sync
                    grads = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
                    finite = bool(torch.stack(grads).all()) if grads else True
                if self._any_process(not finite):
                    finite = False
                if finite:
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    stats.optimizer_step(step_loss, grad_norm)
                else:  # never apply a NaN/inf update: report and skip this optimizer step
                    skipped += 1
                    self._skip_optimizer_step()
                self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        metrics.update(stats.metrics())
        metrics["train/nonfinite_skips"] = float(skipped)
        if skipped:
            warnings.warn(f"training step {self.step + 1}: {skipped} optimizer step(s) skipped because log-probs, "
                          "the loss or the gradients were NaN/inf; nothing of them was applied.", RuntimeWarning)
        metrics["train/lr"] = float(self.lr_scheduler.get_last_lr()[0])
        return metrics

    def _skip_optimizer_step(self) -> None:
        """Nothing is applied; with fp16 loss scaling the scale backs off and the scaler forgets this step's
        unscaling (else the next step's clipping fails: "unscale_() has already been called")."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())

    def _across_processes(self, metrics: dict[str, float], batch: Optional[RolloutBatch]) -> dict[str, float]:
        """The step's metrics over every process's queries (the same dict on every process)."""
        if self.accelerator.num_processes == 1:
            return metrics
        from accelerate.utils import gather_object

        rewards = [] if batch is None else [r for r in batch.rewards.tolist() if math.isfinite(r)]
        gathered = gather_object([(metrics, rewards)])
        return combine_process_metrics([m for m, _ in gathered], [r for _, r in gathered])

    def _any_process(self, flag: bool) -> bool:
        """True when ``flag`` is set on any process (so that all processes take the same branch)."""
        if self.accelerator.num_processes == 1:
            return flag
        total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), "sum")
        return bool(total.item() > 0)

    def _check_on_policy(self, logps: torch.Tensor, old: torch.Tensor, mask: torch.Tensor) -> None:
        """Before any update the policy is the behaviour policy: its log-probs must reproduce sampling's (checked on
        the first micro-batch with valid tokens)."""
        self._ratio_checked = True
        deviation = float((torch.exp(logps.detach() - old) - 1).abs()[mask].max())
        self.on_policy_ratio_deviation = deviation
        if not math.isfinite(deviation):
            self._ratio_checked = False  # check again on the next, hopefully finite, micro-batch
            return  # the NaN/inf log-probs themselves skip this optimizer step in update()
        if deviation > self.config.grpo.ratio_tolerance:
            self._ratio_failure = (
                f"step {self.step}: on the first on-policy micro-batch max |ratio - 1| = {deviation:.3g} exceeds "
                f"grpo.ratio_tolerance={self.config.grpo.ratio_tolerance}. Training and sampling log-probs disagree "
                "(dtype, dropout or padding differences); use fp32 log-probs and lora_dropout=0, or raise the "
                "tolerance knowingly.")

    def _settle_ratio_check(self) -> None:
        """Before each optimizer step until every process has checked its ratio: all processes stop together
        (:class:`RatioCheckError`) when one failed, before anything is applied."""
        if self._ratio_settled:
            return
        if self._any_process(self._ratio_failure is not None):
            raise RatioCheckError(self._ratio_failure or "the on-policy ratio check failed on another process; its "
                                  "error message says why.")
        self._ratio_settled = not self._any_process(not self._ratio_checked)

    # ------------------------------------------------------------------------------------------------- metrics
    def rollout_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        r = batch.rewards[torch.isfinite(batch.rewards)]
        metrics = {"reward/mean": float(r.mean()) if len(r) else float("nan"),
                   "reward/std": float(r.std()) if len(r) > 1 else 0.0}
        components: dict[str, list[float]] = {}
        for d in batch.reward_details:
            for k, v in d.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    components.setdefault(k, []).append(float(v))
        for k, values in components.items():
            metrics[f"reward/{k}"] = sum(values) / len(values)
        final_prompts = [t.prompts[-1] for t in batch.trajectories]
        metrics["prompt/words"] = sum(len(p.split()) for p in final_prompts) / len(final_prompts)
        metrics["prompt/truncated"] = float(sum(sum(t.truncated) for t in batch.trajectories))
        metrics["prompt/kept_previous"] = float(sum(a.kept_previous for a in batch.actions))
        metrics["prompt/changed_from_query"] = sum(p != q for p, q in zip(final_prompts, batch.queries)) / len(
            final_prompts)
        for k, v in batch.times.items():
            metrics[f"time/{k}"] = v
        return metrics

    # --------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Optional[Path]:
        """Adapter (safetensors, loadable as a policy), optimizer, LR schedule, RNG, step and data position."""
        path = None
        log = self.config.logging
        # gathered by every process under FSDP2
        adapter, optimizer = full_adapter_state(self.model), optimizer_state(self.model, self.optimizer.optimizer)
        if self.accelerator.is_main_process:
            card = self._model_card()

            def write(tmp: Path) -> None:
                self.policy.save_pretrained(tmp / "policy", model_card=card, adapter_state=adapter)
                torch.save(optimizer, tmp / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(rng_state(), tmp / "rng.pt")

            meta = {"data": self.stream.position, "config": to_dict(self.config)}
            path = save_checkpoint(self.run_dir, self.step, write, meta, log.keep_last)
            if log.push_to_hub and log.hub_strategy in ("every_save", "checkpoint"):
                try:
                    self._push(path / "policy")
                    if log.hub_strategy == "checkpoint":
                        push_checkpoint(path, log.hub_model_id, private=log.hub_private_repo,
                                        commit_message=f"PromptLoop checkpoint, step {self.step}")
                except Exception as e:  # the checkpoint is on disk; the next save or the end tries again
                    warnings.warn(f"training step {self.step}: the upload of the checkpoint to {log.hub_model_id!r} "
                                  f"failed ({type(e).__name__}: {e}); training goes on.", RuntimeWarning)
            self._callback("on_save", path)
        self.accelerator.wait_for_everyone()
        return path

    def _model_card(self) -> str:
        log = self.config.logging
        return policy_model_card(self.policy.config, has_adapter=self.policy.has_adapter,
                                 repo_id=log.hub_model_id if log.push_to_hub else None,
                                 training=self.training_summary())

    def _push(self, folder: Path) -> None:
        """Upload a saved policy folder to ``logging.hub_model_id`` (main process)."""
        log = self.config.logging
        push_policy_folder(folder, log.hub_model_id, private=log.hub_private_repo,
                           commit_message=f"PromptLoop policy, step {self.step}")
        self._pushed_step = self.step

    def load_checkpoint(self, checkpoint: Optional[Path] = None) -> Path:
        """Restore everything :meth:`save_checkpoint` wrote (the latest complete checkpoint by default)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        checkpoint = resume_checkpoint(self.run_dir, checkpoint or True)
        meta = read_meta(checkpoint)
        weights = load_file(str(checkpoint / "policy" / "adapter_model.safetensors"))
        if is_fully_sharded(self.model):
            load_adapter_state(self.model, weights, self.policy.model.active_adapter)
        else:
            set_peft_model_state_dict(self.policy.model, weights)
        load_optimizer_state(self.model, self.optimizer.optimizer, load_tensors(checkpoint / "optimizer.pt"))
        self.lr_scheduler.load_state_dict(load_tensors(checkpoint / "scheduler.pt"))
        set_rng_state(load_tensors(checkpoint / "rng.pt"))
        self.step = int(meta["step"])
        self.stream.restore(meta["data"])
        return checkpoint

    @property
    def policy_dir(self) -> Path:
        """``<output_dir>/policy``: the trained policy, written by :meth:`save_policy` when training completes."""
        return self.run_dir / POLICY_DIR

    def training_summary(self) -> TrainingSummary:
        """The run's settings and rewards (first/last logged steps, last evaluation) for the model card."""
        rows = self._read_step_log(METRICS_LOG)
        rewards = [r["reward/mean"] for r in rows if r.get("reward/mean") is not None]
        evals = [r["eval/reward_mean"] for r in rows if r.get("eval/reward_mean") is not None]
        cfg, g = self.config, self.config.grpo

        def mean(values: list[float]) -> Optional[float]:
            return sum(values) / len(values) if values else None

        # A reward handed to the constructor need not be the config's spec; a composite's spec names its weights.
        reward_name = getattr(self.reward, "name", None)
        return TrainingSummary(
            backbone=cfg.backbone.name_or_path, reward=cfg.reward.spec if reward_name in (None, "composite")
            else reward_name, num_refinements=g.num_refinements,
            initial_rewrite=g.initial_rewrite, feedback=g.feedback, group_size=g.group_size,
            prompts_per_step=g.prompts_per_step, steps=self.step, learning_rate=g.learning_rate, beta=g.beta,
            seed=g.seed, reward_first=mean(rewards[:10]), reward_last=mean(rewards[-10:]),
            eval_reward=evals[-1] if evals else None)

    def save_policy(self) -> Path:
        """Write the policy with a model card to :attr:`policy_dir` (replaced atomically), then upload it when
        ``logging.push_to_hub`` (unless a checkpoint of this step was just uploaded). Called by :meth:`train` when it
        completes."""
        repo_id = self.config.logging.hub_model_id
        upload_error = None
        adapter = full_adapter_state(self.model)  # gathered by every process under FSDP2
        if self.accelerator.is_main_process:
            card = self._model_card()
            write_folder_atomically(self.policy_dir, lambda tmp: self.policy.save_pretrained(
                tmp, model_card=card, adapter_state=adapter))
            if self.config.logging.push_to_hub and self._pushed_step != self.step:  # not already by a checkpoint
                try:
                    self._push(self.policy_dir)
                except Exception as e:  # network, permissions: the other processes must not wait forever
                    upload_error = e
        self.accelerator.wait_for_everyone()
        if upload_error is not None:
            raise RuntimeError(f"Training finished and the policy is saved in {self.policy_dir}, but the upload to "
                               f"{repo_id!r} failed ({type(upload_error).__name__}: {upload_error}). Upload it "
                               f"again with `hf upload {repo_id} {self.policy_dir}`.") from upload_error
        return self.policy_dir

    # ------------------------------------------------------------------------------------------------ training
    def _read_step_log(self, name: str) -> list[dict[str, Any]]:
        """The rows of the run folder's step log ``name`` (a line cut short by a crash is skipped)."""
        path = self.run_dir / name
        rows = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
        return rows

    def _restart_step_log(self, name: str) -> None:
        """Keep only the rows of steps up to ``self.step`` in the run folder's step log ``name`` (a JSON object per
        line with a "step" key): none on a fresh start, those up to the checkpoint on a resume, whose later steps
        run again (a restart would otherwise count them twice). A line cut short by a crash is dropped."""
        path = self.run_dir / name
        if not path.is_file():
            return

        def step_of(line: str) -> float:
            try:
                return json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                return math.inf

        with open(path, encoding="utf-8") as f:
            kept = [line.rstrip("\n") + "\n" for line in f if step_of(line) <= self.step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)

    def _append_step_log(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        with open(self.run_dir / name, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

    def _log_completions(self, batch: RolloutBatch) -> None:
        self._append_step_log("completions.jsonl", [
            {"step": self.step + 1, "query": q, "prompts": list(t.prompts), "reward": r if math.isfinite(r) else None}
            for q, t, r in zip(batch.queries, batch.trajectories, batch.rewards.tolist())])

    def _log_images(self, batch: RolloutBatch) -> None:
        rows = [trajectory_strip(t, img, tile=128) for t, img in
                list(zip(batch.trajectories, batch.images))[: min(4, self.config.grpo.group_size)]]
        grid = stack_rows(rows)
        folder = self.run_dir / "images"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step-{self.step:06d}.png")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image("trajectories", np.asarray(grid), self.step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"trajectories": wandb.Image(grid)}, step=self.step)

    def evaluate(self) -> dict[str, float]:
        """Held-out queries, fixed noise seeds and policy seed, evenly spaced refinements; each process samples its
        share in batches of ``backbone.rollout_batch_size`` and every process gets the mean over all of them."""
        if not self.eval_queries:
            return {}
        g = self.config.grpo
        refine = (self.answer_engine() or self.policy).as_refine_fn(seed=g.seed)
        schedule = RefinementSchedule.uniform(g.num_refinements, g.initial_rewrite)
        mine = list(range(self.accelerator.process_index, len(self.eval_queries), self.accelerator.num_processes))
        chunk = self.config.backbone.rollout_batch_size
        samples = []  # scored after sampling: the reward model does not run while the policy is gathered
        with self._whole_policy():  # the processes' shares may take different numbers of batches
            for start in range(0, len(mine), chunk):
                seeds = mine[start:start + chunk]
                queries = [self.eval_queries[i] for i in seeds]
                out = self._rollout_chunk(queries, seeds, self._settings(), schedule, refine)
                samples.append((out.pil(), queries, reward_metadata(out.trajectories)))
        scores: list[float] = []
        for images, queries, metadata in samples:
            scores += self.reward(images, queries, metadata).scores.tolist()
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            scores = gather_object(scores)
        finite = [s for s in scores if math.isfinite(s)]
        return {"eval/reward_mean": sum(finite) / len(finite) if finite else float("nan")}

    def train(self, resume: bool | str | Path = False) -> list[dict[str, float]]:
        """Run until ``grpo.max_steps``; returns the per-step metrics (also logged to the trackers and, by the main
        process, to ``metrics.jsonl`` in the run folder)."""
        from tqdm.auto import tqdm

        cfg = self.config
        if resume:
            self.load_checkpoint(None if resume is True else Path(resume))
        main = self.accelerator.is_main_process
        later = checkpoints_after(self.run_dir, self.step, cfg.logging.overwrite_output_dir)
        self.accelerator.wait_for_everyone()  # every process has looked before the main one deletes
        if main:
            remove_checkpoints(later)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
            self._restart_step_log(METRICS_LOG)
            if cfg.logging.log_completions:
                self._restart_step_log("completions.jsonl")
        if self.accelerator.log_with:
            scalar = (int, float, str, bool)
            flat = {k.replace(".", "/"): ",".join(map(str, v)) if isinstance(v, list) else v
                    for k, v in _flatten(to_dict(cfg)).items()
                    if isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(x, scalar) for x in v))}
            run_name = cfg.logging.run_name or Path(cfg.logging.output_dir).resolve().name
            self.accelerator.init_trackers(cfg.logging.project, config=flat,
                                           init_kwargs={"wandb": {"name": run_name}})
        history: list[dict[str, float]] = []
        last_saved = self.step
        self.should_stop = False
        self._callback("on_train_begin")
        bar = tqdm(total=cfg.grpo.max_steps, initial=self.step, disable=not (main and cfg.logging.progress),
                   desc="GRPO", unit="step")
        try:
            with self._stopping_on_sigterm():
                last_saved = self._train_loop(history, bar, last_saved)
                if self.step != last_saved:
                    self.save_checkpoint()
            if not self.terminated:
                self.save_policy()
                self._callback("on_train_end", history)
        finally:  # also when training stops with an error: the trackers keep what was logged
            bar.close()
            self.accelerator.end_training()
        return history

    @contextlib.contextmanager
    def _stopping_on_sigterm(self) -> Iterator[None]:
        """A SIGTERM (preemption, ``scancel``, ``docker stop``) lets the current step finish, then training stops
        with a checkpoint on every process at the same step; a second SIGTERM acts at once (the previous handler)."""
        self.terminated = False
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = signal.getsignal(signal.SIGTERM)
        restore = previous if previous is not None else signal.SIG_DFL

        def on_sigterm(signum, frame) -> None:
            self.terminated = True
            signal.signal(signal.SIGTERM, restore)

        signal.signal(signal.SIGTERM, on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, restore)

    def _collect_finite(self, queries: Sequence[str]) -> Optional[RolloutBatch]:
        """:meth:`collect`, or None (warned, counted) when a rollout of any process produced NaN/inf latents;
        after ``grpo.nonfinite_rollout_limit`` such steps in a row, :class:`NonFiniteRolloutError`."""
        error = None
        try:
            batch = self.collect(queries, self.step)
        except FloatingPointError as e:  # raised by the rollout, naming the sampler step
            batch, error = None, e
        if not self._any_process(batch is None):
            self._nonfinite_rollouts = 0
            return batch
        self._nonfinite_rollouts += 1
        reason = str(error) if error else "NaN/inf latents on another process"
        limit = self.config.grpo.nonfinite_rollout_limit
        if self._nonfinite_rollouts > limit:
            raise NonFiniteRolloutError(
                f"training step {self.step + 1}: {reason} This is the {self._nonfinite_rollouts}. step in a row with "
                f"NaN/inf latents (grpo.nonfinite_rollout_limit={limit}); training stops. Checkpoints under "
                f"{self.run_dir / 'checkpoints'} are intact; fix the cause (dtype, guidance) and --resume.") from error
        warnings.warn(f"training step {self.step + 1} skipped (no update): {reason}", RuntimeWarning)
        return None

    def _train_loop(self, history: list[dict[str, float]], bar, last_saved: int) -> int:
        cfg = self.config
        main = self.accelerator.is_main_process
        rank, per_process = self.accelerator.process_index, self.sizes.prompts_per_process
        while self.step < cfg.grpo.max_steps:
            t0 = time.perf_counter()
            queries = self.stream.take(cfg.grpo.prompts_per_step)[rank * per_process:(rank + 1) * per_process]
            batch = self._collect_finite(queries)
            if batch is None:  # skipped: the data and the step advance, nothing is applied
                metrics = {"train/nonfinite_rollout_skips": 1.0}
            else:
                metrics = self.rollout_metrics(batch)
                if main and cfg.logging.log_completions:
                    self._log_completions(batch)
                t1 = time.perf_counter()
                metrics.update(self.update(batch))
                metrics["train/nonfinite_rollout_skips"] = 0.0
                metrics["time/update"] = time.perf_counter() - t1
            metrics["time/step"] = time.perf_counter() - t0
            metrics = self._across_processes(metrics, batch)
            self.step += 1
            if self.step % cfg.logging.log_every == 0:
                self.accelerator.log(metrics, step=self.step)
            if batch is not None and main and cfg.logging.image_every and self.step % cfg.logging.image_every == 0:
                self._log_images(batch)
            if cfg.logging.eval_every and self.step % cfg.logging.eval_every == 0:
                eval_metrics = self.evaluate()
                metrics.update(eval_metrics)
                self.accelerator.log(eval_metrics, step=self.step)
            history.append(metrics)
            if main:  # before the checkpoint, whose model card reads it; a resume drops rows past its checkpoint
                self._append_step_log(METRICS_LOG, [{"step": self.step, **_json_safe(metrics)}])
            self._callback("on_step_end", metrics)
            if self.step % cfg.logging.checkpoint_every == 0:
                self.save_checkpoint()
                last_saved = self.step
            bar.update(1)
            if batch is not None:
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
            if self._any_process(self.terminated):
                self.terminated = True
                if main:
                    bar.write(f"SIGTERM: training stopped after step {self.step} of {cfg.grpo.max_steps}; the "
                              "checkpoint is written next, continue with --resume")
                break
            if self._any_process(self.should_stop):
                if main:
                    bar.write(f"training stopped by a callback after step {self.step} of {cfg.grpo.max_steps}")
                break
        return last_saved

    def _callback(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


_SUMMED_METRICS = frozenset({"reward/dropped", "reward/failures", "prompt/truncated", "prompt/kept_previous"})
_LARGEST_METRICS = frozenset({"losses/ratio_max", "losses/on_policy_ratio_deviation", "policy/sampling_logprob_gap"})
_SMALLEST_METRICS = frozenset({"losses/ratio_min"})


def combine_process_metrics(per_process: Sequence[dict[str, float]],
                            rewards: Sequence[Sequence[float]]) -> dict[str, float]:
    """One step's metrics over all processes, from each process's metrics over its share of the queries: counts
    add up, extremes stay extremes, the rest is averaged over the processes that report it; ``reward/mean`` and
    ``reward/std`` are recomputed from every process's finite rewards (``rewards``, one list per process)."""
    combined: dict[str, float] = {}
    for key in dict.fromkeys(k for metrics in per_process for k in metrics):
        values = [metrics[key] for metrics in per_process if key in metrics]
        if key in _SUMMED_METRICS:
            combined[key] = sum(values)
        elif key in _LARGEST_METRICS:
            combined[key] = max(values)
        elif key in _SMALLEST_METRICS:
            combined[key] = min(values)
        else:
            combined[key] = sum(values) / len(values)
    if "reward/mean" in combined:
        pooled = torch.tensor([r for process in rewards for r in process], dtype=torch.float64)
        combined["reward/mean"] = float(pooled.mean()) if len(pooled) else float("nan")
        combined["reward/std"] = float(pooled.std()) if len(pooled) > 1 else 0.0
    return combined


def _json_safe(metrics: dict[str, float]) -> dict[str, Optional[float]]:
    """NaN/inf as null: strict JSON readers reject them."""
    return {k: v if math.isfinite(v) else None for k, v in metrics.items()}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
