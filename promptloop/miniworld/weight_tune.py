"""Direct reward fine-tuning of backbone A's UNet (DRaFT-K): the weight-tuning baseline of claims 3 and 4.

    python -m promptloop.miniworld.weight_tune --out RUN [--steps 300] [--batch-size 16] [--resume] [...]

Each step draws ``batch_size`` queries from ``miniworld:train``, samples them with the RL runs' sampler (the shipped
pipeline's DDIM scheduler, ``num_inference_steps`` steps, classifier-free guidance ``guidance_scale``, 32 px) and
scores the decoded pixels against the query with the learned preference model (``miniworld-preference``, the
training reward). The first steps run without gradients; the last ``grad_steps`` denoising steps and the VAE
decode keep them, so ``-mean(reward)`` backpropagates through the frozen decoder and reward model into the UNet
weights (DRaFT-K, Clark et al. 2023; K = 1 is their cheap, stable setting). Every image scored is one reward query,
the unit the PromptLoop GRPO runs are counted in (32 per step there).

Full fine-tuning, not LoRA: the UNet has 1.5 M parameters, so optimiser state is no concern, and the tuned model is
then a plain pipeline folder that every loader reads (``StableDiffusionPipeline.from_pretrained``,
``promptloop.backbones.auto_backbone``) with nothing to merge.

Writes into ``RUN``: ``train_log.jsonl`` (one row per step: proxy reward, loss, gradient norm, reward queries so far)
and atomic checkpoints ``checkpoints/step-N/`` (``promptloop.rl.checkpoint``), each holding a loadable pipeline
folder ``pipeline/`` (safetensors), the optimiser state and ``checkpoint.json`` (step, reward queries, config).
Evaluate them with ``python -m promptloop.miniworld.evaluate_weight_tune RUN``.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from promptloop.rl.checkpoint import latest_checkpoint, list_checkpoints, load_tensors, read_meta, save_checkpoint

from .backbone import SHIPPED_BACKBONE_A
from .domain import REFERENCE_SIZE

LOG_NAME = "train_log.jsonl"
PIPELINE_DIR = "pipeline"
OPTIMIZER_NAME = "optimizer.pt"
RESUMABLE_CHANGES = ("out", "steps", "resume", "progress", "max_minutes", "device", "checkpoint_every",
                     "keep_last")
"""Config fields a ``--resume`` may change; any other difference from the checkpoint's config is an error."""


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class WeightTuneConfig:
    """Every setting of a reward fine-tuning run (each is a ``--flag`` of the command line)."""

    out: str = _help("Run folder: train_log.jsonl and checkpoints/step-N/ (required).", default="")
    backbone: str = _help("Pipeline folder to fine-tune (its scheduler and tokenizer are used as saved).",
                          default=str(SHIPPED_BACKBONE_A))
    preference: str = _help("Preference model folder of the training reward; empty: the shipped "
                            "miniworld-preference model.", default="")
    queries: str = _help("Registered prompt set (or prompt file) the training queries are drawn from.",
                         default="miniworld:train")
    steps: int = _help("Optimiser steps in all (a resumed run continues up to this).", default=300)
    batch_size: int = _help("Queries per step, one image each: the reward queries spent per step.", default=16)
    learning_rate: float = _help("AdamW learning rate of the UNet weights (constant).", default=1e-4)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    max_grad_norm: float = _help("Clip the UNet gradient's global norm to this (0: no clipping).", default=1.0)
    grad_steps: int = _help("Last denoising steps that keep gradients (DRaFT-K's K; 1 <= K <= "
                            "num_inference_steps).", default=1)
    num_inference_steps: int = _help("DDIM sampler steps, as in the RL runs.", default=10)
    guidance_scale: float = _help("Classifier-free guidance scale, as in the RL runs (<= 1: no guidance).",
                                  default=2.0)
    checkpoint_every: int = _help("Save a checkpoint (with a loadable pipeline) every N steps, and at the end.",
                                  default=25)
    keep_last: int = _help("Checkpoints kept (oldest removed first); keep them all to evaluate the curve.",
                           default=1000)
    seed: int = _help("Seed of the query draws and the initial noise (step s uses seed and s only, so a resumed "
                      "run draws what an uninterrupted one would).", default=0)
    max_minutes: float = _help("Stop (with a checkpoint) after this many minutes of training; 0: no limit.",
                               default=0.0)
    device: str = _help("Torch device.", default="cpu")
    resume: bool = _help("Continue from the run folder's latest checkpoint.", default=False)
    progress: bool = _help("Show a progress bar.", default=True)

    def __post_init__(self):
        if not self.out:
            raise ValueError("out is empty: give the run folder, e.g. --out /tmp/wt_run.")
        for name in ("steps", "batch_size", "num_inference_steps", "checkpoint_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not 1 <= self.grad_steps <= self.num_inference_steps:
            raise ValueError(f"grad_steps={self.grad_steps} must be between 1 and num_inference_steps="
                             f"{self.num_inference_steps}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.max_minutes < 0:
            raise ValueError("weight_decay, max_grad_norm and max_minutes must be >= 0.")
        if not (Path(self.backbone) / "model_index.json").is_file():
            raise ValueError(f"backbone {self.backbone!r} holds no model_index.json; pass a pipeline folder "
                             "written by save_pretrained (default: the shipped backbone A).")
        if self.preference and not (Path(self.preference) / "config.json").is_file():
            raise ValueError(f"preference {self.preference!r} holds no config.json; pass a folder written by "
                             "train_preference, or leave it empty for the shipped model.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} but CUDA is not available; use --device cpu.")


def differentiable_preference(reward, pixels: torch.Tensor, queries: Sequence[str]) -> torch.Tensor:
    """(B,) scores of a loaded ``miniworld-preference`` reward with gradients to ``pixels`` (B, 3, H, W) in [0, 1].

    The registry's ``reward(images, queries)`` computes the same numbers but detaches its input; this path keeps the
    graph (clamp to [0, 1] and area resize, as ``rewards.to_pixel_tensor`` does).
    """
    pixels = pixels.clamp(0.0, 1.0)
    if pixels.shape[-2:] != (REFERENCE_SIZE, REFERENCE_SIZE):
        pixels = F.interpolate(pixels, size=(REFERENCE_SIZE, REFERENCE_SIZE), mode="area")
    model = reward.model
    return model(pixels.to(reward.device, reward.dtype), model.encode_queries(queries)).float()


def sample_pixels(pipe, queries: Sequence[str], latents: torch.Tensor, num_inference_steps: int,
                  guidance_scale: float, grad_steps: int = 0) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in [0, 1] of ``pipe`` from the initial ``latents``, as the stock ``pipe()``
    samples them (its scheduler, classifier-free guidance, no guidance rescale); the last ``grad_steps`` denoising
    steps and the decode keep gradients (0: none)."""
    device = latents.device
    guided = guidance_scale > 1.0
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(list(queries), device, 1, guided)
    embeds = torch.cat([uncond, cond]) if guided else cond
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    first_grad = len(scheduler.timesteps) - grad_steps
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i >= first_grad):
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            prediction = pipe.unet(model_input, t, encoder_hidden_states=embeds).sample
            if guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = scheduler.step(prediction, t, latents).prev_sample
    with torch.set_grad_enabled(grad_steps > 0):
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0.0, 1.0)


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s query draw and noise: a function of (seed, step) only."""
    return seed * 1_000_003 + step


def draw_batch(queries: Sequence[str], config: WeightTuneConfig, step: int, pipe) -> tuple[list[str], torch.Tensor]:
    """Step ``step``'s queries (drawn with replacement) and initial latents, reproducible from (seed, step)."""
    seed = step_seed(config.seed, step)
    batch = random.Random(seed).choices(list(queries), k=config.batch_size)
    unet = pipe.unet.config
    shape = (config.batch_size, unet.in_channels, unet.sample_size, unet.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return batch, latents.to(config.device)


class RewardTuner:
    """The frozen text encoder, VAE and reward around the UNet being tuned; ``step`` makes one optimiser step."""

    def __init__(self, pipe, reward, config: WeightTuneConfig):
        self.pipe, self.reward, self.config = pipe, reward, config
        pipe.text_encoder.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        pipe.unet.requires_grad_(True)
        self.parameters = [p for p in pipe.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate,
                                           weight_decay=config.weight_decay)

    def step(self, queries: Sequence[str], latents: torch.Tensor) -> dict:
        config = self.config
        pixels = sample_pixels(self.pipe, queries, latents, config.num_inference_steps, config.guidance_scale,
                               config.grad_steps)
        scores = differentiable_preference(self.reward, pixels, queries)
        loss = -scores.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm or math.inf)
        self.optimizer.step()
        scores = scores.detach()
        return {"proxy_mean": scores.mean().item(), "proxy_std": scores.std().item() if len(scores) > 1 else 0.0,
                "loss": loss.item(), "grad_norm": norm.item()}


def _load_pipeline(path: Path, device: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _check_resumable(saved: dict, config: WeightTuneConfig) -> None:
    changed = {k: (saved.get(k), v) for k, v in asdict(config).items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        raise ValueError(f"--resume with settings that differ from the checkpoint's: {changed} (saved, given). "
                         "Resume with the same settings, or start a new run folder.")


def _read_log(path: Path, up_to_step: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["step"] <= up_to_step]


class _RunState:
    """Where a run stands: the pipeline being tuned, its tuner, the step done and the log so far."""

    def __init__(self, config: WeightTuneConfig):
        from promptloop.rewards import load_reward

        run = Path(config.out)
        found = latest_checkpoint(run)
        if found is not None and not config.resume:
            raise ValueError(f"{run} already holds checkpoints ({found.name}); pass --resume to continue it, or "
                             "choose a new --out.")
        self.step = 0
        if config.resume and found is not None:
            meta = read_meta(found)
            _check_resumable(meta["config"], config)
            self.step = meta["step"]
        self.pipe = _load_pipeline(found / PIPELINE_DIR if self.step else Path(config.backbone), config.device)
        reward = load_reward("miniworld-preference", path=config.preference or None, device=config.device)
        self.tuner = RewardTuner(self.pipe, reward, config)
        if self.step:
            self.tuner.optimizer.load_state_dict(load_tensors(found / OPTIMIZER_NAME))
        self.log_path = run / LOG_NAME
        self.rows = _read_log(self.log_path, self.step)
        run.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))

    def save(self, config: WeightTuneConfig, command: str) -> Path:
        def write(tmp: Path) -> None:
            self.pipe.save_pretrained(tmp / PIPELINE_DIR, safe_serialization=True)
            torch.save(self.tuner.optimizer.state_dict(), tmp / OPTIMIZER_NAME)

        last = self.rows[-1] if self.rows else {}
        meta = {"reward_queries": self.step * config.batch_size, "proxy_mean": last.get("proxy_mean"),
                "config": asdict(config), "command": command}
        return save_checkpoint(Path(config.out), self.step, write, meta, config.keep_last)


def train(config: WeightTuneConfig, log=print, command: str = "") -> list[dict]:
    """Run (or resume) reward fine-tuning up to ``config.steps``; returns the per-step log rows. ``command`` (the
    command line, if any) is recorded in each checkpoint's metadata."""
    from promptloop.eval.prompt_sets import load_prompt_set

    queries = load_prompt_set(config.queries)
    if not queries:
        raise ValueError(f"prompt set {config.queries!r} is empty.")
    state = _RunState(config)
    if state.step >= config.steps:
        log(f"{config.out} is already at step {state.step} >= steps={config.steps}; nothing to do.")
        return state.rows
    if state.step:
        log(f"resumed at step {state.step} ({state.step * config.batch_size} reward queries)")
    start = time.perf_counter()
    bar = tqdm(total=config.steps, initial=state.step, disable=not config.progress, desc="weight tune",
               unit="step", dynamic_ncols=True)
    with open(state.log_path, "a") as log_file:
        while state.step < config.steps:
            batch, latents = draw_batch(queries, config, state.step, state.pipe)
            tic = time.perf_counter()
            stats = state.tuner.step(batch, latents)
            state.step += 1
            row = {"step": state.step, "reward_queries": state.step * config.batch_size, **stats,
                   "seconds": time.perf_counter() - tic}
            state.rows.append(row)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            bar.update(1)
            bar.set_postfix(proxy=f"{stats['proxy_mean']:.3f}", queries=row["reward_queries"])
            out_of_time = config.max_minutes and time.perf_counter() - start > 60 * config.max_minutes
            if state.step % config.checkpoint_every == 0 or state.step == config.steps or out_of_time:
                state.save(config, command)
            if out_of_time:
                log(f"stopping at step {state.step}: max_minutes={config.max_minutes} reached (resume with --resume)")
                break
    bar.close()
    return state.rows


def checkpoint_pipelines(run_dir: str | Path) -> dict[int, Path]:
    """{reward queries: pipeline folder} of every complete checkpoint of a run, in order."""
    found = {}
    for checkpoint in list_checkpoints(Path(run_dir)):
        found[read_meta(checkpoint)["reward_queries"]] = checkpoint / PIPELINE_DIR
    if not found:
        raise ValueError(f"{run_dir} holds no complete checkpoint; run `python -m promptloop.miniworld.weight_tune "
                         f"--out {run_dir}` first.")
    return found


def parse_args(argv: Sequence[str] | None = None) -> WeightTuneConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(WeightTuneConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, required=f.name == "out",
                                help=f.metadata["help"] + ("" if f.name == "out" else " (default: %(default)s)"))
    return WeightTuneConfig(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return train(parse_args(argv), command=f"python -m promptloop.miniworld.weight_tune {shlex.join(argv)}")


if __name__ == "__main__":
    main()
