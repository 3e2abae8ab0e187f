"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``) as a step-wise backbone, plus what every
flow-matching family shares.

The loop reproduces ``StableDiffusion3Pipeline.__call__`` with the pipeline's own methods (``encode_prompt``,
``prepare_latents``, ``retrieve_timesteps``/``calculate_shift``) on a private copy of its scheduler, so that running
:meth:`SD3Backbone.step` over all steps without prompt changes equals ``pipe(prompt, generator=[...])``.
Not supported: skip-layer guidance (``skip_guidance_layers``), IP-Adapter, ``clip_skip`` and per-encoder prompts
(``prompt_2``/``prompt_3``).
"""
from __future__ import annotations

import copy
import os
from abc import abstractmethod
from typing import Any, ClassVar, Optional

import diffusers
import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import get_module_execution_device

from .base import SAFE_WEIGHTS, Backbone, PromptEmbeds, SamplerState, StepResult, vae_decode_kwargs
from .preview import decode_with_tiny_autoencoder, resize_longest_side
from .stable_diffusion import absent_components, check_pipeline_folder, saved_model_index
from .types import SamplerSettings, negative_prompt_rows

MAX_T5_SEQUENCE_LENGTH = 512
"""The longest ``max_sequence_length`` the SD3 and FLUX pipelines accept."""


class FlowMatchingBackbone(Backbone):
    """What SD3 and FLUX share: a T5 budget (``max_sequence_length``), the rectified-flow x0 estimate, the
    ``scaling_factor``/``shift_factor`` VAE decode and loading by pipeline class.

    Args:
        pipe: the user's pipeline (transformer, LoRA, scheduler, dtype, device and offload stay in effect).
        preview_decoder: optional cheap decoder for previews (e.g. ``AutoencoderTiny``; the latents are unscaled
            once with its own ``scaling_factor``/``shift_factor``, as a pipeline whose ``vae`` it is does); final
            images use the VAE.
        max_sequence_length: the T5 budget, as the pipeline's argument (default: the family's, see
            :meth:`default_max_sequence_length`).
        lora_scale: LoRA scale for the text encoders and the transformer, as the pipeline's
            ``joint_attention_kwargs={"scale": ...}``.
    """

    extra_keys: ClassVar[frozenset[str]]
    """Keys of ``SamplerSettings.extra`` this family understands; any other key is an error."""

    def __init__(
        self,
        pipe: Any,
        preview_decoder: Optional[torch.nn.Module] = None,
        max_sequence_length: Optional[int] = None,
        lora_scale: Optional[float] = None,
    ):
        super().__init__(pipe, preview_decoder=preview_decoder)
        if max_sequence_length is None:
            max_sequence_length = self.default_max_sequence_length()
        if (not isinstance(max_sequence_length, int) or isinstance(max_sequence_length, bool)
                or not 1 <= max_sequence_length <= MAX_T5_SEQUENCE_LENGTH):
            raise ValueError(
                f"max_sequence_length must be an int in 1..{MAX_T5_SEQUENCE_LENGTH} (the T5 token budget), "
                f"got {max_sequence_length!r}."
            )
        self.max_sequence_length = max_sequence_length
        self.lora_scale = lora_scale

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        preview_decoder: Optional[torch.nn.Module] = None,
        max_sequence_length: Optional[int] = None,
        lora_scale: Optional[float] = None,
    ) -> "FlowMatchingBackbone":
        """Wrap a loaded pipeline (nothing is copied); arguments as in the class docstring."""
        if type(pipe).__name__ not in cls.pipeline_class_names:
            return super().from_pipeline(pipe)  # raises the contract's TypeError
        return cls(pipe, preview_decoder=preview_decoder, max_sequence_length=max_sequence_length,
                   lora_scale=lora_scale)

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | os.PathLike,
        preview_decoder: Optional[torch.nn.Module] = None,
        max_sequence_length: Optional[int] = None,
        lora_scale: Optional[float] = None,
        **kwargs: Any,
    ) -> "FlowMatchingBackbone":
        """Load with ``<PipelineClass>.from_pretrained(id_or_path, **kwargs)`` (``dtype``,
        ``text_encoder_3=None``, ``variant``, ... pass through) and wrap it as :meth:`from_pipeline` does.

        A local folder saved by another pipeline class is rejected before any weights load. Components a local folder
        was saved without (``[null, null]`` in its ``model_index.json``, e.g. an SD3 pipeline without T5) load as
        ``None`` (diffusers would otherwise ask for them). Weights load from safetensors files only
        (``use_safetensors=False`` lets diffusers fall back to pickled ``.bin`` files).
        """
        check_pipeline_folder(id_or_path, cls.pipeline_class_names)
        absent = absent_components(saved_model_index(id_or_path) or {})
        pipe = getattr(diffusers, cls.pipeline_class_names[0]).from_pretrained(
            id_or_path, **{**SAFE_WEIGHTS, **absent, **kwargs})
        return cls.from_pipeline(pipe, preview_decoder=preview_decoder, max_sequence_length=max_sequence_length,
                                 lora_scale=lora_scale)

    @property
    def joint_attention_kwargs(self) -> Optional[dict[str, float]]:
        """What the pipeline passes to its transformer for ``lora_scale``."""
        return None if self.lora_scale is None else {"scale": self.lora_scale}

    @abstractmethod
    def default_max_sequence_length(self) -> int:
        """The T5 budget used when none is given."""

    @property
    @abstractmethod
    def primary_tokenizer(self) -> Any:
        """The tokenizer whose budget limits prompts (T5 where present)."""

    @property
    @abstractmethod
    def primary_max_length(self) -> int:
        """Token positions the primary tokenizer fills, special tokens included."""

    @property
    def text_budget(self) -> int:
        """Content tokens of the primary text encoder: its length minus the special tokens the tokenizer adds
        (T5: ``max_sequence_length - 1`` for ``</s>``; CLIP: 77 - 2), so that a prompt with
        ``count_tokens(p) <= text_budget`` is never cut by the tokenizer."""
        num_special = len(self.primary_tokenizer("").input_ids)
        return self.primary_max_length - num_special

    def count_tokens(self, prompt: str) -> int:
        tokenizer = self.primary_tokenizer
        if hasattr(self.pipe, "maybe_convert_prompt"):  # textual-inversion tokens expand to several
            prompt = self.pipe.maybe_convert_prompt(prompt, tokenizer)
        return len(tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids)

    def noise_level(self, state: SamplerState, i: int) -> float:
        return float(state.scheduler.sigmas[i].clamp(0.0, 1.0))

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the VAE reads them, ``(B, C, h, w)``; identity unless the family packs them."""
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: Optional[int] = None, preview: bool = False,
               generators: Optional[list[torch.Generator]] = None) -> torch.Tensor:
        latents = self.unpack(latents)
        if preview and self.preview_decoder is not None:
            images = decode_with_tiny_autoencoder(self.preview_decoder, latents)
        else:
            vae = self.pipe.vae
            scaled = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            scaled = scaled.to(device=get_module_execution_device(vae), dtype=vae.dtype)
            decoded = vae.decode(scaled, return_dict=False, **vae_decode_kwargs(vae, generators))[0]
            images = self.pipe.image_processor.postprocess(decoded, output_type="pt")
        if preview:
            return resize_longest_side(images, size)
        self.pipe.maybe_free_model_hooks()  # as the pipeline does after its final decode (CPU offload)
        return images

    def _check_settings(self, settings: SamplerSettings) -> None:
        unknown = sorted(set(settings.extra) - self.extra_keys)
        if unknown:
            raise ValueError(
                f"SamplerSettings.extra keys {unknown} are not supported by {type(self).__name__}; "
                f"supported: {sorted(self.extra_keys)}."
            )
        steps = settings.num_inference_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {steps!r}.")

    def _flow_step(self, state: SamplerState, i: int, velocity: torch.Tensor) -> StepResult:
        """Scheduler step with the guided velocity; x0 = x_t - sigma_t * v with sigma_t read before the step,
        in the scheduler's own precision (so that the last step's x0 equals its x_{t-1} when sigma_next = 0)."""
        scheduler, t, latents = state.scheduler, state.timesteps[i], state.latents
        index = scheduler.step_index
        if index is None:  # the scheduler picks its first index this way inside step()
            index = scheduler.begin_index if scheduler.begin_index is not None else scheduler.index_for_timestep(t)
        sigma = scheduler.sigmas[index]
        x0 = (latents.to(torch.float32) - sigma * velocity).to(velocity.dtype)
        state.latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        return StepResult(latents=state.latents, x0=x0)


class SD3Backbone(FlowMatchingBackbone):
    """``StableDiffusion3Pipeline`` (SD3, SD3.5): three text encoders, T5 optional (``text_encoder_3=None``
    gives zero T5 embeddings, as in the pipeline), pooled CLIP projections, classifier-free guidance.

    ``SamplerSettings``: ``guidance_scale`` defaults to the pipeline's 7.0 (CFG when > 1, negative prompt
    defaults to ""), ``height``/``width`` to the transformer's sample size. ``extra``: ``sigmas`` (custom
    schedule), ``mu`` (dynamic-shifting value; computed from the image size as the pipeline does when the
    scheduler uses dynamic shifting).
    """

    family = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    extra_keys = frozenset({"sigmas", "mu"})
    default_guidance_scale = 7.0

    def __init__(self, pipe: Any, **kwargs: Any):
        missing = [name for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is None]
        if missing:
            raise ValueError(f"SD3Backbone needs the pipeline's CLIP text encoders to re-encode prompts; {missing} "
                             "is None. Load the pipeline with its text encoders (only text_encoder_3 may be None).")
        super().__init__(pipe, **kwargs)

    def default_max_sequence_length(self) -> int:
        """256, the default of ``StableDiffusion3Pipeline.__call__``."""
        return 256

    @property
    def has_t5(self) -> bool:
        return self.pipe.text_encoder_3 is not None

    @property
    def primary_tokenizer(self) -> Any:
        return self.pipe.tokenizer_3 if self.has_t5 else self.pipe.tokenizer

    @property
    def primary_max_length(self) -> int:
        return self.max_sequence_length if self.has_t5 else self.pipe.tokenizer_max_length

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            lora_scale=self.lora_scale,
        )
        return PromptEmbeds({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled})

    def _embeds_dtype(self) -> torch.dtype:
        """dtype of ``encode_prompt``'s output (CLIP embeds concatenated with T5 or zero embeds)."""
        pipe = self.pipe
        t5_dtype = pipe.text_encoder_3.dtype if self.has_t5 else pipe.text_encoder.dtype
        return torch.promote_types(pipe.text_encoder.dtype, t5_dtype)

    @torch.no_grad()
    def prepare(self, settings: SamplerSettings, generators: list[torch.Generator]) -> SamplerState:
        self._check_settings(settings)
        pipe, device = self.pipe, self.device
        height = settings.height or pipe.default_sample_size * pipe.vae_scale_factor
        width = settings.width or pipe.default_sample_size * pipe.vae_scale_factor
        multiple = pipe.vae_scale_factor * pipe.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} for this pipeline, got "
                             f"{height}x{width}; use {height - height % multiple}x{width - width % multiple}.")
        guidance_scale = (settings.guidance_scale if settings.guidance_scale is not None
                          else self.default_guidance_scale)
        latents = pipe.prepare_latents(len(generators), pipe.transformer.config.in_channels, height, width,
                                       self._embeds_dtype(), device, list(generators))
        scheduler = copy.deepcopy(pipe.scheduler)
        mu = settings.extra.get("mu")
        if mu is None and scheduler.config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            mu = calculate_shift(
                (latents.shape[2] // patch) * (latents.shape[3] // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler_kwargs = {} if mu is None else {"mu": mu}
        timesteps, _ = retrieve_timesteps(scheduler, settings.num_inference_steps, device,
                                          sigmas=settings.extra.get("sigmas"), **scheduler_kwargs)
        negative = None
        if guidance_scale > 1:
            batch = len(generators)
            negative = self.encode_prompts(negative_prompt_rows(settings.negative_prompt, batch) or [""] * batch)
        return SamplerState(latents=latents, timesteps=timesteps, scheduler=scheduler, settings=settings,
                            guidance_scale=guidance_scale, negative=negative)

    @torch.no_grad()
    def step(self, state: SamplerState, i: int, embeds: PromptEmbeds) -> StepResult:
        prompt_embeds = embeds.tensors["prompt_embeds"]
        pooled = embeds.tensors["pooled_prompt_embeds"]
        model_input = state.latents
        if state.negative is not None:
            prompt_embeds = torch.cat([state.negative.tensors["prompt_embeds"], prompt_embeds])
            pooled = torch.cat([state.negative.tensors["pooled_prompt_embeds"], pooled])
            model_input = torch.cat([model_input] * 2)
        velocity = self.pipe.transformer(
            hidden_states=model_input, timestep=state.timesteps[i].expand(model_input.shape[0]),
            encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
            joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False,
        )[0]
        if state.negative is not None:
            uncond, cond = velocity.chunk(2)
            velocity = uncond + state.guidance_scale * (cond - uncond)
        return self._flow_step(state, i, velocity)
