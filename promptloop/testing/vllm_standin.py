"""A stand-in for the ``vllm`` package in tests (no GPU, no vLLM on CPU machines): vLLM 0.34's offline API run
by transformers.

It has the names and arguments promptloop's vLLM backend uses (``vllm.LLM(model, **engine args)``,
``LLM.generate(prompts, sampling_params, use_tqdm=, lora_request=)`` with text prompts + ``multi_modal_data``,
``vllm.SamplingParams``, ``vllm.lora.request.LoRARequest``) and rejects arguments vLLM 0.34 does not have. It decodes
like vLLM: one seeded request at a time, temperature 0 is greedy, the stop token ids end a request, a logit bias is
added to the logits; the model named by ``model`` with the adapter at ``lora_path`` when a LoRA request comes.
"""
from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig, LogitsProcessor

# Names from vLLM 0.34.0's `SamplingParams` fields and `LLM.__init__` / `EngineArgs` (the ones a caller may use).
SAMPLING_PARAMS_FIELDS = {
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs", "detokenize",
    "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output", "logit_bias",
    "allowed_token_ids", "bad_words",
}
LLM_ARGUMENTS = {
    "tokenizer", "trust_remote_code", "dtype", "seed", "gpu_memory_utilization", "enforce_eager",
    "mm_processor_kwargs", "tensor_parallel_size", "max_model_len", "enable_lora", "max_loras", "max_lora_rank",
    "limit_mm_per_prompt", "revision", "tokenizer_revision",
}
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - SAMPLING_PARAMS_FIELDS
        if unknown:
            raise TypeError(f"SamplingParams has no fields {sorted(unknown)}")
        self.temperature, self.top_p, self.max_tokens, self.seed = 1.0, 1.0, 16, None
        self.stop_token_ids, self.logit_bias, self.skip_special_tokens = None, None, True
        self.__dict__.update(kwargs)


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError("lora_int_id must be > 0")


class _LogitBias(LogitsProcessor):
    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = torch.tensor(list(bias))
        self.values = torch.tensor(list(bias.values()))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores


class LLM:
    """``vllm.LLM`` on transformers; every instance is kept in ``LLM.instances`` for the tests to inspect."""

    instances: list["LLM"] = []

    def __init__(self, model: str, **kwargs: Any) -> None:
        unknown = set(kwargs) - LLM_ARGUMENTS
        if unknown:
            raise TypeError(f"LLM got unexpected arguments {sorted(unknown)}")
        if kwargs.get("enable_lora") and kwargs.get("max_lora_rank", 16) not in VLLM_MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank={kwargs['max_lora_rank']} is not one of {VLLM_MAX_LORA_RANKS}")
        self.model_path, self.kwargs = model, kwargs
        self.base = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32,
                                                                revision=kwargs.get("revision")).eval()
        self.processor = AutoProcessor.from_pretrained(kwargs.get("tokenizer") or model,
                                                       revision=kwargs.get("tokenizer_revision"))
        self.peft: Optional[PeftModel] = None
        self.adapters: dict[int, str] = {}
        """The adapter path loaded under each LoRA id."""
        self.requests: list[tuple[dict, SamplingParams, Optional[LoRARequest]]] = []
        LLM.instances.append(self)

    @contextlib.contextmanager
    def _serving(self, lora_request: Optional[LoRARequest]) -> Iterator[torch.nn.Module]:
        """The model a request runs on: the base alone, or with the request's adapter (loaded once per id)."""
        if lora_request is None:
            with self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext():
                yield self.base
            return
        if not self.kwargs.get("enable_lora"):
            raise ValueError("LoRA is not enabled: start the LLM with enable_lora=True")
        name = f"lora-{lora_request.lora_int_id}"
        if lora_request.lora_int_id not in self.adapters:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, lora_request.lora_path, adapter_name=name).eval()
            else:
                self.peft.load_adapter(lora_request.lora_path, adapter_name=name)
            self.adapters[lora_request.lora_int_id] = lora_request.lora_path
        self.peft.set_adapter(name)
        yield self.peft

    @torch.no_grad()
    def generate(self, prompts: list[dict], sampling_params: list[SamplingParams], *, use_tqdm: bool = True,
                 lora_request: Optional[LoRARequest] = None) -> list[Any]:
        assert len(prompts) == len(sampling_params)
        with self._serving(lora_request) as model:
            return [self._generate_one(model, prompt, params, lora_request)
                    for prompt, params in zip(prompts, sampling_params)]

    def _generate_one(self, model: torch.nn.Module, prompt: dict, params: SamplingParams,
                      lora_request: Optional[LoRARequest]) -> Any:
        tokenizer = self.processor.tokenizer
        self.requests.append((prompt, params, lora_request))
        images = (prompt.get("multi_modal_data") or {}).get("image")
        kwargs = {"images": images, **(self.kwargs.get("mm_processor_kwargs") or {})} if images else {}
        inputs = self.processor(text=[prompt["prompt"]], return_tensors="pt", **kwargs)
        greedy = params.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p, top_k=0 if not greedy else None,
            max_new_tokens=params.max_tokens, eos_token_id=params.stop_token_ids,
            pad_token_id=params.stop_token_ids[0],
        )
        processors = [_LogitBias(params.logit_bias)] if params.logit_bias else []
        with torch.random.fork_rng():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            ids = model.generate(**inputs, generation_config=config, logits_processor=processors)[0]
        ids = ids[inputs["input_ids"].shape[1]:].tolist()
        ends = [i for i, token in enumerate(ids) if token in params.stop_token_ids]
        ids = ids[:ends[0] + 1] if ends else ids
        text = tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
        completion = types.SimpleNamespace(text=text, token_ids=ids, finish_reason="stop" if ends else "length",
                                           stop_reason=ids[-1] if ends else None)
        return types.SimpleNamespace(outputs=[completion])


def install(monkeypatch) -> types.ModuleType:
    """Put the stand-in in ``sys.modules`` as ``vllm`` (and ``vllm.lora.request``) for one test."""
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    vllm.lora, lora.request = lora, request
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(LLM, "instances", [])
    return vllm
