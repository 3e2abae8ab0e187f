"""A saved policy sampled by vLLM: the chat, prompts and refine callable of :class:`PromptPolicy`, faster decoding.

Used for inference (:class:`~promptloop.pipeline.PromptLoopPipeline`, ``promptloop sample --policy-backend vllm``),
evaluation (``policy_sampling.backend: vllm``) and training rollouts (``grpo.rollout_backend: vllm``). It only
samples: training scores the answers with the transformers model (:meth:`PromptPolicy.score_answers`), whose
float32 log-probs vLLM's kernels do not reproduce. vLLM is not a dependency of promptloop: ``pip install vllm`` on
a CUDA machine.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from transformers import AutoConfig, GenerationConfig, ProcessorMixin

from promptloop.backbones.types import Observation
from promptloop.policy.config import PolicyConfig
from promptloop.policy.families import VLMFamily, image_processor_kwargs, vlm_family
from promptloop.policy.writer import (
    PromptActions,
    PromptWriter,
    check_row_seeds,
    end_token_ids,
    resolve_policy_config,
    resolve_seed,
    suppressed_token_ids,
)

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``max_lora_rank`` (its ``LoRAConfig``)."""
SUPPRESSED_LOGIT_BIAS = -100.0
"""The logit bias that keeps special and vision tokens out (the bound of vLLM's OpenAI-compatible API): a suppressed
token keeps at most exp(-100) of the probability it had."""
LORA_NAME = "promptloop-policy"
_LORA_IDS = itertools.count(1)
"""vLLM caches adapters by integer id: every adapter handed to any engine in this process gets a new one."""


@dataclass(kw_only=True)
class VLLMActions(PromptActions):
    """What :meth:`VLLMPromptPolicy.act` returns: the prompts and the sampled tokens (to score them in training)."""

    answer_token_ids: list[list[int]]
    """Each answer's token ids as vLLM sampled them, its end token included when it stopped on one."""


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError("The vLLM policy backend needs vLLM, which promptloop does not install: `pip install "
                          "vllm` on a machine with a CUDA GPU (https://docs.vllm.ai), or use the default "
                          "transformers backend (PromptPolicy / --policy-backend transformers).") from error
    return vllm


def check_gpu_memory_utilization(value: float) -> None:
    """A share of the GPU for vLLM must be in (0, 1); config sections call this for their field."""
    if not 0 < value < 1:
        raise ValueError(f"vllm_gpu_memory_utilization={value} must be in (0, 1): the share of the GPU vLLM may take")


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds a LoRA of rank ``rank``."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"lora_r={rank} is above the largest LoRA rank vLLM serves ({VLLM_MAX_LORA_RANKS[-1]}).")


def start_engine(config: PolicyConfig, family: VLMFamily, saved_folder: Optional[str], max_lora_rank: Optional[int],
                 gpu_memory_utilization: float, **llm_kwargs: Any) -> Any:
    """A ``vllm.LLM`` on ``config``'s base model (at its ``model_revision``), dtype and preview sizes (LoRA enabled
    up to ``max_lora_rank``); the tokenizer is the saved policy's (``saved_folder``) or the base model's."""
    vllm = import_vllm()
    limits = {"image": 1, "video": 0} if family.has_video else {"image": 1}  # a chat holds at most one preview
    engine_kwargs: dict[str, Any] = dict(
        model=config.model_name_or_path, revision=config.model_revision,
        tokenizer=saved_folder or config.model_name_or_path,
        tokenizer_revision=None if saved_folder else config.model_revision, trust_remote_code=config.trust_remote_code,
        dtype=config.dtype if config.dtype != "auto" else "bfloat16",
        gpu_memory_utilization=gpu_memory_utilization,
        limit_mm_per_prompt=limits, mm_processor_kwargs=image_processor_kwargs(family, config) or None,
    )
    if max_lora_rank is not None:
        engine_kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_max_lora_rank(max_lora_rank))
    engine_kwargs.update(llm_kwargs)
    return vllm.LLM(**engine_kwargs)


class VLLMPromptPolicy(PromptWriter):
    """A policy whose answers come from a ``vllm.LLM`` (base model + the saved LoRA adapter).

    The chat text is the one :class:`~promptloop.policy.PromptPolicy` builds (same processor and chat template), the
    preview goes in as ``multi_modal_data``, and the sampling settings are the policy config's: temperature and
    top-p (``do_sample=False``: greedy), ``max_new_tokens``, the model's end tokens, and the special and vision
    tokens kept out by a logit bias. Each row gets its own seed drawn from the call's seed. Policies on the same
    base model can share one engine (``from_pretrained(..., llm=...)``), each adapter under its own LoRA id.
    """

    def __init__(
        self,
        llm: Any,
        processor: ProcessorMixin,
        config: PolicyConfig,
        *,
        eos_token_ids: Sequence[int],
        suppressed_token_ids: Sequence[int],
        adapter_path: Optional[str] = None,
    ) -> None:
        super().__init__(processor, config)
        self.llm = llm
        self.eos_token_ids = list(eos_token_ids)
        self.suppressed_token_ids = list(suppressed_token_ids)
        self.lora_request = None
        if adapter_path is not None:
            self.load_adapter(adapter_path)

    @property
    def has_adapter(self) -> bool:
        return self.lora_request is not None

    @contextlib.contextmanager
    def reference(self) -> Iterator["VLLMPromptPolicy"]:
        """Within this context the engine answers with the base model alone (no LoRA request)."""
        if not self.has_adapter:
            raise RuntimeError("This policy has no LoRA adapter, so it has no separate reference model.")
        served, self.lora_request = self.lora_request, None
        try:
            yield self
        finally:
            self.lora_request = served

    def load_adapter(self, adapter_path: Union[str, Path]) -> None:
        """Serve the LoRA adapter saved in ``adapter_path`` (same rank and targets) from the next call on: how a
        training run hands its updated weights to the engine. vLLM caches adapters by id, so each load gets a new one.
        The engine must have been started with LoRA enabled (``from_pretrained`` does so for a policy with an
        adapter, or when given ``max_lora_rank``).
        """
        from vllm.lora.request import LoRARequest

        lora_id = next(_LORA_IDS)
        self.lora_request = LoRARequest(f"{LORA_NAME}-{lora_id}", lora_id, str(adapter_path))

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: Union[str, Path],
        config: Optional[PolicyConfig] = None,
        *,
        base_model_name_or_path: Optional[str] = None,
        llm: Any = None,
        max_lora_rank: Optional[int] = None,
        gpu_memory_utilization: float = 0.35,
        revision: Optional[str] = None,
        token: Union[str, bool, None] = None,
        cache_dir: Union[str, Path, None] = None,
        local_files_only: bool = False,
        **llm_kwargs: Any,
    ) -> "VLLMPromptPolicy":
        """A policy served by vLLM: a ``vllm.LLM`` started on its base model (or ``llm``), with its saved adapter.

        ``path_or_id``, ``config`` and the hub arguments (``revision``, ``token``, ``cache_dir``,
        ``local_files_only``) resolve as in :meth:`PromptPolicy.from_pretrained`; the engine loads the base model at
        its ``model_revision``. ``gpu_memory_utilization`` is the share of the GPU a new engine reserves (weights +
        KV cache); the default leaves the rest to the diffusion pipeline in the same process. ``llm_kwargs`` go to
        ``vllm.LLM`` as they are (``enforce_eager``, ``max_model_len``, ``tensor_parallel_size``, ...) and override
        the ones set here.

        ``llm``: an engine already serving this policy's base model with the same preview sizes and LoRA enabled
        (``policy.llm`` of an earlier call); the adapter is then served by it and no engine starts.
        ``max_lora_rank``: start the engine with LoRA enabled for adapters up to this rank (default: this policy's
        rank when it has an adapter; LoRA off otherwise), so that later policies can share it.
        """
        import_vllm()
        if llm is not None and llm_kwargs:
            raise ValueError(f"Engine arguments {sorted(llm_kwargs)} apply to a new engine; with llm=... the engine "
                             "already runs. Pass them where it was started.")
        path_or_id = str(path_or_id)
        resolved = resolve_policy_config(path_or_id, config, base_model_name_or_path, revision=revision,
                                         token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        config, folder = resolved
        download = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        base = resolved.base_model_kwargs(**download)
        model_config = AutoConfig.from_pretrained(config.model_name_or_path, **base)
        family = vlm_family(model_config.model_type, config.model_name_or_path)
        processor = resolved.load_processor(**download)
        try:
            generation_eos = GenerationConfig.from_pretrained(config.model_name_or_path, **base).eos_token_id
        except OSError:  # the model ships no generation_config.json
            generation_eos = None
        eos = end_token_ids(generation_eos, processor.tokenizer, family.turn_end_token)
        suppressed = suppressed_token_ids(
            processor.tokenizer, model_config, model_config.get_text_config().vocab_size, eos
        )
        if llm is None:
            if max_lora_rank is None and resolved.adapter_folder is not None:
                max_lora_rank = config.lora_r
            llm = start_engine(config, family, folder, max_lora_rank, gpu_memory_utilization, **llm_kwargs)
        policy = cls(llm, processor, config, eos_token_ids=eos, suppressed_token_ids=suppressed,
                     adapter_path=resolved.adapter_folder)
        policy.loop_defaults = resolved.loop_defaults
        return policy

    def sampling_params(self, seed: Optional[int]) -> Any:
        """The ``vllm.SamplingParams`` of one row: the policy config's sampling settings and ``seed``."""
        from vllm import SamplingParams

        config = self.config
        return SamplingParams(
            temperature=config.temperature if config.do_sample else 0.0,
            top_p=config.top_p if config.do_sample else 1.0,
            max_tokens=config.max_new_tokens, seed=seed, stop_token_ids=list(self.eos_token_ids),
            ignore_eos=True,  # the end tokens are the stop tokens above, as for the transformers backend
            logit_bias={token: SUPPRESSED_LOGIT_BIAS for token in self.suppressed_token_ids} or None,
            skip_special_tokens=True,
        )

    @torch.no_grad()
    def act(
        self,
        observations: Sequence[Observation],
        *,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        row_seeds: Optional[Sequence[int]] = None,
    ) -> VLLMActions:
        """Sample one answer per observation in one ``LLM.generate`` call; ``seed`` (or a draw from ``generator``)
        seeds every row (row i its own draw), so the same seed gives the same answers; ``row_seeds`` (instead) gives
        each row its seed."""
        row_seeds = check_row_seeds(row_seeds, len(observations), seed, generator)
        seed = resolve_seed(seed, generator)
        chats, texts = self.chats(observations)
        seeds: list[Optional[int]]
        if row_seeds is not None:
            seeds = list(row_seeds)
        elif seed is None:
            seeds = [None] * len(chats)
        else:
            seeds = torch.randint(0, 2**62, (len(chats),), generator=torch.Generator().manual_seed(seed)).tolist()
        requests = [
            {"prompt": text, "multi_modal_data": {"image": chat.images}} if chat.images else {"prompt": text}
            for chat, text in zip(chats, texts)
        ]
        outputs = self.llm.generate(requests, [self.sampling_params(s) for s in seeds], use_tqdm=False,
                                    lora_request=self.lora_request)
        completions = [output.outputs[0] for output in outputs]
        actions = VLLMActions(texts=[c.text for c in completions], prompts=[], kept_previous=[], truncated=[],
                              answer_token_ids=[self._answer_token_ids(c) for c in completions])
        self.fill_prompts(actions, observations)
        return actions

    def _answer_token_ids(self, completion: Any) -> list[int]:
        """The completion's tokens with the end token it stopped on (vLLM reports a stop token as ``stop_reason``;
        kept here whether or not the engine's version lists it in ``token_ids``)."""
        ids = list(completion.token_ids)
        stop = completion.stop_reason
        if completion.finish_reason == "stop" and isinstance(stop, int) and (not ids or ids[-1] != stop):
            ids.append(stop)
        return ids
