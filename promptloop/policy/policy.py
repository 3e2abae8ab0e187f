"""The prompt-rewriting policy: a transformers image-text-to-text chat model with a LoRA adapter."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig, PreTrainedModel, ProcessorMixin
from transformers.utils import cached_file

from promptloop.backbones.types import Observation, RefineFn
from promptloop.policy.batch import PolicySample, collate_samples
from promptloop.policy.chat import build_chat
from promptloop.policy.config import PolicyConfig
from promptloop.policy.sanitize import PromptSchedule, missing_query_words, parse_prompt_schedule, sanitize_prompt

POLICY_CONFIG_NAME = "policy_config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_VISION_TOKEN_ATTRIBUTES = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass
class TokenLogProbs:
    """Per-token log-probabilities of completions (float32)."""

    log_probs: torch.Tensor
    """``(B, C)`` log pi(token | prefix) under the temperature-scaled distribution; 0 where ``mask`` is False."""
    mask: torch.Tensor
    """``(B, C)`` bool, True at real completion tokens (the end token included)."""
    entropy: Optional[torch.Tensor] = None
    """``(B, C)`` detached entropy (nats) of the sampled distribution at each position; 0 where masked."""


def _drops_query_word(prompt: str, kept_previous: bool, query: str) -> bool:
    """A new prompt (not the kept previous one) that leaves out a word of ``query`` (``keep_query_words``)."""
    return not kept_previous and bool(missing_query_words(prompt, query))


@dataclass
class PolicyActions:
    """What :meth:`PromptPolicy.act` returns for a batch of observations (one entry per observation)."""

    texts: list[str]
    """Raw decoded answers (special tokens removed)."""
    prompts: list[str]
    """Sanitized prompts, one per observation (a-priori mode: the step ``refinement_index`` of the schedule)."""
    kept_previous: list[bool]
    """The observation's current prompt was kept: the answer held no usable prompt, or it left out a word of the
    query while ``config.keep_query_words`` is on."""
    truncated: list[bool]
    """The prompt was cut to ``config.max_prompt_words`` words."""
    completion_ids: torch.Tensor
    """``(B, C)`` generated ids, right-padded with the pad token."""
    completion_mask: torch.Tensor
    """``(B, C)`` bool, True up to and including the first end token."""
    log_probs: torch.Tensor
    """``(B, C)`` float32 per-token log-probs from the generation logits (0 where masked)."""
    samples: list[PolicySample]
    """Per-observation inputs to re-run the same forward (see :meth:`PromptPolicy.log_probs`)."""
    schedules: Optional[list[PromptSchedule]] = None
    """A-priori mode only: the parsed schedule of every observation."""


def _resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _locate(path_or_id: str, filename: str) -> Optional[str]:
    """Path of ``filename`` inside ``path_or_id`` (local folder or hub repo), or None where it has none."""
    local = Path(path_or_id)
    if local.is_dir():
        candidate = local / filename
        return str(candidate) if candidate.is_file() else None
    return cached_file(
        path_or_id, filename, _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )


class PromptPolicy:
    """A chat VLM that writes the next text-to-image prompt from an :class:`Observation`.

    Sampling (:meth:`act`), teacher-forced log-probs (:meth:`log_probs`) and the adapter-off reference
    (:meth:`reference`) all use one model. Log-probs are float32 and belong to the distribution sampled from:
    logits / temperature with the suppressed (special and vision) tokens excluded; top-p truncation is ignored.
    """

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, config: PolicyConfig) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.system_prompt = config.resolved_system_prompt()
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        base = self.base_model
        base_generation = base.generation_config
        eos = base_generation.eos_token_id if base_generation.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids = sorted({eos} if isinstance(eos, int) else set(eos))
        if not self.eos_token_ids:
            raise ValueError("The model has no end token: set generation_config.eos_token_id or tokenizer.eos_token.")
        pad = base_generation.pad_token_id if base_generation.pad_token_id is not None else tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]
        self.suppressed_token_ids = self._suppressed_tokens(base)
        # A clean generation config: hub defaults (repetition penalty, top-k, ...) would change the sampled
        # distribution away from the one whose log-probs we compute.
        base.generation_config = GenerationConfig(
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id, bos_token_id=base_generation.bos_token_id,
        )

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: Union[str, Path],
        config: Optional[PolicyConfig] = None,
        *,
        device: Union[str, torch.device, None] = None,
        add_adapter: bool = True,
        is_trainable: bool = True,
        base_model_name_or_path: Optional[str] = None,
    ) -> "PromptPolicy":
        """Load a saved policy or wrap a base chat VLM.

        - ``path_or_id`` holds ``policy_config.json`` (a saved policy): the base model named in it (a path
          starting with ``./`` or ``../`` is relative to the saved folder; ``base_model_name_or_path`` overrides
          it) is loaded and the saved adapter attached (trainable if ``is_trainable``).
          ``config``, if given, replaces the saved sampling/chat settings; the model and LoRA fields stay the saved
          ones. ``trust_remote_code`` comes only from ``config`` (False without one), never from the saved file.
        - Otherwise ``path_or_id`` is a base model; ``config`` (default: ``PolicyConfig()``) gives the settings and
          a fresh LoRA adapter is added when ``add_adapter``.
        """
        path_or_id = str(path_or_id)
        saved_config_path = _locate(path_or_id, POLICY_CONFIG_NAME)
        if saved_config_path is not None:
            saved = PolicyConfig.load(saved_config_path)
            base = saved.model_name_or_path
            if base.startswith(("./", "../")):
                base = str((Path(saved_config_path).parent / base).resolve())
            caller = config or PolicyConfig()  # a downloaded folder must not switch remote code on
            config = dataclasses.replace(
                config or saved,
                model_name_or_path=base_model_name_or_path or base,
                lora_r=saved.lora_r, lora_alpha=saved.lora_alpha, lora_dropout=saved.lora_dropout,
                lora_target_modules=saved.lora_target_modules,
                trust_remote_code=caller.trust_remote_code,
            )
        else:
            config = dataclasses.replace(config or PolicyConfig(), model_name_or_path=path_or_id)
        device = _resolve_device(device)
        model = AutoModelForImageTextToText.from_pretrained(
            config.model_name_or_path, dtype=config.torch_dtype(device), device_map={"": device},
            trust_remote_code=config.trust_remote_code,
        )
        processor = AutoProcessor.from_pretrained(
            path_or_id if saved_config_path is not None else config.model_name_or_path,
            trust_remote_code=config.trust_remote_code,
        )
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.eval()
        policy = cls(model, processor, config)  # cleans the generation config before peft wraps the model
        if saved_config_path is not None:
            if _locate(path_or_id, ADAPTER_CONFIG_NAME) is not None:
                policy.model = PeftModel.from_pretrained(model, path_or_id, is_trainable=is_trainable)
        elif add_adapter:
            policy.model = get_peft_model(model, policy.lora_config())
        policy.model.eval()
        return policy

    def lora_config(self) -> LoraConfig:
        """The peft LoRA config described by ``self.config``."""
        return LoraConfig(
            r=self.config.lora_r, lora_alpha=self.config.lora_alpha, lora_dropout=self.config.lora_dropout,
            target_modules=self.config.lora_target_modules, bias="none",
        )

    def save_pretrained(self, save_directory: Union[str, Path]) -> None:
        """Write the adapter (safetensors), ``policy_config.json`` and the processor (tokenizer, chat template).

        The folder is self-contained apart from the base model it names, and can be pushed to the hub as is.
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        if self.has_adapter:
            self.model.save_pretrained(save_directory, safe_serialization=True)
        self.processor.save_pretrained(save_directory)
        self.config.save(save_directory / POLICY_CONFIG_NAME)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def has_adapter(self) -> bool:
        return isinstance(self.model, PeftModel)

    @property
    def base_model(self) -> PreTrainedModel:
        """The transformers model under the adapter."""
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _suppressed_tokens(self, base: PreTrainedModel) -> list[int]:
        """Special tokens (vision placeholders, chat markers, ...) that must never be generated, end tokens excepted."""
        tokenizer = self.processor.tokenizer
        ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        for attribute in _VISION_TOKEN_ATTRIBUTES:
            value = getattr(base.config, attribute, None)
            if value is not None:
                ids.add(value)
        vocab_size = base.get_output_embeddings().weight.shape[0]
        return sorted(i for i in ids - set(self.eos_token_ids) if i < vocab_size)

    # -------------------------------------------------------------------------------------------------- sampling
    def _generation_config(self) -> GenerationConfig:
        config = self.config
        return GenerationConfig(
            do_sample=config.do_sample, temperature=config.temperature if config.do_sample else None,
            top_p=config.top_p if config.do_sample else None, top_k=0 if config.do_sample else None,
            repetition_penalty=1.0, max_new_tokens=config.max_new_tokens, suppress_tokens=self.suppressed_token_ids,
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id, output_logits=True,
            return_dict_in_generate=True, cache_implementation=config.cache_implementation,
        )

    def _encode(self, observations: Sequence[Observation]) -> tuple[dict, list[int]]:
        chats = [build_chat(o, self.config.mode, self.system_prompt) for o in observations]
        texts = [
            self.processor.apply_chat_template(chat.messages, add_generation_prompt=True, tokenize=False)
            for chat in chats
        ]
        images = [image for chat in chats for image in chat.images]
        kwargs = {}
        if images:
            kwargs = {"images": images, "size": {"shortest_edge": self.config.min_pixels,
                                                 "longest_edge": self.config.max_pixels}}
        encoding = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs)
        return dict(encoding), [len(chat.images) for chat in chats]

    def _sampling_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 ``logits / temperature`` with suppressed tokens at -inf: the distribution sampled from."""
        logits = logits.float() / self.config.temperature
        if self.suppressed_token_ids:
            logits[..., self.suppressed_token_ids] = float("-inf")
        return logits

    def _token_log_probs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """float32 log-probs of ``tokens`` under ``logits / temperature`` with suppressed tokens excluded."""
        logits = self._sampling_logits(logits)
        return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    @torch.no_grad()
    def _entropy(self, logits: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(self._sampling_logits(logits.detach()), dim=-1)
        return -(log_p.exp() * log_p.masked_fill(torch.isinf(log_p), 0.0)).sum(-1)

    @torch.no_grad()
    def act(
        self,
        observations: Sequence[Observation],
        *,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> PolicyActions:
        """Sample one answer per observation, in one left-padded batch.

        ``seed`` (or a seed drawn from ``generator``) makes sampling reproducible without touching the global RNG.
        The model runs in eval mode during generation and returns to its previous mode afterwards.
        """
        if not observations:
            raise ValueError("act() needs at least one observation.")
        if seed is not None and generator is not None:
            raise ValueError("Pass either seed or generator, not both.")
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        encoding, images_per_sample = self._encode(observations)
        inputs = {k: v.to(self.device) for k, v in encoding.items()}
        was_training = self.model.training
        self.model.eval()
        rng_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):
                if seed is not None:
                    torch.manual_seed(seed)
                output = self.model.generate(**inputs, generation_config=self._generation_config())
        finally:
            self.model.train(was_training)

        prompt_len = inputs["input_ids"].shape[1]
        completion_ids = output.sequences[:, prompt_len:]
        is_end = torch.isin(completion_ids, torch.tensor(self.eos_token_ids, device=completion_ids.device))
        # True up to and including the first end token.
        completion_mask = (is_end.long().cumsum(-1) - is_end.long()) == 0
        completion_ids = completion_ids.masked_fill(~completion_mask, self.pad_token_id)
        # Step by step: a float32 copy of all the logits at once would be (B, C, vocab).
        log_probs = torch.stack(
            [self._token_log_probs(step_logits, completion_ids[:, i]) for i, step_logits in enumerate(output.logits)],
            dim=1,
        ).masked_fill(~completion_mask, 0.0)

        samples = self._split_samples(encoding, images_per_sample, completion_ids, completion_mask)
        texts = self.processor.tokenizer.batch_decode(
            [s.completion_ids for s in samples], skip_special_tokens=True
        )
        actions = PolicyActions(
            texts=texts, prompts=[], kept_previous=[], truncated=[], completion_ids=completion_ids,
            completion_mask=completion_mask, log_probs=log_probs, samples=samples,
        )
        self._fill_prompts(actions, observations)
        return actions

    def _split_samples(
        self, encoding: dict, images_per_sample: list[int], completion_ids: torch.Tensor, completion_mask: torch.Tensor
    ) -> list[PolicySample]:
        grid = encoding.get("image_grid_thw")
        patches_per_image = grid.prod(-1).tolist() if grid is not None else []
        samples, image_start, patch_start = [], 0, 0
        for row, num_images in enumerate(images_per_sample):
            keep = encoding["attention_mask"][row].bool()
            pixel_values = image_grid_thw = None
            if num_images:
                num_patches = sum(patches_per_image[image_start:image_start + num_images])
                pixel_values = encoding["pixel_values"][patch_start:patch_start + num_patches].clone()
                image_grid_thw = grid[image_start:image_start + num_images].clone()
                image_start += num_images
                patch_start += num_patches
            samples.append(PolicySample(
                prompt_ids=encoding["input_ids"][row][keep].clone(),
                mm_token_type_ids=encoding["mm_token_type_ids"][row][keep].clone(),
                completion_ids=completion_ids[row][completion_mask[row]].cpu(),
                pixel_values=pixel_values, image_grid_thw=image_grid_thw,
            ))
        return samples

    def _fill_prompts(self, actions: PolicyActions, observations: Sequence[Observation]) -> None:
        max_words = self.config.max_prompt_words
        if self.config.mode == "apriori":
            actions.schedules = []
        guard = self.config.keep_query_words
        for text, observation in zip(actions.texts, observations):
            if self.config.mode == "apriori":
                schedule = parse_prompt_schedule(text, observation.num_refinements, observation.prompt, max_words)
                previous = observation.prompt
                for i in range(len(schedule.prompts)):  # later refinements read the schedule: guard every step
                    if guard and _drops_query_word(schedule.prompts[i], schedule.missing[i], observation.query):
                        schedule.prompts[i], schedule.missing[i], schedule.truncated[i] = previous, True, False
                    previous = schedule.prompts[i]
                k = min(observation.refinement_index, observation.num_refinements - 1)
                actions.schedules.append(schedule)
                prompt, kept, truncated = schedule.prompts[k], schedule.missing[k], schedule.truncated[k]
            else:
                result = sanitize_prompt(text, observation.prompt, max_words)
                prompt, kept, truncated = result.prompt, result.kept_previous, result.truncated
                if guard and _drops_query_word(prompt, kept, observation.query):
                    prompt, kept, truncated = observation.prompt, True, False
            actions.prompts.append(prompt)
            actions.kept_previous.append(kept)
            actions.truncated.append(truncated)

    # --------------------------------------------------------------------------------------------------- scoring
    def log_probs(self, samples: Sequence[PolicySample]) -> TokenLogProbs:
        """Teacher-forced float32 per-token log-probs of the samples' completions, in one batch.

        Gives the numbers :meth:`act` returned (same layout and positions as generation). Gradients flow when grad
        mode is on (wrap in ``torch.no_grad()`` for old-policy or reference log-probs); LoRA dropout applies only
        in train mode.
        """
        batch = collate_samples(samples, self.pad_token_id, self.device)
        completion_len = batch.completion_ids.shape[1]
        logits = self.model(
            **batch.model_inputs, use_cache=False, logits_to_keep=completion_len + 1
        ).logits[:, :-1]
        log_probs = self._token_log_probs(logits, batch.completion_ids)
        entropy = self._entropy(logits).masked_fill(~batch.completion_mask, 0.0)
        return TokenLogProbs(log_probs=log_probs.masked_fill(~batch.completion_mask, 0.0), mask=batch.completion_mask,
                             entropy=entropy)

    @contextlib.contextmanager
    def reference(self) -> Iterator["PromptPolicy"]:
        """Within this context the policy is the base model: the LoRA adapter is switched off (no second copy)."""
        if not self.has_adapter:
            raise RuntimeError("This policy has no LoRA adapter, so it has no separate reference model; load it "
                               "with add_adapter=True or from a saved policy.")
        with self.model.disable_adapter():
            yield self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------------------- integration
    def as_refine_fn(self, seed: Optional[int] = None) -> RefineFn:
        """A :data:`RefineFn` for the sampler; ``seed`` makes the sequence of calls reproducible.

        In a-priori mode the schedule is written at refinement 0 of each row and read back at later refinements.
        """
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        schedules: dict[tuple[int, str], list[str]] = {}

        def refine(observations: list[Observation]) -> list[str]:
            if self.config.mode != "apriori":
                return self.act(observations, generator=generator).prompts
            fresh = [o for o in observations if o.refinement_index == 0 or (o.row, o.query) not in schedules]
            if fresh:
                actions = self.act(fresh, generator=generator)
                for observation, schedule in zip(fresh, actions.schedules):
                    schedules[(observation.row, observation.query)] = schedule.prompts
            return [schedules[(o.row, o.query)][min(o.refinement_index, len(schedules[(o.row, o.query)]) - 1)]
                    for o in observations]

        return refine

