"""The vLLM backend against vLLM itself (optional group: ``pytest -m reference``; skipped where vllm is absent).

No GPU is needed: these run vLLM's own request classes and its own Qwen2.5-VL input processing, not its engine.
On a CPU machine vLLM's wheel imports without its CUDA kernels into a side folder (checked with vLLM 0.34.0)::

    pip install --no-deps --target /tmp/vllmsite vllm==0.34.0 msgspec pyzmq aiohttp aiohappyeyeballs aiosignal \\
        attrs frozenlist multidict propcache yarl cloudpickle pybase64 cachetools uvloop py-cpuinfo cbor2 einops \\
        prometheus_client llguidance xgrammar apache-tvm-ffi blake3
    PYTHONPATH=/tmp/vllmsite pytest -m reference tests/policy/test_vllm_reference.py
"""
import pytest
import torch

from policy_helpers import mixed_observations, small_config
from promptloop.policy import PromptPolicy
from promptloop.policy.vllm_backend import VLLMPromptPolicy
from promptloop.testing import vllm_standin

pytestmark = pytest.mark.reference
vllm = pytest.importorskip("vllm")


def test_vllm_processes_the_requests_into_the_transformers_policys_inputs(tiny_vlm_dirs):
    """Token ids (image placeholders expanded), image grids and pixels: what the served model reads."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    path = str(tiny_vlm_dirs["qwen2_5_vl"])
    config = small_config(model_name_or_path=path)
    policy = PromptPolicy.from_pretrained(path, config, device="cpu")
    size = {"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels}
    model_config = ModelConfig(model=path, tokenizer=path, dtype="float32", mm_processor_kwargs={"size": size},
                               limit_mm_per_prompt={"image": 1, "video": 0})
    processor = MULTIMODAL_REGISTRY.create_processor(model_config)
    tokenizer = processor.info.ctx.tokenizer
    image_processor = policy.processor.image_processor
    mean, std = (torch.tensor(v).view(1, 3, 1) for v in (image_processor.image_mean, image_processor.image_std))
    for observation in mixed_observations():
        (chat,), (text,) = policy.chats([observation])
        encoding, _ = policy._encode([observation])
        if not chat.images:
            assert tokenizer.encode(text) == encoding["input_ids"][0].tolist()
            continue
        inputs = ProcessorInputs(prompt=tokenizer.encode(text), mm_data_items=processor.info.parse_mm_data(
            {"image": chat.images}), hf_processor_mm_kwargs={"size": size})
        processed = processor.apply(inputs, TimingContext(enabled=False))
        assert processed["prompt_token_ids"] == encoding["input_ids"][0].tolist()
        item = processed["mm_kwargs"]["image"][0]
        assert item["image_grid_thw"].data.tolist() == encoding["image_grid_thw"][0].tolist()
        pixels = item["pixel_values"].data  # uint8: vLLM normalises on the device
        normalised = ((pixels.float().view(len(pixels), 3, -1) / 255 - mean) / std).flatten(1)
        torch.testing.assert_close(normalised, encoding["pixel_values"], atol=1e-5, rtol=0)


def test_the_backends_engine_and_request_arguments_are_vllms(tiny_vlm_dirs, tmp_path, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.lora.request import LoRARequest

    policy = PromptPolicy.from_pretrained(tiny_vlm_dirs["qwen2_5_vl"], small_config(lora_r=4), device="cpu")
    policy.save_pretrained(tmp_path / "policy")
    for name, real in (("SamplingParams", vllm.SamplingParams), ("LoRARequest", LoRARequest)):
        monkeypatch.setattr(vllm_standin, name, real)
    vllm_standin.install(monkeypatch)  # vLLM's request classes, the stand-in engine: vllm.LLM needs a GPU
    served = VLLMPromptPolicy.from_pretrained(tmp_path / "policy", small_config(temperature=0.8),
                                              enforce_eager=True)
    engine = vllm_standin.LLM.instances[-1]
    engine_args = EngineArgs(model=engine.model_path, **engine.kwargs)  # raises on a name vLLM does not know
    assert engine_args.enable_lora and engine_args.max_lora_rank == 8
    assert isinstance(served.lora_request, LoRARequest)
    params = served.sampling_params(seed=5)
    assert isinstance(params, vllm.SamplingParams) and (params.temperature, params.seed) == (0.8, 5)
    assert served.act(mixed_observations(), seed=1).texts == served.act(mixed_observations(), seed=1).texts
    served.load_adapter(tmp_path / "policy")
    assert isinstance(served.lora_request, LoRARequest) and served.lora_request.lora_path == str(tmp_path / "policy")

    from vllm.outputs import CompletionOutput

    end = served.eos_token_ids[0]  # vLLM 0.34 keeps the stop token in token_ids and names it in stop_reason
    stopped = CompletionOutput(index=0, text="a cat", token_ids=[5, 6, end], cumulative_logprob=None, logprobs=None,
                               finish_reason="stop", stop_reason=end)
    capped = CompletionOutput(index=0, text="a cat", token_ids=[5, 6], cumulative_logprob=None, logprobs=None,
                              finish_reason="length", stop_reason=None)
    assert served._answer_token_ids(stopped) == [5, 6, end] and served._answer_token_ids(capped) == [5, 6]
