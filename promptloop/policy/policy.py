"""The prompt-rewriting policy: a transformers image-text-to-text chat model with a LoRA adapter."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    ProcessorMixin,
)

from promptloop.backbones.types import Observation
from promptloop.policy.batch import PolicySample, collate_samples, split_image_inputs
from promptloop.policy.config import LOOP_CONFIG_NAME, PolicyConfig
from promptloop.policy.families import image_processor_kwargs, vlm_family
from promptloop.policy.hub import MODEL_CARD_NAME, policy_model_card, push_policy_folder
from promptloop.policy.writer import (
    ADAPTER_CONFIG_NAME,
    POLICY_CONFIG_NAME,
    PromptActions,
    PromptWriter,
    check_row_seeds,
    end_token_ids,
    resolve_policy_config,
    resolve_seed,
    suppressed_token_ids,
)

__all__ = ["ADAPTER_CONFIG_NAME", "POLICY_CONFIG_NAME", "PolicyActions", "PromptPolicy",
           "TokenLogProbs"]

@dataclass
class TokenLogProbs:
    """Per-token log-probabilities of completions (float32)."""

    log_probs: torch.Tensor
    """``(B, C)`` log pi(token | prefix) under the temperature-scaled distribution; 0 where ``mask`` is False."""
    mask: torch.Tensor
    """``(B, C)`` bool, True at real completion tokens (the end token included)."""
    entropy: Optional[torch.Tensor] = None
    """``(B, C)`` detached entropy (nats) of the sampled distribution at each position; 0 where masked."""


@dataclass(kw_only=True)
class PolicyActions(PromptActions):
    """What :meth:`PromptPolicy.act` returns: the prompts, plus what training needs to score the answers again."""

    completion_ids: torch.Tensor
    """``(B, C)`` generated ids, right-padded with the pad token."""
    completion_mask: torch.Tensor
    """``(B, C)`` bool, True up to and including the first end token."""
    log_probs: torch.Tensor
    """``(B, C)`` float32 per-token log-probs from the generation logits (0 where masked)."""
    samples: list[PolicySample]
    """Per-observation inputs to re-run the same forward (see :meth:`PromptPolicy.log_probs`)."""


def _resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` with the tokens outside each row's top-p nucleus set to 0 (not renormalised): the most likely
    tokens whose probabilities sum to ``top_p``, the token that crosses it included, always at least one."""
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


class RowSeededSampling(LogitsProcessor):
    """Samples each row's next token from its own generator and leaves only that token finite, so that greedy search
    emits it: the same distribution as ``do_sample`` (``distribution(logits)``, then top-p), with rows that do not
    draw from each other's randomness."""

    def __init__(self, distribution: Callable[[torch.Tensor], torch.Tensor], top_p: float,
                 seeds: Sequence[int]) -> None:
        self.distribution = distribution
        self.top_p = top_p
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] = []
        """One per row, on the device of the logits (made at the first token: a model split over devices puts its
        head where it likes)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.generators:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(self.distribution(scores), dim=-1)
        if self.top_p < 1.0:
            probs = nucleus(probs, self.top_p)
        tokens = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter(-1, tokens[:, None], 0.0)


class PromptPolicy(PromptWriter):
    """A transformers chat VLM with a LoRA adapter that writes the next text-to-image prompt from an observation.

    Sampling (:meth:`act`), teacher-forced log-probs (:meth:`log_probs`) and the adapter-off reference
    (:meth:`reference`) all use one model. Log-probs are float32 and belong to the distribution sampled from:
    logits / temperature with the suppressed (special and vision) tokens excluded; top-p truncation is ignored.
    """

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, config: PolicyConfig) -> None:
        super().__init__(processor, config)
        self.model = model
        self.synced_gpus: Optional[bool] = None
        """``generate``'s ``synced_gpus`` (None: transformers' default, lockstep decoding for a model it knows to be
        sharded); the trainer sets False while every process holds the whole policy under FSDP2."""
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        base = self.base_model
        self.family = vlm_family(base.config.model_type, type(base).__name__)
        base_generation = base.generation_config
        self.eos_token_ids = end_token_ids(base_generation.eos_token_id, tokenizer, self.family.turn_end_token)
        pad = base_generation.pad_token_id if base_generation.pad_token_id is not None else tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]
        self.suppressed_token_ids = suppressed_token_ids(
            tokenizer, base.config, base.get_output_embeddings().weight.shape[0], self.eos_token_ids
        )
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
        revision: Optional[str] = None,
        token: Union[str, bool, None] = None,
        cache_dir: Union[str, Path, None] = None,
        local_files_only: bool = False,
    ) -> "PromptPolicy":
        """Load a saved policy or wrap a base chat VLM.

        - ``path_or_id`` holds ``policy_config.json`` (a saved policy: a folder, or a hub repo downloaded at
          ``revision``): the base model named in it (at its recorded ``model_revision``; a path starting with ``./``
          or ``../`` is relative to the saved folder; ``base_model_name_or_path`` overrides it) is loaded and the
          saved adapter attached (trainable if ``is_trainable``). ``config``, if given, replaces the sampling/chat
          settings; the model and LoRA fields stay the saved ones. ``trust_remote_code`` comes only from ``config``
          (False without one), never from the saved file.
        - Otherwise ``path_or_id`` is a base model (at ``revision``); ``config`` (default: ``PolicyConfig()``) gives
          the settings and a fresh LoRA adapter is added when ``add_adapter``.

        ``token``, ``cache_dir`` and ``local_files_only`` apply to every hub download, as in transformers.
        """
        path_or_id = str(path_or_id)
        download: dict[str, Any] = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        resolved = resolve_policy_config(path_or_id, config, base_model_name_or_path, revision=revision, **download)
        config, folder = resolved
        device = _resolve_device(device)
        base = resolved.base_model_kwargs(**download)
        vlm_family(AutoConfig.from_pretrained(config.model_name_or_path, **base).model_type,
                   config.model_name_or_path)  # before any weights load
        model = AutoModelForImageTextToText.from_pretrained(
            config.model_name_or_path, dtype=config.torch_dtype(device), device_map={"": device}, **base,
            # transformers' check for an adapter in the base repo does not get these by itself (5.24)
            adapter_kwargs=dict(cache_dir=cache_dir, local_files_only=local_files_only),
        )
        processor = resolved.load_processor(**download)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.eval()
        policy = cls(model, processor, config)  # cleans the generation config before peft wraps the model
        if resolved.adapter_folder is not None:
            policy.model = PeftModel.from_pretrained(model, resolved.adapter_folder, is_trainable=is_trainable)
        elif folder is None and add_adapter:
            policy.model = get_peft_model(model, policy.lora_config())
        policy.model.eval()
        policy.loop_defaults = resolved.loop_defaults
        return policy

    def lora_config(self) -> LoraConfig:
        """The peft LoRA config described by ``self.config``."""
        return LoraConfig(
            r=self.config.lora_r, lora_alpha=self.config.lora_alpha, lora_dropout=self.config.lora_dropout,
            target_modules=self.config.lora_target_modules, bias="none",
        )

    def save_pretrained(self, save_directory: Union[str, Path], *, model_card: Optional[str] = None,
                        adapter_state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Write the adapter (safetensors), ``policy_config.json``, ``loop_config.json`` (when the policy has
        :attr:`loop_defaults`), the processor (tokenizer, chat template) and a model card ``README.md``
        (``model_card``, default :func:`~promptloop.policy.hub.policy_model_card`). ``adapter_state``: the adapter's
        weights keyed as in the model's ``state_dict`` (e.g. gathered from shards), instead of the model's own.

        The folder is self-contained apart from the base model it names, and can be pushed to the hub as is.
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        if self.has_adapter:
            self.model.save_pretrained(save_directory, safe_serialization=True, state_dict=adapter_state)
        self.processor.save_pretrained(save_directory)
        self.config.save(save_directory / POLICY_CONFIG_NAME)
        if self.loop_defaults is not None:
            self.loop_defaults.save(save_directory / LOOP_CONFIG_NAME)
        if model_card is None:
            model_card = policy_model_card(self.config, has_adapter=self.has_adapter)
        (save_directory / MODEL_CARD_NAME).write_text(model_card, encoding="utf-8")  # replaces peft's

    def push_to_hub(self, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None,
                    revision: Optional[str] = None, commit_message: str = "Upload PromptLoop policy",
                    create_pr: bool = False, model_card: Optional[str] = None):
        """Save the policy (as :meth:`save_pretrained`, the model card naming ``repo_id``) and upload it to the hub
        repo ``repo_id`` (created if missing) as one commit; returns huggingface_hub's ``CommitInfo``.

        Others load it with ``PromptPolicy.from_pretrained(repo_id)`` or ``PromptLoopPipeline.from_pretrained(repo_id,
        pipe)``; the base model it names must be a hub id for that (a local path only works on this machine).
        """
        import tempfile

        with tempfile.TemporaryDirectory(prefix="promptloop-push-") as tmp:
            self.save_pretrained(tmp, model_card=model_card or policy_model_card(
                self.config, has_adapter=self.has_adapter, repo_id=repo_id))
            return push_policy_folder(tmp, repo_id, private=private, token=token, revision=revision,
                                      commit_message=commit_message, create_pr=create_pr)

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

    # -------------------------------------------------------------------------------------------------- sampling
    def _generation_config(self, row_seeded: bool = False) -> GenerationConfig:
        """The ``generate`` settings; ``row_seeded``: greedy search over the tokens :class:`RowSeededSampling` drew."""
        config = self.config
        sample = config.do_sample and not row_seeded
        return GenerationConfig(
            do_sample=sample, temperature=config.temperature if sample else None,
            top_p=config.top_p if sample else None, top_k=0 if sample else None,
            repetition_penalty=1.0, max_new_tokens=config.max_new_tokens, suppress_tokens=self.suppressed_token_ids,
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id, output_logits=True,
            return_dict_in_generate=True, cache_implementation=config.cache_implementation,
        )

    def _encode(self, observations: Sequence[Observation]) -> tuple[dict, list[int]]:
        chats, texts = self.chats(observations)
        kwargs: dict[str, Any] = {}
        if any(chat.images for chat in chats):
            kwargs["images"] = [chat.images for chat in chats]
            kwargs.update(image_processor_kwargs(self.family, self.config))
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
        row_seeds: Optional[Sequence[int]] = None,
    ) -> PolicyActions:
        """Sample one answer per observation, in one left-padded batch.

        ``seed`` (or a seed drawn from ``generator``) makes sampling reproducible without touching the global RNG.
        ``row_seeds`` (instead): one seed per observation; each row draws its tokens from its own generator, so its
        answer does not depend on the batch (up to float differences of the batch's padding).
        The model runs in eval mode during generation and returns to its previous mode afterwards.
        """
        row_seeds = check_row_seeds(row_seeds, len(observations), seed, generator)
        seed = resolve_seed(seed, generator)
        encoding, images_per_sample = self._encode(observations)
        inputs = {k: v.to(self.device) for k, v in encoding.items()}
        row_seeded = row_seeds is not None and self.config.do_sample
        processors = LogitsProcessorList()
        if row_seeded:
            processors.append(RowSeededSampling(self._sampling_logits, self.config.top_p, row_seeds))
        was_training = self.model.training
        self.model.eval()
        rng_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):
                if seed is not None:
                    torch.manual_seed(seed)
                output = self.model.generate(**inputs, generation_config=self._generation_config(row_seeded),
                                             logits_processor=processors, synced_gpus=self.synced_gpus)
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
        return self._actions(observations, samples, completion_ids, completion_mask, log_probs)

    @torch.no_grad()
    def score_answers(self, observations: Sequence[Observation], answers: Sequence[Sequence[int]]) -> PolicyActions:
        """The actions :meth:`act` returns had it sampled ``answers`` (each answer's token ids, its end token
        included when it has one; e.g. from vLLM): the same samples and prompts, with float32 log-probs
        teacher-forced in eval mode by this model."""
        if len(answers) != len(observations):
            raise ValueError(f"{len(answers)} answers for {len(observations)} observations: give one per observation.")
        if not all(answers):
            raise ValueError("An answer has no tokens: every answer holds at least its end token or one word.")
        samples = self.answer_samples(observations, answers)
        completion_ids = torch.nn.utils.rnn.pad_sequence([s.completion_ids for s in samples], batch_first=True,
                                                         padding_value=self.pad_token_id).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            scored = self.log_probs(samples)
        finally:
            self.model.train(was_training)
        return self._actions(observations, samples, completion_ids, scored.mask, scored.log_probs)

    def answer_samples(self, observations: Sequence[Observation], answers: Sequence[Sequence[int]]
                       ) -> list[PolicySample]:
        """The samples of ``observations`` (their chats encoded as :meth:`act` encodes them) with ``answers`` (each
        answer's token ids) as completions: for scoring answers sampled elsewhere, or supervised targets."""
        encoding, images_per_sample = self._encode(observations)
        completion_ids = torch.full((len(answers), max(map(len, answers))), self.pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros(completion_ids.shape, dtype=torch.bool)
        for row, answer in enumerate(answers):
            completion_ids[row, :len(answer)] = torch.tensor(list(answer), dtype=torch.long)
            completion_mask[row, :len(answer)] = True
        return self._split_samples(encoding, images_per_sample, completion_ids, completion_mask)

    def _actions(self, observations: Sequence[Observation], samples: list[PolicySample], completion_ids: torch.Tensor,
                 completion_mask: torch.Tensor, log_probs: torch.Tensor) -> PolicyActions:
        texts = self.processor.tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
        actions = PolicyActions(
            texts=texts, prompts=[], kept_previous=[], truncated=[], completion_ids=completion_ids,
            completion_mask=completion_mask, log_probs=log_probs, samples=samples,
        )
        self.fill_prompts(actions, observations)
        return actions

    def _split_samples(
        self, encoding: dict, images_per_sample: list[int], completion_ids: torch.Tensor, completion_mask: torch.Tensor
    ) -> list[PolicySample]:
        key = self.family.token_types_key
        token_types = encoding[key] if key else (encoding["input_ids"] == self.base_model.config.image_token_id).long()
        samples = []
        for row, vision in enumerate(split_image_inputs(encoding, images_per_sample, self.family.images_by_sample)):
            keep = encoding["attention_mask"][row].bool()
            samples.append(PolicySample(
                prompt_ids=encoding["input_ids"][row][keep].clone(),
                mm_token_type_ids=token_types[row][keep].clone(),
                completion_ids=completion_ids[row][completion_mask[row]].cpu(),
                vision=vision,
            ))
        return samples

    # --------------------------------------------------------------------------------------------------- scoring
    def log_probs(self, samples: Sequence[PolicySample]) -> TokenLogProbs:
        """Teacher-forced float32 per-token log-probs of the samples' completions, in one batch.

        Gives the numbers :meth:`act` returned (same layout and positions as generation). Gradients flow when grad
        mode is on (wrap in ``torch.no_grad()`` for old-policy or reference log-probs); LoRA dropout applies only
        in train mode.
        """
        batch = collate_samples(samples, self.pad_token_id, self.device, self.family.token_types_key,
                                self.family.images_by_sample)
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
