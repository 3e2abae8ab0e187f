"""Train mini-world backbone B: an SD3 transformer and two CLIP text encoders by flow matching on backbone A's latents.

    python -m promptloop.miniworld.train_flow_backbone --out DIR [--preset cpu|gpu|tiny] [--device cuda]
        [--max-minutes M] [--resume] [--curve-every N] [--vae-from PIPELINE_DIR]

The VAE is backbone A's (``--vae-from``, default the shipped ``assets/backbone_a``), frozen: the dataset is encoded
once (posterior means, A's ``scaling_factor``) and there is no VAE phase. Everything else is ``train_backbone``'s
denoiser phase (data, caption curriculum, CFG dropout, word shuffling, EMA, AdamW, atomic checkpoints, ``--resume``,
curve points, final evaluation) with the flow-matching objective of SD3:
noise levels ``sigma`` drawn logit-normal (or uniform) and shifted like the sampler's schedule, ``x_t = (1 - sigma)
x0 + sigma noise``, target velocity ``noise - x0``, timestep ``1000 sigma``, and the prompt conditioning built as
``StableDiffusion3Pipeline.encode_prompt`` builds it without T5 (:func:`backbone_b.encode_prompt_ids`).

Writes into DIR what ``train_backbone`` writes: ``checkpoint/``, ``pipeline/`` (``StableDiffusion3Pipeline``,
EMA weights), ``eval.json``, ``eval.md``, ``samples.png``, ``train_log.txt`` and, with ``--curve-every``,
``curve.jsonl``.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from transformers import CLIPTokenizer

from .backbone import SHIPPED_BACKBONE_A
from .backbone_b import FLOW_SHIFT, T5_SEQUENCE_LENGTH, TINY_SIZES_B, BackboneBSizes, assemble_sd3_pipeline, \
    build_text_encoders, build_transformer, encode_prompt_ids, load_frozen_vae, vae_latent_shape
from .data import render_dataset
from .evaluate_backbone import EvalSettings, evaluate_dir, format_table
from .tokenizer import CaptionTokenizer
from .train_backbone import EMA, Checkpointer, DenoiserPhase, DenoiserTrainingConfig, Log, Progress, StopFlag, \
    _autocast, encode_latents, parse_config, sample_token_ids, train_denoiser

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")


@dataclass
class TrainFlowConfig(DenoiserTrainingConfig):
    """Every setting of a backbone B run: the shared denoiser settings plus the flow-matching and size ones."""

    seed: int = 1
    """Seed of the dataset and of every random draw in training (backbone A used 0)."""
    steps: int = 1_000_000
    """Transformer steps cap (the time budget usually stops training first)."""
    vae_from: str = str(SHIPPED_BACKBONE_A)
    """Pipeline folder whose ``vae/`` (frozen) and ``tokenizer/`` backbone B uses."""
    timestep_sampling: str = "logit_normal"
    """How training draws noise levels before the shift: "logit_normal" (SD3) or "uniform"."""
    logit_mean: float = 0.0
    """Mean of the logit-normal draw."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal draw."""
    shift: float = FLOW_SHIFT
    """Timestep shift, of the shipped scheduler and of the training noise levels alike."""
    num_layers: int = 4
    """MMDiT blocks."""
    num_heads: int = 4
    """Attention heads."""
    head_dim: int = 32
    """Width of one head."""
    patch_size: int = 0
    """Transformer patch size; 0: a quarter of the latent side, i.e. 16 image tokens (2 on 8 x 8 latents, as the
    shipped B; 4 on 16 x 16, where patch 2 costs 3x per step: docs/miniworld.md)."""
    eval_steps: int = 10
    """Sampling steps in the evaluation (the RL runs sample with 10)."""
    eval_guidance: tuple[float, ...] = (4.0, 2.0)
    """Guidance scales evaluated (the first is also used for ``samples.png`` and curve points)."""

    def __post_init__(self):
        super().__post_init__()
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {self.timestep_sampling!r}.")
        if self.shift <= 0 or self.logit_std <= 0:
            raise ValueError(f"shift and logit_std must be positive, got {self.shift} and {self.logit_std}.")
        if not (Path(self.vae_from) / "vae" / "config.json").is_file():
            raise ValueError(f"--vae-from {self.vae_from} holds no vae/ folder; pass a saved backbone A pipeline "
                             "folder (default: promptloop/miniworld/assets/backbone_a).")
        self.sizes()  # validates the sizes before anything loads

    def sizes(self) -> BackboneBSizes:
        """The model sizes, on the latents of ``vae_from``'s VAE."""
        channels, side = vae_latent_shape(self.vae_from)
        if self.tiny:
            return replace(TINY_SIZES_B, latent_channels=channels, latent_size=side)
        return BackboneBSizes(latent_channels=channels, latent_size=side, num_layers=self.num_layers,
                              num_heads=self.num_heads, head_dim=self.head_dim, patch_size=self.patch_size or side // 4)


PRESETS: dict[str, dict] = {
    "cpu": dict(batch_size=64, lr=1e-3, warmup_steps=100, curriculum_steps=1000, checkpoint_every=200, log_every=25),
    "gpu": dict(device="cuda", variants=8, batch_size=1024, lr=1e-3, warmup_steps=200, curriculum_steps=1500,
                bf16=True, checkpoint_every=500, log_every=100, eval_captions=64, eval_seeds=8,
                eval_guidance=(4.0, 2.0, 7.0)),
    "tiny": dict(tiny=True, variants=1, batch_size=4, warmup_steps=1, curriculum_steps=2, ema_decay=0.9,
                 checkpoint_every=2, log_every=1, eval_captions=2, eval_seeds=2, eval_steps=2),
}


class RepeatedTokenJointAttnProcessor:
    """SD3 joint attention in which the last context token stands for ``last_context_repeats`` identical copies.

    Without T5 the pipeline appends ``T5_SEQUENCE_LENGTH`` zero tokens to the prompt sequence. They are identical,
    every layer maps them alike, so they stay identical: attending to them equals attending to one of them with its
    softmax weight multiplied by their number (a ``log(repeats)`` bias on its logit). Training computes one such
    token instead of 256: the same function of the weights (so the same loss and gradients, up to rounding) at a
    fraction of the cost. ``last_context_repeats=1`` is plain joint attention. Passed per call through
    ``transformer(..., joint_attention_kwargs={"last_context_repeats": n})``; qk-norm and dual attention are not
    supported (backbone B has neither).
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, last_context_repeats: int = 1) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None or attn.norm_q is not None:
            raise ValueError("RepeatedTokenJointAttnProcessor supports joint attention without masks or qk-norm.")
        batch, n_image = hidden_states.shape[:2]

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query = split_heads(torch.cat([attn.to_q(hidden_states), attn.add_q_proj(encoder_hidden_states)], dim=1))
        key = split_heads(torch.cat([attn.to_k(hidden_states), attn.add_k_proj(encoder_hidden_states)], dim=1))
        value = split_heads(torch.cat([attn.to_v(hidden_states), attn.add_v_proj(encoder_hidden_states)], dim=1))
        bias = torch.zeros(1, 1, 1, key.shape[2], dtype=query.dtype, device=query.device)
        bias[..., -1] = math.log(last_context_repeats)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        image, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def sample_sigmas(config: TrainFlowConfig, batch: int, device: torch.device) -> torch.Tensor:
    """Training noise levels: u ~ logit-normal or uniform, then the schedule's shift ``s u / (1 + (s - 1) u)``."""
    if config.timestep_sampling == "logit_normal":
        u = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(batch, device=device))
    else:
        u = torch.rand(batch, device=device)
    return config.shift * u / (1 + (config.shift - 1) * u)


def flow_matching_loss(transformer, text_encoders, x0: torch.Tensor, ids: torch.Tensor, sigma: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted and the true velocity ``noise - x0`` at ``x_t = (1 - sigma) x0 + sigma noise``,
    conditioned as the pipeline conditions (CLIP sequence + ``T5_SEQUENCE_LENGTH`` zero tokens, pooled vector;
    the zero tokens computed once, see :class:`RepeatedTokenJointAttnProcessor`)."""
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    prompt_embeds, pooled = encode_prompt_ids(text_encoders, ids, t5_tokens=1)
    pred = transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=prompt_embeds,
                       pooled_projections=pooled,
                       joint_attention_kwargs={"last_context_repeats": T5_SEQUENCE_LENGTH}).sample
    return F.mse_loss(pred.float(), (noise - x0).float())


def flow_ema_pipeline(vae, text_encoders, tokenizer, transformer, ema: EMA | None, shift: float):
    """A stock pipeline around copies of the models that hold the EMA weights and the stock attention."""
    transformer, text_encoders = copy.deepcopy(transformer), copy.deepcopy(text_encoders)
    if ema is not None:
        ema.copy_to(list(transformer.parameters()) + [p for e in text_encoders for p in e.parameters()])
    transformer.set_attn_processor(JointAttnProcessor2_0())
    return assemble_sd3_pipeline(vae, [e.eval() for e in text_encoders], tokenizer, transformer.eval(), shift)


def train(config: TrainFlowConfig) -> dict:
    """Run (or resume) training within ``config.max_minutes``, then save the pipeline and evaluate it."""
    t_start = time.monotonic()
    deadline = t_start + 60.0 * config.max_minutes
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "train_log.txt")
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    checkpointer = Checkpointer(out / "checkpoint")
    resuming = config.resume and checkpointer.exists()
    progress = checkpointer.load_progress() if resuming else None
    tokenizer = (checkpointer.load_tokenizer() if resuming
                 else CLIPTokenizer.from_pretrained(Path(config.vae_from) / "tokenizer"))
    checkpointer.tokenizer = tokenizer
    if not resuming:
        torch.manual_seed(config.seed)
    log(f"config {json.dumps(asdict(config))}")
    log(f"{'resuming' if resuming else 'starting'} at step {progress.step if resuming else 0}")

    vae = load_frozen_vae(config.vae_from).to(device)
    sizes = config.sizes()
    if progress is None:
        progress = Progress(phase="flow", scaling_factor=vae.config.scaling_factor)
    transformer = build_transformer(sizes).to(device)
    text_encoders = [e.to(device) for e in build_text_encoders(sizes, tokenizer)]
    transformer.set_attn_processor(RepeatedTokenJointAttnProcessor())
    log("params: transformer {} text_encoder {} text_encoder_2 {}".format(
        *(sum(p.numel() for p in m.parameters()) for m in (transformer, *text_encoders))))
    t0 = time.monotonic()
    data = render_dataset(config.variants, config.seed).to(device)
    latents = encode_latents(vae, data.images) * progress.scaling_factor
    values = data.values
    del data
    log(f"dataset: {len(latents)} images rendered and encoded in {time.monotonic() - t0:.1f}s "
        f"(latent std {latents.std().item():.3f})")
    caption_tokenizer = CaptionTokenizer(tokenizer, device)

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(len(latents), (config.batch_size,), device=device)
        x0 = latents[idx]
        ids = sample_token_ids(config, caption_tokenizer, values[idx], step)
        noise = torch.randn_like(x0)
        sigma = sample_sigmas(config, config.batch_size, device)
        with _autocast(config, device):
            return flow_matching_loss(transformer, text_encoders, x0, ids, sigma, noise)

    modules = {"vae": vae, "transformer": transformer, "text_encoder": text_encoders[0],
               "text_encoder_2": text_encoders[1]}
    phase = DenoiserPhase(
        name="flow", title="flow", max_steps=config.steps,
        params=list(transformer.parameters()) + [p for e in text_encoders for p in e.parameters()],
        modules=modules, batch_loss=batch_loss,
        ema_pipeline=lambda ema: flow_ema_pipeline(vae, text_encoders, tokenizer, transformer, ema, config.shift))
    stop = StopFlag()
    optimizer, ema = train_denoiser(config, phase, progress, checkpointer, deadline, stop, log, device)
    checkpointer.save(progress, modules, ema, {"optimizer": optimizer}, config)
    log(f"checkpoint saved at step {progress.step}")

    pipe = phase.ema_pipeline(ema)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    log(f"pipeline saved to {out / 'pipeline'}")
    settings = EvalSettings(captions=config.eval_captions, seeds=config.eval_seeds, steps=config.eval_steps,
                            guidance_scales=list(config.eval_guidance))
    t0 = time.monotonic()
    result = evaluate_dir(out / "pipeline", settings, config.device, out / "eval.json", out / "samples.png")
    result["training"] = {"steps": progress.step, "trained_seconds": round(progress.trained_seconds, 1),
                          "batch_size": config.batch_size}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (out / "eval.md").write_text(format_table(result) + "\n")
    log(f"evaluation ({time.monotonic() - t0:.1f}s) written to {out / 'eval.json'}")
    log(f"total wall time {time.monotonic() - t_start:.1f}s")
    return result


def parse_args(argv: list[str] | None = None) -> TrainFlowConfig:
    return parse_config(TrainFlowConfig, PRESETS, argv, __doc__)


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
