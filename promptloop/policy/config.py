"""Configuration of the prompt-rewriting policy."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch

POLICY_MODES = ("closed", "oneshot", "apriori")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_IMPLEMENTATIONS = (None, "static")
POLICY_CONFIG_NAME = "policy_config.json"
"""The file a saved policy's :class:`PolicyConfig` is written to; a folder or hub repo holding it is a saved policy."""

DEFAULT_LORA_TARGET_MODULES = (r".*(language_model|text_model).*\."
                               r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
"""LoRA on every attention and MLP projection of the language model; the vision tower stays frozen."""


@dataclass
class PolicyConfig:
    """Everything that defines a :class:`~promptloop.policy.PromptPolicy` apart from its weights.

    Saved next to the adapter as ``policy_config.json``.
    """

    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-VL-3B-Instruct",
        metadata={"help": "Hub id or local path of the base image-text-to-text chat model. In a saved policy's "
                          "policy_config.json, a path starting with './' or '../' is relative to that folder (a "
                          "shipped adapter next to its base)."},
    )
    model_revision: Optional[str] = field(
        default=None,
        metadata={"help": "Branch, tag or commit of model_name_or_path on the hub (None: its default branch). A saved "
                          "policy records the revision of its base model here."},
    )
    mode: str = field(
        default="closed",
        metadata={"help": "'closed': rewrite at each refinement from the x0 preview (PromptLoop). 'oneshot': one "
                          "rewrite of the query before sampling, no image (RePrompt-style baseline). 'apriori': write "
                          "the prompts of all refinements at once, before sampling, no image."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (> 0)."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (> 0); scale = alpha / r."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "LoRA dropout in [0, 1). 0 keeps train-mode log-probs equal to the sampling ones, so "
                          "the on-policy PPO ratio is exactly 1."},
    )
    lora_target_modules: Union[str, list[str]] = field(
        default=DEFAULT_LORA_TARGET_MODULES,
        metadata={"help": "Modules that get LoRA: a regex (full match on module names) or a list of name suffixes "
                          "(peft semantics). The default covers the language model only."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: 'auto' (bfloat16 on CUDA, float32 otherwise), 'float32', 'bfloat16' or "
                          "'float16'. Log-probs are always computed in float32."},
    )
    do_sample: bool = field(
        default=True, metadata={"help": "Sample (training, diverse rewrites); False decodes greedily (evaluation)."}
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature (> 0). Log-probs are those of the temperature-scaled distribution."},
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling mass in (0, 1]. Log-probs ignore the truncation (as TRL does), so keep "
                          "1.0 for training."},
    )
    max_new_tokens: int = field(default=96, metadata={"help": "Most tokens generated per answer (> 0)."})
    cache_implementation: Optional[str] = field(
        default=None,
        metadata={"help": "KV cache of generation: None (transformers' dynamic cache) or 'static' (preallocated for "
                          "max_new_tokens; on a GPU transformers then compiles the decode step with torch.compile, "
                          "paying a compile on the first calls). Tokens and log-probs are unchanged (tested)."},
    )
    max_prompt_words: Optional[int] = field(
        default=None,
        metadata={"help": "Cut sanitized prompts to this many words (None: no cut). The sampler fits the exact "
                          "token budget of each backbone's text encoder afterwards."},
    )
    keep_query_words: bool = field(
        default=False,
        metadata={"help": "Reject a rewrite that leaves out any word of the user's query: the prompt in force is kept "
                          "instead (counted like an answer with no usable prompt). Meant for small fixed vocabularies "
                          "such as the mini world's; free-text rewrites of real models paraphrase, so keep it off "
                          "there."},
    )
    system_prompt: Optional[str] = field(
        default=None,
        metadata={"help": "System prompt text of the mode it was written for (`system_prompt_mode`); None: "
                          "`system_prompts`, else the default prompt written for each mode."},
    )
    system_prompt_file: Optional[str] = field(
        default=None, metadata={"help": "Read the system prompt from this UTF-8 text file (exclusive with "
                                        "`system_prompt`)."},
    )
    system_prompt_mode: Optional[str] = field(
        default=None,
        metadata={"help": "The mode `system_prompt` was written for (None: `mode`, recorded when the config is made; "
                          "None without a system prompt). A policy switched to another mode (an evaluation method, "
                          "one-shot or a-priori prompts) gets that mode's prompt from `system_prompts`, else the "
                          "default prompt written for it."},
    )
    system_prompts: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "System prompts of further modes, by mode ('closed', 'oneshot', 'apriori'), for a policy "
                          "written for several modes; `system_prompt` takes precedence in `system_prompt_mode`."},
    )
    min_pixels: int = field(
        default=64 * 28 * 28,
        metadata={"help": "Fewest pixels the preview is resized to by the processor (> 0). Qwen-VL only: Gemma 3 "
                          "and Idefics3 resize every image to their fixed size."},
    )
    max_pixels: int = field(
        default=256 * 28 * 28,
        metadata={"help": "Most pixels the preview is resized to by the processor (>= min_pixels; Qwen-VL only). "
                          "Qwen2.5-VL turns each 28x28 block into one vision token: 256*28*28 is at most 256 tokens."},
    )
    image_splitting: bool = field(
        default=False,
        metadata={"help": "Idefics3/SmolVLM only: split each preview into crops of the model's image size plus a "
                          "global view, as its processor does by default (a 256 px preview upscaled to 2048 px: 17 "
                          "images for SmolVLM). Off: one image at the model's size."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the hub repository (only for trusted repos)."}
    )

    def __post_init__(self) -> None:
        custom = self.system_prompt is not None or self.system_prompt_file is not None
        self.system_prompt_mode = (self.system_prompt_mode or self.mode) if custom else None
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and how to fix it."""
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is empty; give a hub id or a local model directory.")
        if self.mode not in POLICY_MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {POLICY_MODES}.")
        if not (isinstance(self.lora_r, int) and self.lora_r > 0):
            raise ValueError(f"lora_r={self.lora_r!r} must be a positive integer.")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be > 0.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; give a regex or a list of module names.")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be 'auto' or one of {tuple(DTYPES)}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0 (use do_sample=False for greedy).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1].")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer.")
        if self.cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(f"cache_implementation={self.cache_implementation!r} must be one of "
                             f"{CACHE_IMPLEMENTATIONS} (None is transformers' dynamic cache).")
        if self.max_prompt_words is not None and not (
            isinstance(self.max_prompt_words, int) and self.max_prompt_words > 0
        ):
            raise ValueError(f"max_prompt_words={self.max_prompt_words!r} must be a positive integer or None.")
        if self.system_prompt is not None and self.system_prompt_file is not None:
            raise ValueError("Set either system_prompt or system_prompt_file, not both.")
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise ValueError("system_prompt is blank; leave it None to use the default system prompt.")
        if self.system_prompt_file is not None and not Path(self.system_prompt_file).is_file():
            raise ValueError(f"system_prompt_file={self.system_prompt_file!r} does not exist.")
        if self.system_prompt_mode not in (None, *POLICY_MODES):
            raise ValueError(f"system_prompt_mode={self.system_prompt_mode!r} is not one of {POLICY_MODES}.")
        for mode, prompt in self.system_prompts.items():
            if mode not in POLICY_MODES:
                raise ValueError(f"system_prompts has a prompt for mode {mode!r}, not one of {POLICY_MODES}.")
            if not (isinstance(prompt, str) and prompt.strip()):
                raise ValueError(f"system_prompts[{mode!r}]={prompt!r} must be a non-blank string; leave the mode "
                                 "out to use its default system prompt.")
        if not (isinstance(self.min_pixels, int) and self.min_pixels > 0):
            raise ValueError(f"min_pixels={self.min_pixels!r} must be a positive integer.")
        if not (isinstance(self.max_pixels, int) and self.max_pixels >= self.min_pixels):
            raise ValueError(f"max_pixels={self.max_pixels!r} must be an integer >= min_pixels={self.min_pixels}.")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The weights dtype on ``device`` ('auto': bfloat16 on CUDA, float32 elsewhere)."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def resolved_system_prompt(self) -> Optional[str]:
        """The user's system prompt (inline or read from the file), or None for the mode's default."""
        if self.system_prompt_file is not None:
            return Path(self.system_prompt_file).read_text(encoding="utf-8")
        return self.system_prompt

    def system_prompt_for(self, mode: str) -> Optional[str]:
        """The system prompt of ``mode``: the user's in the mode it was written for (``system_prompt_mode``), else
        ``system_prompts[mode]``; None for that mode's default."""
        if mode == self.system_prompt_mode:
            return self.resolved_system_prompt()
        return self.system_prompts.get(mode)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PolicyConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown PolicyConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON; a system prompt file is inlined so the file stands alone."""
        data = self.to_dict()
        data["system_prompt"] = self.resolved_system_prompt()
        data["system_prompt_file"] = None
        Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "PolicyConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


LOOP_CONFIG_NAME = "loop_config.json"
"""The file of a saved policy's :class:`LoopDefaults` (written for policies that were trained by promptloop)."""


@dataclass(frozen=True)
class LoopDefaults:
    """How a policy was trained to be called: the inference API and ``promptloop sample`` use these when the caller
    does not say (as transformers' ``generate`` uses a model's ``generation_config.json``)."""

    num_refinements: int
    initial_rewrite: bool

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "LoopDefaults":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        try:
            defaults = cls(num_refinements=data["num_refinements"], initial_rewrite=data["initial_rewrite"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a loop config (num_refinements, initial_rewrite): {e}") from e
        if isinstance(defaults.num_refinements, bool) or not isinstance(defaults.num_refinements, int) \
                or defaults.num_refinements < 0 or not isinstance(defaults.initial_rewrite, bool):
            raise ValueError(f"{path}: num_refinements must be an int >= 0 and initial_rewrite a bool, got {data}")
        return defaults
