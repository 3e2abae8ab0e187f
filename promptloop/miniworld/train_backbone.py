"""Train mini-world backbone A: the VAE first, then the UNet and text encoder jointly; save, then evaluate.

    python -m promptloop.miniworld.train_backbone --out DIR [--preset gpu|cpu|tiny] [--device cuda]
        [--max-minutes M] [--resume] [--decoder-steps N] [--curve-every N] [--init-from PIPELINE_DIR]

``--decoder-steps N`` fine-tunes the VAE decoder alone (encoder frozen) after the VAE phase, before the UNet phase
continues; it may be added to a run that has already trained its UNet. ``--curve-every N`` evaluates the EMA
weights every N UNet steps into ``curve.jsonl``. ``--init-from`` continues a saved pipeline's UNet and text encoder
(VAE phase skipped, fresh optimizer).

Writes into DIR: ``checkpoint/`` (training state, replaced atomically every ``--checkpoint-every`` steps and at
exit; ``--resume`` continues from it), ``pipeline/`` (``StableDiffusionPipeline.save_pretrained``, EMA weights,
safetensors), ``eval.json`` and ``eval.md`` (per-attribute accuracy), ``samples.png`` and ``train_log.txt``.
``--max-minutes`` bounds the training phases; saving and evaluation follow within about a minute on a GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from .backbone import TINY_SIZES, BackboneSizes, assemble_pipeline, build_text_encoder, build_unet, build_vae, \
    training_scheduler
from .data import SceneDataset, render_dataset
from .domain import ATTRIBUTE_VALUES, ATTRIBUTES, BACKGROUNDS, Scene, all_scenes, render
from .evaluate_backbone import EvalSettings, evaluate_dir, evaluate_pipeline, format_table
from .recognise import attribute_accuracy
from .tokenizer import CaptionTokenizer, make_miniworld_tokenizer


@dataclass
class DenoiserTrainingConfig:
    """Settings every mini-world backbone run shares (presets fill the defaults; flags override them)."""

    out: str
    """Output folder."""
    preset: str = "cpu"
    """Which presets entry filled the defaults."""
    device: str = "cpu"
    """Torch device."""
    max_minutes: float = 60.0
    """Wall-clock budget of the training phases of this invocation."""
    resume: bool = False
    """Continue from ``<out>/checkpoint`` if it exists."""
    seed: int = 0
    """Seed of the dataset and of every random draw in training."""
    tiny: bool = False
    """Use the tiny sizes (tests only)."""
    variants: int = 4
    """Renders per scene in the dataset (the first clean, the rest jittered)."""
    batch_size: int = 64
    """Denoiser batch size."""
    lr: float = 1e-3
    """Denoiser and text encoder learning rate (AdamW, linear warm-up, then constant)."""
    warmup_steps: int = 100
    """Learning-rate warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    p_uncond: float = 0.1
    """Probability of an empty caption (classifier-free guidance dropout)."""
    p_name_start: float = 0.9
    """Probability of naming each attribute at step 0 (caption curriculum)."""
    p_name_end: float = 0.6
    """... and after ``curriculum_steps`` (linear in between)."""
    curriculum_steps: int = 1000
    """Length of the caption curriculum."""
    p_shuffle: float = 0.3
    """Probability of a caption's words in random order (word order carries no meaning in this world)."""
    ema_decay: float = 0.999
    """EMA decay of the denoiser and text encoder weights that are saved (0 disables EMA)."""
    bf16: bool = False
    """bf16 autocast for forward passes (CUDA)."""
    checkpoint_every: int = 500
    """Checkpoint every this many steps (and at exit)."""
    log_every: int = 50
    """Log every this many steps."""
    eval_captions: int = 24
    """Held-out captions in the final evaluation."""
    eval_seeds: int = 4
    """Seeds per caption in the final evaluation."""
    eval_steps: int = 20
    """Sampling steps in the evaluation."""
    eval_guidance: tuple[float, ...] = (4.0,)
    """Guidance scales evaluated (the first is also used for ``samples.png``)."""
    curve_every: int = 0
    """Every this many denoiser steps, evaluate the EMA weights (first guidance scale, ``curve_captions`` x
    ``curve_seeds``) and append the result to ``curve.jsonl`` (0: never)."""
    curve_captions: int = 32
    """Held-out captions in each ``curve_every`` evaluation."""
    curve_seeds: int = 4
    """Seeds per caption in each ``curve_every`` evaluation."""

    def __post_init__(self):
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device} but CUDA is not available; use --device cpu.")
        for name in ("batch_size", "variants", "eval_captions", "eval_seeds", "eval_steps", "curve_captions",
                     "curve_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}.")
        self.eval_guidance = tuple(self.eval_guidance)


@dataclass
class TrainBackboneConfig(DenoiserTrainingConfig):
    """Every setting of a backbone A run: the shared settings plus the VAE, decoder and UNet phases'."""

    vae_steps: int = 600
    """VAE training steps."""
    vae_batch: int = 64
    """VAE batch size."""
    vae_lr: float = 1e-3
    """VAE learning rate."""
    vae_max_fraction: float = 0.25
    """The VAE phase stops early once it has used this fraction of ``max_minutes``."""
    kl_weight: float = 1e-6
    """Weight of the VAE's KL term."""
    vae_blocks: int = 0
    """Down/up blocks of the VAE, which set the latent side: 3 gives 8 x 8 latents (shipped backbone A), 2 gives
    16 x 16 (small shapes reconstruct there, not at 8 x 8; the UNet then costs about 4x per step: docs/miniworld.md).
    0 keeps the sizes' default (3; tiny: 2). A resumed run must use its first value."""
    vae_object_weight: float = 0.0
    """Extra L1 weight on object pixels in the VAE phase (0: plain L1, as shipped backbone A's VAE was trained; a
    small object is ~3 % of the image, and 10 reconstructs colour and shape far sooner: docs/miniworld.md)."""
    decoder_steps: int = 0
    """Steps of decoder fine-tuning after the VAE phase, encoder frozen (the UNet's latent space stays valid, so it
    can run before, after or between UNet runs; ``--resume`` runs the steps not done yet)."""
    decoder_batch: int = 64
    """Decoder fine-tuning batch size."""
    decoder_lr: float = 5e-4
    """Decoder fine-tuning learning rate (AdamW)."""
    decoder_object_weight: float = 10.0
    """Extra L1 weight on object pixels in decoder fine-tuning (a small object is ~3 % of the image)."""
    decoder_target: float = 1.0
    """Decoder fine-tuning stops early once reconstruction accuracy reaches this on every attribute (checked at
    each checkpoint, on all 1296 clean scenes)."""
    unet_steps: int = 1_000_000
    """UNet steps cap (the time budget usually stops training first)."""
    init_from: str = ""
    """A saved backbone A pipeline folder to continue training: its VAE, text encoder, UNet and tokenizer are the
    starting point, the VAE phase is skipped and the UNet phase starts at step 0 with a fresh optimizer and EMA
    (how the shipped backbone A was trained further: docs/miniworld.md). Empty: train from scratch."""

    def __post_init__(self):
        for name in ("vae_batch", "decoder_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.init_from and not (Path(self.init_from) / "unet" / "config.json").is_file():
            raise ValueError(f"--init-from {self.init_from} holds no unet/ folder; pass a pipeline folder saved by "
                             "train_backbone or export_backbone (e.g. promptloop/miniworld/assets/backbone_a).")
        if self.vae_blocks not in (0, 2, 3, 4):
            raise ValueError(f"vae_blocks must be 2, 3 or 4 (16, 8 or 4 latent cells a side; 0 for the default), "
                             f"got {self.vae_blocks}.")
        super().__post_init__()


def backbone_sizes(config: TrainBackboneConfig) -> BackboneSizes:
    """The model sizes of a run: the tiny or full defaults, with ``config.vae_blocks`` VAE blocks if set (extra
    blocks repeat the last width). Full-size 16 x 16 latents get a UNet one block deeper whose full-resolution
    block has no attention (0.9 s per step at batch 64 on one CPU thread, against 2.4 s for the 8 x 8 layout run at
    16 x 16 and 0.6 s at 8 x 8: docs/miniworld.md)."""
    sizes = TINY_SIZES if config.tiny else BackboneSizes()
    if not config.vae_blocks:
        return sizes
    widths = sizes.vae_channels + (sizes.vae_channels[-1],) * config.vae_blocks
    sizes = replace(sizes, vae_channels=widths[:config.vae_blocks])
    if config.tiny or sizes.latent_size <= BackboneSizes().latent_size:
        return sizes
    return replace(sizes, unet_channels=sizes.unet_channels + (sizes.unet_channels[-1],), unet_attention_from=1)


PRESETS: dict[str, dict] = {
    "cpu": {},
    "gpu": dict(device="cuda", variants=8, vae_steps=4000, vae_batch=512, vae_lr=1e-3, vae_max_fraction=0.2,
                batch_size=2048, lr=1e-3, warmup_steps=200, curriculum_steps=1500, bf16=True,
                checkpoint_every=1000, log_every=100, eval_captions=64, eval_seeds=8, eval_guidance=(4.0, 2.0, 7.0)),
    "tiny": dict(tiny=True, variants=1, vae_steps=2, vae_batch=4, decoder_batch=4, batch_size=4, warmup_steps=1,
                 curriculum_steps=2,
                 ema_decay=0.9, checkpoint_every=2, log_every=1, eval_captions=2, eval_seeds=2, eval_steps=2),
}


class Log:
    """Prints and appends lines to ``train_log.txt``."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, message: str):
        print(message, flush=True)
        with self.path.open("a") as f:
            f.write(message + "\n")


class EMA:
    """Exponential moving average of parameters, with the usual warm-up ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self, params: list[torch.nn.Parameter], step: int):
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]):
        for shadow, p in zip(self.shadow, params):
            p.copy_(shadow)


@dataclass
class Progress:
    """Where training stands (saved in ``state.json``)."""

    phase: str = "vae"
    """"vae", then "unet"."""
    step: int = 0
    """Steps done in the current phase."""
    scaling_factor: float = 1.0
    """The VAE latent scaling factor (set when the VAE phase ends)."""
    trained_seconds: float = 0.0
    """Training wall time over all invocations."""
    decoder_step: int = 0
    """Decoder fine-tuning steps done (a phase of its own, counted separately: it may run after UNet steps)."""
    decoder_done: bool = False
    """Decoder fine-tuning reached ``decoder_target`` and stopped early."""


class Checkpointer:
    """Saves and restores the training state in ``<dir>``; each save replaces the folder atomically.

    A save writes the given modules and optimizers and carries over every other file of the previous checkpoint, so
    a phase that trains one module (the decoder) keeps the others' state (UNet, EMA, its optimizer) intact.

    The checkpoint also holds the run's tokenizer (``tokenizer/``): the text encoder's embedding rows mean the ids of
    the tokenizer it was trained with, so a resumed run must use that one, not a newly built one.
    """

    def __init__(self, directory: Path, tokenizer: CLIPTokenizer | None = None):
        self.dir = directory
        self.tokenizer = tokenizer
        """Written into every save (set it before the first save)."""

    def load_tokenizer(self) -> CLIPTokenizer:
        path = self.readable_dir() / "tokenizer"
        if not (path / "tokenizer_config.json").is_file():
            raise ValueError(
                f"{self.readable_dir()} holds no tokenizer/ folder (checkpoints written before it was saved there). "
                "Copy in the tokenizer/ folder of the pipeline that the same run saved (<out>/pipeline/tokenizer "
                "written by the run that made this checkpoint), then resume.")
        return CLIPTokenizer.from_pretrained(path)

    def exists(self) -> bool:
        return (self.readable_dir() / "state.json").is_file()

    def save(self, progress: Progress, modules: dict[str, torch.nn.Module], ema: EMA | None,
             optimizers: dict[str, torch.optim.Optimizer], config: TrainBackboneConfig):
        tmp = self.dir.with_name(self.dir.name + ".tmp")
        old = self.dir.with_name(self.dir.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, module in modules.items():
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors")
        if ema is not None:
            save_file({str(i): t.contiguous() for i, t in enumerate(ema.shadow)}, tmp / "ema.safetensors")
        for name, optimizer in optimizers.items():
            torch.save(optimizer.state_dict(), tmp / f"{name}.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"progress": asdict(progress), "config": asdict(config)}, indent=2))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp / "tokenizer")
        if self.exists():
            previous = self.readable_dir()
            for path in previous.iterdir():
                if not (tmp / path.name).exists():
                    (shutil.copytree if path.is_dir() else shutil.copy2)(path, tmp / path.name)
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def load_progress(self) -> Progress:
        directory = self.readable_dir()
        return Progress(**json.loads((directory / "state.json").read_text())["progress"])

    def load(self, modules: dict[str, torch.nn.Module], ema: EMA | None,
             optimizers: dict[str, torch.optim.Optimizer], device: torch.device):
        directory = self.readable_dir()
        for name, module in modules.items():
            module.load_state_dict(load_file(directory / f"{name}.safetensors", device=str(device)))
        if ema is not None and (directory / "ema.safetensors").is_file():
            saved = load_file(directory / "ema.safetensors", device=str(device))
            ema.shadow = [saved[str(i)] for i in range(len(saved))]
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(torch.load(directory / f"{name}.pt", map_location=device, weights_only=True))
        rng = torch.load(directory / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def readable_dir(self) -> Path:
        # A crash between the two renames in save() leaves only "<dir>.old", which is complete.
        return self.dir if (self.dir / "state.json").is_file() else self.dir.with_name(self.dir.name + ".old")


class StopFlag:
    """Set by SIGTERM / SIGINT so that the loop checkpoints and exits cleanly."""

    def __init__(self):
        self.stop = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, *_):
        self.stop = True


def _autocast(config: DenoiserTrainingConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)


def train_vae(config, vae, data, progress, checkpointer, deadline, stop, log, device):
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    if config.resume and checkpointer.exists() and progress.phase == "vae" and progress.step > 0:
        checkpointer.load({"vae": vae}, None, {"optimizer": optimizer}, device)
        log(f"resumed VAE phase at step {progress.step}")
    vae.train()
    weight = pixel_weights(data, config.vae_object_weight)
    started = time.monotonic()
    while progress.step < config.vae_steps and time.monotonic() < deadline and not stop.stop:
        idx = torch.randint(len(data), (config.vae_batch,), device=device)
        x = data.images[idx]
        with _autocast(config, device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = weighted_l1(recon, x, weight[idx]) + config.kl_weight * posterior.kl().float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step += 1
        if progress.step % config.log_every == 0:
            rate = progress.step / max(time.monotonic() - started, 1e-6)
            log(f"vae step {progress.step} loss {loss.item():.4f} ({rate:.1f} steps/s this run)")
        if progress.step % config.checkpoint_every == 0:
            checkpointer.save(progress, {"vae": vae}, None, {"optimizer": optimizer}, config)
    return optimizer


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Posterior means of ``images``, unscaled."""
    vae.eval()
    return torch.cat([vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


@torch.no_grad()
def vae_reconstruction_accuracy(vae, scaling_factor: float, device, n: int = 256) -> dict:
    """Recogniser accuracy on VAE reconstructions of ``n`` clean renders spread over all scenes (the ceiling for
    the backbone)."""
    scenes: list[Scene] = all_scenes()[:: max(1, len(all_scenes()) // n)]
    images = render_clean(scenes).to(device)
    latents = encode_latents(vae, images) * scaling_factor
    decoded = vae.decode(latents / scaling_factor).sample
    pil = [_to_pil(x) for x in decoded]
    return attribute_accuracy(pil, scenes)


def object_mask(data: SceneDataset) -> torch.Tensor:
    """(N, 1, H, W) bool: pixels that differ visibly from each image's background colour."""
    palette = torch.tensor([BACKGROUNDS[name] for name in ATTRIBUTE_VALUES["background"]], dtype=torch.float32)
    background = (palette / 127.5 - 1.0).to(data.images.device)[data.values[:, ATTRIBUTES.index("background")]]
    return (data.images - background[:, :, None, None]).abs().amax(dim=1, keepdim=True) > 0.1


def pixel_weights(data: SceneDataset, object_weight: float) -> torch.Tensor:
    """(N, 1, H, W) reconstruction-loss weights: 1 on background pixels, ``1 + object_weight`` on object pixels."""
    return 1.0 + object_weight * object_mask(data).float()


def weighted_l1(recon: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over pixels and channels, each pixel counted ``weight`` times (plain L1 for weight 1)."""
    return (weight * (recon.float() - target).abs()).sum() / (target.shape[1] * weight.sum())


def finetune_decoder(config, vae, data, progress, checkpointer, deadline, stop, log, device):
    """Train ``vae.decoder`` and ``vae.post_quant_conv`` on the frozen encoder's posterior samples.

    The encoder is untouched, so latents the UNet was trained on (and generates) keep their meaning; only how they
    are drawn improves. Stops at ``config.decoder_steps``, the deadline, or once every attribute's reconstruction
    accuracy reaches ``config.decoder_target``.
    """
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.decoder_lr, weight_decay=0.0)
    if progress.decoder_step > 0:
        checkpointer.load({"vae": vae}, None, {"decoder_optimizer": optimizer}, device)
        log(f"resumed decoder fine-tuning at step {progress.decoder_step}")
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        vae.eval()
        posterior = [vae.encode(data.images[i:i + 1024]).latent_dist for i in range(0, len(data), 1024)]
        mean, std = torch.cat([d.mean for d in posterior]), torch.cat([d.std for d in posterior])
    weight = pixel_weights(data, config.decoder_object_weight)
    vae.decoder.train()

    def save_and_check() -> bool:
        checkpointer.save(progress, {"vae": vae}, None, {"decoder_optimizer": optimizer}, config)
        accuracy = vae_reconstruction_accuracy(vae, progress.scaling_factor, device, n=len(all_scenes()))
        vae.decoder.train()
        log(f"decoder step {progress.decoder_step} reconstruction accuracy: " + _format_accuracy(accuracy))
        return all(accuracy[name]["accuracy"] >= config.decoder_target for name in ATTRIBUTES)

    started, start_step = time.monotonic(), progress.decoder_step
    last_time = started
    while progress.decoder_step < config.decoder_steps and time.monotonic() < deadline and not stop.stop:
        idx = torch.randint(len(data), (config.decoder_batch,), device=device)
        z = mean[idx] + std[idx] * torch.randn_like(mean[idx])
        with _autocast(config, device):
            recon = vae.decode(z).sample
        loss = weighted_l1(recon, data.images[idx], weight[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.decoder_step += 1
        progress.trained_seconds += time.monotonic() - last_time  # the checks below are not training time
        if progress.decoder_step % config.log_every == 0:
            rate = (progress.decoder_step - start_step) / max(time.monotonic() - started, 1e-6)
            log(f"decoder step {progress.decoder_step} loss {loss.item():.4f} ({rate:.2f} steps/s this run)")
        if progress.decoder_step % config.checkpoint_every == 0 and save_and_check():
            log(f"decoder reached reconstruction accuracy {config.decoder_target} on every attribute; stopping")
            progress.decoder_done = True
            checkpointer.save(progress, {"vae": vae}, None, {"decoder_optimizer": optimizer}, config)
            break
        last_time = time.monotonic()
    if progress.decoder_step % config.checkpoint_every and not progress.decoder_done:
        save_and_check()
    vae.eval().requires_grad_(False)


def _format_accuracy(accuracy: dict) -> str:
    return ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in accuracy.items())


def render_clean(scenes: list[Scene]) -> torch.Tensor:
    arrays = np.stack([np.asarray(render(s)) for s in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _to_pil(x: torch.Tensor):
    array = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def p_name_at(config: DenoiserTrainingConfig, step: int) -> float:
    frac = min(1.0, step / max(1, config.curriculum_steps))
    return config.p_name_start + frac * (config.p_name_end - config.p_name_start)


def sample_token_ids(config, caption_tokenizer: CaptionTokenizer, values: torch.Tensor, step: int) -> torch.Tensor:
    """Random captions of the scenes ``values``: curriculum naming, text budget, word shuffling, CFG dropout."""
    batch, n_attr = values.shape
    device = values.device
    named = torch.rand(batch, n_attr, device=device) < p_name_at(config, step)
    named &= ~(torch.rand(batch, 1, device=device) < config.p_uncond)
    budget = caption_tokenizer.length - 2
    score = torch.where(named, torch.rand(batch, n_attr, device=device),
                        torch.full_like(named, -1.0, dtype=torch.float))
    rank = score.argsort(dim=1, descending=True).argsort(dim=1)
    named &= rank < budget  # a random subset within the budget, not always the canonically first words
    canonical = torch.arange(n_attr, device=device, dtype=torch.float).expand(batch, n_attr)
    shuffle = torch.rand(batch, 1, device=device) < config.p_shuffle
    order_key = torch.where(shuffle, torch.rand(batch, n_attr, device=device), canonical)
    return caption_tokenizer(values, named, order_key)


def ema_pipeline(vae, text_encoder, tokenizer, unet, ema: EMA | None):
    """A pipeline around copies of ``unet`` and ``text_encoder`` that hold the EMA weights (the modules themselves,
    and their train/eval mode, are left as they are)."""
    unet, text_encoder = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    if ema is not None:
        ema.copy_to(list(unet.parameters()) + list(text_encoder.parameters()))
    return assemble_pipeline(vae.eval(), text_encoder.eval(), tokenizer, unet.eval())


def record_curve_point(config, out: Path, pipe, progress: Progress, log, step_key: str = "unet_step"):
    """Evaluate ``pipe`` with the curve settings; log it and append it to ``out/curve.jsonl``."""
    settings = EvalSettings(captions=config.curve_captions, seeds=config.curve_seeds, steps=config.eval_steps,
                            guidance_scales=[config.eval_guidance[0]])
    t0 = time.monotonic()
    accuracy = evaluate_pipeline(pipe, settings)["by_guidance"][str(config.eval_guidance[0])]
    point = {step_key: progress.step, "decoder_step": progress.decoder_step,
             "trained_seconds": round(progress.trained_seconds, 1), "settings": asdict(settings),
             "accuracy": {k: round(v["accuracy"], 4) for k, v in accuracy.items()}}
    with (out / "curve.jsonl").open("a") as f:
        f.write(json.dumps(point) + "\n")
    log(f"curve at {step_key.replace('_', ' ')} {progress.step} ({config.curve_captions} captions x "
        f"{config.curve_seeds} seeds, {time.monotonic() - t0:.0f}s): " + _format_accuracy(accuracy))


@dataclass
class DenoiserPhase:
    """What differs between backbones in the denoiser phase; :func:`train_denoiser` runs the shared loop."""

    name: str
    """Lower-case name in log lines and curve points ("unet": "unet step 10 ...", "unet_step")."""
    title: str
    """Name in the resume message ("resumed UNet phase at step 10")."""
    max_steps: int
    """Step cap (the time budget usually stops training first)."""
    params: list[torch.nn.Parameter]
    """Trained parameters (optimised, clipped, EMA-averaged in this order)."""
    modules: dict[str, torch.nn.Module]
    """Modules written to and restored from the checkpoint."""
    batch_loss: Callable[[int], torch.Tensor]
    """The loss of one freshly drawn batch at the given step."""
    ema_pipeline: Callable[[EMA | None], Any]
    """A pipeline holding copies of the models with the EMA weights (for curve points)."""


def train_denoiser(config: DenoiserTrainingConfig, phase: DenoiserPhase, progress: Progress,
                   checkpointer: Checkpointer, deadline: float, stop: StopFlag, log: Log, device: torch.device):
    """The denoiser loop: AdamW with linear warm-up, grad-clip 1, EMA, logging, checkpoints and curve points,
    until ``phase.max_steps``, the deadline or a stop signal. Returns ``(optimizer, ema)``."""
    optimizer = torch.optim.AdamW(phase.params, lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(phase.params, config.ema_decay) if config.ema_decay > 0 else None
    if config.resume and checkpointer.exists() and progress.step > 0:
        checkpointer.load(phase.modules, ema, {"optimizer": optimizer}, device)
        log(f"resumed {phase.title} phase at step {progress.step}")
    for module in phase.modules.values():
        if any(p.requires_grad for p in module.parameters()):
            module.train()
    started, start_step = time.monotonic(), progress.step
    last_time = started  # trained_seconds counts training, not the curve evaluations
    while progress.step < phase.max_steps and time.monotonic() < deadline and not stop.stop:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (progress.step + 1) / config.warmup_steps)
        loss = phase.batch_loss(progress.step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(phase.params, 1.0)
        optimizer.step()
        if ema is not None:
            ema.update(phase.params, progress.step)
        progress.step += 1
        if progress.step % config.log_every == 0:
            rate = (progress.step - start_step) / max(time.monotonic() - started, 1e-6)
            log(f"{phase.name} step {progress.step} loss {loss.item():.4f} p_name "
                f"{p_name_at(config, progress.step):.2f} ({rate:.1f} steps/s, {rate * config.batch_size:.0f} "
                "samples/s this run)")
        if progress.step % config.checkpoint_every == 0:
            checkpointer.save(progress, phase.modules, ema, {"optimizer": optimizer}, config)
        if config.curve_every and progress.step % config.curve_every == 0:
            progress.trained_seconds += time.monotonic() - last_time
            record_curve_point(config, Path(config.out), phase.ema_pipeline(ema), progress, log,
                               step_key=f"{phase.name}_step")
            last_time = time.monotonic()
    progress.trained_seconds += time.monotonic() - last_time
    return optimizer, ema


def train_unet(config, unet, text_encoder, latents, values, caption_tokenizer, progress, checkpointer, deadline,
               stop, log, device, vae, tokenizer):
    noise_scheduler = training_scheduler()
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(len(latents), (config.batch_size,), device=device)
        x0 = latents[idx]
        ids = sample_token_ids(config, caption_tokenizer, values[idx], step)
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,), device=device)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        target = noise_scheduler.get_velocity(x0, noise, t)
        with _autocast(config, device):
            hidden = text_encoder(ids)[0]
            pred = unet(noisy, t, hidden).sample
        return F.mse_loss(pred.float(), target)

    phase = DenoiserPhase(
        name="unet", title="UNet", max_steps=config.unet_steps,
        params=list(unet.parameters()) + list(text_encoder.parameters()),
        modules={"vae": vae, "unet": unet, "text_encoder": text_encoder}, batch_loss=batch_loss,
        ema_pipeline=lambda ema: ema_pipeline(vae, text_encoder, tokenizer, unet, ema))
    return train_denoiser(config, phase, progress, checkpointer, deadline, stop, log, device)


def load_trainable_modules(pipeline_dir: Path) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    """The VAE, text encoder and UNet of a saved pipeline folder, in float32 (shipped copies are float16)."""
    return (AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae", torch_dtype=torch.float32),
            CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder", dtype=torch.float32),
            UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet", torch_dtype=torch.float32))


def train(config: TrainBackboneConfig) -> dict:
    """Run (or resume) training within ``config.max_minutes``, then save the pipeline and evaluate it."""
    t_start = time.monotonic()
    deadline = t_start + 60.0 * config.max_minutes
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "train_log.txt")
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    checkpointer = Checkpointer(out / "checkpoint")
    resuming = config.resume and checkpointer.exists()
    if resuming:
        progress, tokenizer = checkpointer.load_progress(), checkpointer.load_tokenizer()
    elif config.init_from:
        progress = Progress(phase="unet")
        tokenizer = CLIPTokenizer.from_pretrained(Path(config.init_from) / "tokenizer")
    else:
        progress, tokenizer = Progress(), make_miniworld_tokenizer()
    checkpointer.tokenizer = tokenizer
    if not resuming:
        torch.manual_seed(config.seed)
    log(f"config {json.dumps(asdict(config))}")
    log(f"{'resuming' if resuming else 'starting'}: phase {progress.phase} step {progress.step}")

    if config.init_from:
        vae, text_encoder, unet = load_trainable_modules(Path(config.init_from))
        if not resuming:
            progress.scaling_factor = vae.config.scaling_factor
        log(f"initialised from {config.init_from}")
    else:
        sizes = backbone_sizes(config)
        vae, text_encoder, unet = build_vae(sizes), build_text_encoder(sizes, tokenizer), build_unet(sizes)
    vae, text_encoder, unet = vae.to(device), text_encoder.to(device), unet.to(device)
    log("params: vae {} text_encoder {} unet {}".format(
        *(sum(p.numel() for p in m.parameters()) for m in (vae, text_encoder, unet))))
    t0 = time.monotonic()
    data = render_dataset(config.variants, config.seed).to(device)
    log(f"dataset: {len(data)} images rendered in {time.monotonic() - t0:.1f}s")
    stop = StopFlag()

    if progress.phase == "vae":
        vae_deadline = min(deadline, t_start + 60.0 * config.max_minutes * config.vae_max_fraction)
        vae_optimizer = train_vae(config, vae, data, progress, checkpointer, vae_deadline, stop, log, device)
        std = encode_latents(vae, data.images).std().item()
        progress = Progress(phase="unet", step=0, scaling_factor=1.0 / std,
                            trained_seconds=progress.trained_seconds + time.monotonic() - t_start)
        vae.register_to_config(scaling_factor=progress.scaling_factor)
        checkpointer.save(progress, {"vae": vae}, None, {"optimizer": vae_optimizer}, config)
        log(f"vae done; latent std {std:.3f}, scaling_factor {progress.scaling_factor:.4f}")
    else:
        if resuming:
            vae.load_state_dict(load_file(checkpointer.readable_dir() / "vae.safetensors", device=str(device)))
        vae.register_to_config(scaling_factor=progress.scaling_factor)
    vae.requires_grad_(False)
    if progress.decoder_step < config.decoder_steps and not progress.decoder_done:
        finetune_decoder(config, vae, data, progress, checkpointer, deadline, stop, log, device)
    recon = vae_reconstruction_accuracy(vae, progress.scaling_factor, device)
    log("vae reconstruction accuracy: " + _format_accuracy(recon))

    latents = encode_latents(vae, data.images) * progress.scaling_factor
    optimizer, ema = train_unet(config, unet, text_encoder, latents, data.values, CaptionTokenizer(tokenizer, device),
                                progress, checkpointer, deadline, stop, log, device, vae, tokenizer)
    checkpointer.save(progress, {"vae": vae, "unet": unet, "text_encoder": text_encoder}, ema, {"optimizer": optimizer},
                      config)
    log(f"checkpoint saved at unet step {progress.step}")

    pipe = ema_pipeline(vae, text_encoder, tokenizer, unet, ema)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    log(f"pipeline saved to {out / 'pipeline'}")
    settings = EvalSettings(captions=config.eval_captions, seeds=config.eval_seeds, steps=config.eval_steps,
                            guidance_scales=list(config.eval_guidance))
    t0 = time.monotonic()
    result = evaluate_dir(out / "pipeline", settings, config.device, out / "eval.json", out / "samples.png")
    result["training"] = {"unet_steps": progress.step, "trained_seconds": round(progress.trained_seconds, 1),
                          "batch_size": config.batch_size, "vae_reconstruction_accuracy": recon}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (out / "eval.md").write_text(format_table(result) + "\n")
    log(f"evaluation ({time.monotonic() - t0:.1f}s) written to {out / 'eval.json'}")
    log(f"total wall time {time.monotonic() - t_start:.1f}s")
    return result


def parse_config(config_class: type, presets: dict[str, dict], argv: list[str] | None = None,
                 description: str | None = None):
    """Build ``config_class`` from command-line flags (one per field), on top of ``presets[--preset]``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = {f.name: f.default for f in fields(config_class)}
    for f in fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "out":
            parser.add_argument(flag, required=True, help="output folder")
        elif f.name == "preset":
            parser.add_argument(flag, choices=sorted(presets), default=f.default, help="defaults for a kind of machine")
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, type=float, nargs="+", default=None)
        else:
            parser.add_argument(flag, type=type(f.default), default=None)
    args = vars(parser.parse_args(argv))
    given = {k: v for k, v in args.items() if v is not None and k not in ("out", "preset")}
    merged = {**defaults, **presets[args["preset"]], **given, "out": args["out"], "preset": args["preset"]}
    return config_class(**merged)


def parse_args(argv: list[str] | None = None) -> TrainBackboneConfig:
    return parse_config(TrainBackboneConfig, PRESETS, argv, __doc__)


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
