"""Stable Diffusion 1.x / 2.x (epsilon and v-prediction) as a step-wise backbone.

Each method replays the matching part of ``StableDiffusionPipeline.__call__`` through the pipeline's own
methods (``encode_prompt``, ``prepare_latents``, ``prepare_extra_step_kwargs``, ``image_processor``), so a rollout
without refinements equals ``pipe(prompts, generator=[...], output_type="pt")``. The safety checker is not applied
(images are the raw decode, as with ``safety_checker=None``).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, ClassVar, Optional

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps

from .base import SAFE_WEIGHTS, Backbone, PromptEmbeds, SamplerState, StepResult, vae_decode_kwargs
from .preview import decode_with_tiny_autoencoder, resize_longest_side
from .types import SamplerSettings, negative_prompt_rows

COMMON_EXTRA_KEYS = ("guidance_rescale", "eta", "timesteps", "sigmas")


class StableDiffusionBackbone(Backbone):
    """Adapter for ``StableDiffusionPipeline``; also the UNet-family base of the SDXL adapter.

    Args:
        pipe: the user's pipeline (its UNet, LoRA, scheduler, dtype, device and offload stay in effect).
        preview_decoder: optional cheap decoder for previews (e.g. ``AutoencoderTiny``); final images always use
            the pipeline's VAE.
        clip_skip: CLIP layers to skip when encoding prompts, as the pipeline's ``clip_skip`` argument.
        lora_scale: LoRA scale for text encoder(s) and UNet, as ``cross_attention_kwargs={"scale": ...}``.

    ``SamplerSettings.extra`` accepts ``guidance_rescale``, ``eta``, ``timesteps`` and ``sigmas`` with the
    pipeline's meaning.
    """

    family: ClassVar[str] = "stable-diffusion"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)
    default_guidance_scale: ClassVar[float] = 7.5
    extra_keys: ClassVar[tuple[str, ...]] = COMMON_EXTRA_KEYS

    def __init__(
        self,
        pipe: Any,
        preview_decoder: Optional[torch.nn.Module] = None,
        clip_skip: Optional[int] = None,
        lora_scale: Optional[float] = None,
    ):
        super().__init__(pipe, preview_decoder=preview_decoder)
        self.clip_skip = clip_skip
        self.lora_scale = lora_scale

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        preview_decoder: Optional[torch.nn.Module] = None,
        clip_skip: Optional[int] = None,
        lora_scale: Optional[float] = None,
    ) -> "StableDiffusionBackbone":
        backbone = super().from_pipeline(pipe, preview_decoder=preview_decoder)
        backbone.clip_skip, backbone.lora_scale = clip_skip, lora_scale
        return backbone

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | os.PathLike,
        preview_decoder: Optional[torch.nn.Module] = None,
        clip_skip: Optional[int] = None,
        lora_scale: Optional[float] = None,
        **kwargs: Any,
    ) -> "StableDiffusionBackbone":
        """Load the diffusers pipeline (``kwargs`` go to its ``from_pretrained``, e.g. ``dtype``) and wrap it.

        A local folder saved by another pipeline family is rejected before any weights load. Weights load from
        safetensors files only (``use_safetensors=False`` lets diffusers fall back to pickled ``.bin`` files).
        """
        import diffusers

        check_pipeline_folder(id_or_path, cls.pipeline_class_names)
        pipe = getattr(diffusers, cls.pipeline_class_names[0]).from_pretrained(id_or_path, **{**SAFE_WEIGHTS, **kwargs})
        return cls.from_pipeline(pipe, preview_decoder=preview_decoder, clip_skip=clip_skip, lora_scale=lora_scale)

    # ---- text
    @property
    def text_budget(self) -> int:
        """Content tokens of the first CLIP encoder: ``model_max_length`` (77) minus BOS/EOS, i.e. 75."""
        return self.pipe.tokenizer.model_max_length - 2

    def count_tokens(self, prompt: str) -> int:
        tokenizer = self.pipe.tokenizer
        if hasattr(self.pipe, "maybe_convert_prompt"):  # textual-inversion tokens expand to several
            prompt = self.pipe.maybe_convert_prompt(prompt, tokenizer)
        return len(tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, _ = self.pipe.encode_prompt(
            prompts, self.device, 1, False, lora_scale=self.lora_scale, clip_skip=self.clip_skip
        )
        return PromptEmbeds({"prompt_embeds": prompt_embeds})

    def _negative_embeds(self, negatives: Optional[list[str]], batch: int) -> PromptEmbeds:
        """``batch`` rows of CFG negative embeddings (``negatives``: one per row, or ``None`` for the pipeline's
        default), computed by ``encode_prompt`` exactly as the pipeline does."""
        _, negative = self.pipe.encode_prompt(
            [""] * batch, self.device, 1, True, negative_prompt=negatives, lora_scale=self.lora_scale,
            clip_skip=self.clip_skip,
        )
        return PromptEmbeds({"prompt_embeds": negative})

    def _embeds_dtype(self) -> torch.dtype:
        encoder = self.pipe.text_encoder
        return encoder.dtype if encoder is not None else self.pipe.unet.dtype

    # ---- sampling
    def _default_size(self) -> tuple[int, int]:
        size = self.pipe.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return size[0] * self.pipe.vae_scale_factor, size[1] * self.pipe.vae_scale_factor

    def _check_settings(self, settings: SamplerSettings) -> tuple[int, int]:
        unknown = sorted(set(settings.extra) - set(self.extra_keys))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} does not understand SamplerSettings.extra keys {unknown}; "
                f"allowed: {list(self.extra_keys)}."
            )
        default_h, default_w = self._default_size()
        height, width = settings.height or default_h, settings.width or default_w
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be divisible by 8, got {height} x {width}.")
        return height, width

    def prepare(self, settings: SamplerSettings, generators: list[torch.Generator]) -> SamplerState:
        height, width = self._check_settings(settings)
        pipe, extra, batch = self.pipe, settings.extra, len(generators)
        guidance = self.default_guidance_scale if settings.guidance_scale is None else float(settings.guidance_scale)
        do_cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
        negatives = negative_prompt_rows(settings.negative_prompt, batch)
        negative = self._negative_embeds(negatives, batch) if do_cfg else None
        timesteps, _ = retrieve_timesteps(
            pipe.scheduler, settings.num_inference_steps, self.device, extra.get("timesteps"), extra.get("sigmas")
        )
        latents = pipe.prepare_latents(
            batch, pipe.unet.config.in_channels, height, width, self._embeds_dtype(), self.device, generators
        )
        extras: dict[str, Any] = {
            "do_cfg": do_cfg,
            "guidance_rescale": float(extra.get("guidance_rescale", 0.0)),
            "step_kwargs": pipe.prepare_extra_step_kwargs(generators, extra.get("eta", 0.0)),
            "timestep_cond": None,
            "height": height,
            "width": width,
        }
        if pipe.unet.config.time_cond_proj_dim is not None:
            guidance_tensor = torch.tensor(guidance - 1).repeat(batch)
            extras["timestep_cond"] = pipe.get_guidance_scale_embedding(
                guidance_tensor, embedding_dim=pipe.unet.config.time_cond_proj_dim
            ).to(device=self.device, dtype=latents.dtype)
        state = SamplerState(
            latents=latents, timesteps=timesteps, scheduler=copy.deepcopy(pipe.scheduler), settings=settings,
            guidance_scale=guidance, negative=negative, extras=extras,
        )
        self._finish_prepare(state)
        return state

    def _finish_prepare(self, state: SamplerState) -> None:
        """Family-specific additions to the state (SDXL: time ids, scheduler begin index)."""

    def _unet_conditioning(
        self, state: SamplerState, embeds: PromptEmbeds
    ) -> tuple[torch.Tensor, Optional[dict[str, torch.Tensor]]]:
        """``encoder_hidden_states`` and ``added_cond_kwargs`` for the UNet, in the CFG layout [negative, cond]."""
        cond = embeds.tensors["prompt_embeds"]
        if not state.extras["do_cfg"]:
            return cond, None
        return torch.cat([state.negative.tensors["prompt_embeds"], cond]), None

    def step(self, state: SamplerState, i: int, embeds: PromptEmbeds) -> StepResult:
        if len(embeds) != state.latents.shape[0]:
            raise ValueError(f"step got {len(embeds)} prompt rows for a batch of {state.latents.shape[0]}.")
        scheduler, latents, t, do_cfg = state.scheduler, state.latents, state.timesteps[i], state.extras["do_cfg"]
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        if hasattr(scheduler, "scale_model_input"):
            model_input = scheduler.scale_model_input(model_input, t)
        hidden_states, added_cond = self._unet_conditioning(state, embeds)
        prediction = self.pipe.unet(
            model_input, t, encoder_hidden_states=hidden_states, timestep_cond=state.extras["timestep_cond"],
            cross_attention_kwargs=None if self.lora_scale is None else {"scale": self.lora_scale},
            added_cond_kwargs=added_cond, return_dict=False,
        )[0]
        if do_cfg:
            uncond, text = prediction.chunk(2)
            prediction = uncond + state.guidance_scale * (text - uncond)
            if state.extras["guidance_rescale"] > 0.0:
                prediction = rescale_noise_cfg(prediction, text, guidance_rescale=state.extras["guidance_rescale"])
        out = scheduler.step(prediction, t, latents, **state.extras["step_kwargs"], return_dict=True)
        state.latents = out.prev_sample
        return StepResult(latents=out.prev_sample, x0=self._x0(out, scheduler, latents, prediction, t, i))

    @staticmethod
    def _x0(out: Any, scheduler: Any, sample: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor, i: int):
        """The scheduler's own x0 (``pred_original_sample``, LCM's ``denoised``), else the EDM preconditioning at
        ``scheduler.sigmas[i]`` for EDM schedulers (``precondition_outputs``), else the epsilon/v/flow formula at
        :func:`signal_and_noise` of evaluation ``i``.

        Every sigma-space diffusers scheduler (Euler, Heun, LMS, KDPM2, EDM-Euler, ...) returns
        ``pred_original_sample``; EDM-DPM-Solver does not; the others (DPM-Solver, UniPC, DEIS, PNDM, TCD) work on
        VP samples, or flow samples with ``use_flow_sigmas``, where the formulas below hold.
        """
        for name in ("pred_original_sample", "denoised"):
            x0 = getattr(out, name, None)
            if x0 is not None:
                return x0
        if hasattr(scheduler, "precondition_outputs"):
            sigma = scheduler.sigmas[i].to(sample.device)
            return scheduler.precondition_outputs(sample.float(), prediction.float(), sigma).to(sample.dtype)
        alpha, sigma = signal_and_noise(scheduler, t, i)
        kind = scheduler.config.prediction_type
        if kind == "flow_prediction" and not getattr(scheduler.config, "use_flow_sigmas", False):
            raise ValueError("prediction_type='flow_prediction' needs a scheduler with use_flow_sigmas=True.")
        if kind == "epsilon":
            x0 = (sample.float() - sigma * prediction.float()) / alpha
        elif kind == "v_prediction":
            x0 = alpha * sample.float() - sigma * prediction.float()
        elif kind == "flow_prediction":
            x0 = sample.float() - sigma * prediction.float()
        elif kind == "sample":
            x0 = prediction.float()
        else:
            raise ValueError(f"Cannot compute x0 for prediction_type={kind!r}.")
        return x0.to(sample.dtype)

    def noise_level(self, state: SamplerState, i: int) -> float:
        """The noise coefficient ``sigma_t`` of :func:`signal_and_noise` at evaluation ``i``, in [0, 1]
        (1 = pure noise): ``sqrt(1 - alpha_bar_t)`` for VP samples, the sigma itself for flow sigmas."""
        return min(max(signal_and_noise(state.scheduler, state.timesteps[i], i)[1], 0.0), 1.0)

    # ---- decoding
    def decode(self, latents: torch.Tensor, size: Optional[int] = None, preview: bool = False,
               generators: Optional[list[torch.Generator]] = None) -> torch.Tensor:
        if preview:
            if self.preview_decoder is not None:
                images = decode_with_tiny_autoencoder(self.preview_decoder, latents)
            else:
                images = self._postprocess(self._vae_decode(latents, generators))
            return resize_longest_side(images, size)
        images = self._postprocess(self._vae_decode(latents, generators))
        self.pipe.maybe_free_model_hooks()
        return images

    def _vae_decode(self, latents: torch.Tensor, generators: Optional[list[torch.Generator]]) -> torch.Tensor:
        vae = self.pipe.vae
        # x0 from a scheduler that upcasts (e.g. Euler) may be float32 under an fp16 VAE
        return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False,
                          **vae_decode_kwargs(vae, generators))[0]

    def _postprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.pipe.image_processor.postprocess(
            images, output_type="pt", do_denormalize=[True] * images.shape[0]
        )


def signal_and_noise(scheduler: Any, timestep: Any, i: int) -> tuple[float, float]:
    """``(alpha_t, sigma_t)`` with ``x_t = alpha_t * x0 + sigma_t * noise`` before denoiser evaluation ``i``, as the
    scheduler reads its samples: from ``scheduler.sigmas[i]`` for sigma-space schedulers (``use_flow_sigmas``:
    ``(1 - s, s)``; else VP sigmas, EDM and continuous timesteps included: ``(1, s) / sqrt(1 + s^2)``), else from
    ``alphas_cumprod`` at ``timestep`` (DDIM, PNDM, LCM, ...)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        sigma = float(sigmas[i])
        if getattr(scheduler.config, "use_flow_sigmas", False):
            return 1.0 - sigma, sigma
        alpha = (1.0 + sigma * sigma) ** -0.5
        return alpha, sigma * alpha
    alphas_cumprod = scheduler.alphas_cumprod
    alpha_bar = float(alphas_cumprod[min(max(int(round(float(timestep))), 0), len(alphas_cumprod) - 1)])
    return alpha_bar ** 0.5, max(1.0 - alpha_bar, 0.0) ** 0.5


def saved_model_index(id_or_path: str | os.PathLike) -> Optional[dict]:
    """``model_index.json`` of a local diffusers pipeline folder; ``None`` for anything that is not a folder."""
    path = os.fspath(id_or_path)
    if not os.path.isdir(path):
        return None
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json).")
    with open(index) as f:
        return json.load(f)


def absent_components(index: dict) -> dict[str, None]:
    """``{name: None}`` for each component a ``model_index.json`` records as saved without (``[null, null]``, e.g.
    SD3's ``text_encoder_3`` when T5 was left out): diffusers loads such a folder only when they are passed as None."""
    return {name: None for name, entry in index.items() if not name.startswith("_") and entry == [None, None]}


def saved_pipeline_class(id_or_path: str | os.PathLike) -> Optional[str]:
    """``_class_name`` of a local diffusers pipeline folder; ``None`` for anything that is not a folder (hub id)."""
    index = saved_model_index(id_or_path)
    return None if index is None else index.get("_class_name")


def check_pipeline_folder(id_or_path: str | os.PathLike, accepted: tuple[str, ...]) -> None:
    """Raise a clear error if a local pipeline folder was saved by a pipeline class outside ``accepted``.

    Hub ids are not checked here; ``from_pipeline`` checks the loaded pipeline's class.
    """
    saved_class = saved_pipeline_class(id_or_path)
    if saved_class is not None and saved_class not in accepted:
        raise ValueError(
            f"{os.fspath(id_or_path)} holds a {saved_class}, not one of {accepted}; use "
            "promptloop.backbones.auto_backbone(path) to pick the adapter for it."
        )
