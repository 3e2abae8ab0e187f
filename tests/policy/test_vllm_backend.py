"""The vLLM policy backend against a stand-in of vLLM's offline API (promptloop.testing.vllm_standin)."""
import sys

import pytest
import torch

from policy_helpers import make_observation, mixed_observations, small_config
from promptloop.policy import PromptPolicy
from promptloop.policy.vllm_backend import (
    LORA_NAME,
    SUPPRESSED_LOGIT_BIAS,
    VLLMPromptPolicy,
    vllm_max_lora_rank,
)
from promptloop.testing import vllm_standin


@pytest.fixture(scope="module")
def saved_policy(tiny_vlm_dirs, tmp_path_factory):
    """A saved policy whose adapter changes the greedy answers (its LoRA B matrices are random, not zero)."""
    policy = PromptPolicy.from_pretrained(tiny_vlm_dirs["qwen2_5_vl"], small_config(), device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("vllm") / "policy"
    policy.save_pretrained(path)
    return path


def one_by_one(policy, observations, field="texts"):
    """Each observation alone (no padding: the stand-in engine decodes one request at a time)."""
    return [getattr(policy.act([o]), field)[0] for o in observations]


def test_greedy_answers_equal_the_transformers_policys(saved_policy, tiny_vlm_dirs, monkeypatch):
    vllm_standin.install(monkeypatch)
    observations = mixed_observations()  # previews of three sizes and a row without one
    config = small_config(do_sample=False, max_new_tokens=10)
    served = VLLMPromptPolicy.from_pretrained(saved_policy, config)
    reference = PromptPolicy.from_pretrained(saved_policy, config, device="cpu")
    actions = served.act(observations)
    assert actions.texts == one_by_one(reference, observations)
    assert actions.prompts == one_by_one(reference, observations, "prompts")

    base = PromptPolicy.from_pretrained(tiny_vlm_dirs["qwen2_5_vl"], config, device="cpu", add_adapter=False)
    assert actions.texts != one_by_one(base, observations), "the adapter must be served, not the base model alone"
    engine = vllm_standin.LLM.instances[-1]
    assert [r[2].lora_name for r in engine.requests] == [served.lora_request.lora_name] * len(observations)
    assert served.lora_request.lora_name.startswith(LORA_NAME)
    with_image = [r[0] for r in engine.requests if "multi_modal_data" in r[0]]
    assert len(with_image) == 3 and all(len(r["multi_modal_data"]["image"]) == 1 for r in with_image)


def test_sampling_settings_and_seeds_reach_the_engine(saved_policy, monkeypatch):
    vllm_standin.install(monkeypatch)
    observations = mixed_observations()
    policy = VLLMPromptPolicy.from_pretrained(saved_policy, small_config(temperature=0.7, top_p=0.9, max_new_tokens=7))
    first = policy.act(observations, seed=3)
    assert policy.act(observations, seed=3).texts == first.texts
    assert policy.act(observations, seed=4).texts != first.texts
    requests = vllm_standin.LLM.instances[-1].requests
    params = [r[1] for r in requests[:len(observations)]]
    assert len({p.seed for p in params}) == len(observations), "each row draws its own seed"
    assert all((p.temperature, p.top_p, p.max_tokens) == (0.7, 0.9, 7) for p in params)
    assert params[0].stop_token_ids == policy.eos_token_ids
    vision = {policy.processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>")}
    assert vision <= set(params[0].logit_bias) and set(params[0].logit_bias.values()) == {SUPPRESSED_LOGIT_BIAS}
    assert not set(policy.eos_token_ids) & set(params[0].logit_bias)

    policy.act(observations[::-1], row_seeds=[40, 30, 20, 10])
    assert [r[1].seed for r in vllm_standin.LLM.instances[-1].requests[-len(observations):]] == [40, 30, 20, 10]
    with pytest.raises(ValueError, match="row_seeds .* or seed/generator"):
        policy.act(observations, seed=1, row_seeds=[1, 2, 3, 4])


def test_engine_arguments_and_overrides(saved_policy, tiny_vlm_dirs, monkeypatch):
    vllm_standin.install(monkeypatch)
    VLLMPromptPolicy.from_pretrained(saved_policy, small_config(lora_r=4), enforce_eager=True,
                                     gpu_memory_utilization=0.5)
    engine = vllm_standin.LLM.instances[-1]
    assert engine.model_path == str(tiny_vlm_dirs["qwen2_5_vl"]) and engine.kwargs["tokenizer"] == str(saved_policy)
    assert engine.kwargs["enable_lora"] and engine.kwargs["max_lora_rank"] == 8  # the saved adapter's rank is 4
    assert engine.kwargs["enforce_eager"] and engine.kwargs["gpu_memory_utilization"] == 0.5
    assert engine.kwargs["mm_processor_kwargs"] == {"size": {"shortest_edge": 28 * 28, "longest_edge": 64 * 64}}
    assert engine.kwargs["limit_mm_per_prompt"] == {"image": 1, "video": 0}

    base = VLLMPromptPolicy.from_pretrained(tiny_vlm_dirs["qwen2_5_vl"], small_config())  # no adapter: base model
    assert base.lora_request is None and "enable_lora" not in vllm_standin.LLM.instances[-1].kwargs
    assert [vllm_max_lora_rank(r) for r in (1, 2, 16, 17, 300)] == [1, 8, 16, 32, 320]
    with pytest.raises(ValueError, match="lora_r=600"):
        vllm_max_lora_rank(600)


def test_a_priori_refine_fn_calls_the_engine_once(saved_policy, monkeypatch):
    vllm_standin.install(monkeypatch)
    policy = VLLMPromptPolicy.from_pretrained(saved_policy, small_config(mode="apriori", max_new_tokens=8))
    refine = policy.as_refine_fn(seed=0)
    queries = ["a red cat", "a dog"]
    first = refine([make_observation(row, q, k=0, n=3) for row, q in enumerate(queries)])
    later = refine([make_observation(row, q, k=2, n=3) for row, q in enumerate(queries)])
    assert len(vllm_standin.LLM.instances[-1].requests) == 2, "later refinements read the written schedule"
    assert len(first) == len(later) == 2 and all(isinstance(p, str) and p for p in first + later)


def test_missing_vllm_names_the_fix_before_loading(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="pip install vllm"):
        VLLMPromptPolicy.from_pretrained(tmp_path / "no-such-policy")


def test_the_overhead_benchmark_times_the_vllm_backend(monkeypatch, tmp_path):
    import importlib.util
    from pathlib import Path

    vllm_standin.install(monkeypatch)
    script = Path(__file__).parents[2] / "benchmarks" / "overhead.py"
    spec = importlib.util.spec_from_file_location("overhead_benchmark", script)
    overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overhead)
    report = overhead.main(["--scale", "tiny", "--device", "cpu", "--batch", "2", "--steps", "4", "--size", "64",
                            "--preview-size", "32", "--refinements", "1", "--modes", "plain,closed,apriori,train",
                            "--train-refinements", "1",
                            "--repeats", "1", "--no-warmup", "--max-new-tokens", "4", "--policy-backend", "vllm",
                            "--policy-dir", str(tmp_path / "policy"), "--out", str(tmp_path / "overhead.json")])
    assert report["policy_backend"] == "vllm"
    assert [(r["mode"], r["policy_calls"]) for r in report["results"][:3]] == [
        ("plain", 0), ("closed", 1), ("apriori", 1)]
    assert report["results"][3]["mode"] == "train" and report["results"][3]["policy_calls"] >= 1
    assert report["results"][3]["policy_score_s"] > 0  # vLLM's answers scored by the transformers policy
    assert not any("policy_score_s" in r for r in report["results"][:3])
    engine = vllm_standin.LLM.instances[-1]
    assert engine.model_path == str(tmp_path / "policy") and "enable_lora" not in engine.kwargs
    closed = report["results"][1]
    assert closed["policy_prefill_s"] > 0 and {p.max_tokens for _, p, _ in engine.requests} == {1, 4}


def test_scored_answers_are_the_actions_act_returned(saved_policy):
    policy = PromptPolicy.from_pretrained(saved_policy, small_config(max_new_tokens=6), device="cpu")
    observations = mixed_observations()
    sampled = policy.act(observations, seed=5)
    answers = [s.completion_ids.tolist() for s in sampled.samples]
    scored = policy.score_answers(observations, answers)
    assert scored.texts == sampled.texts and scored.prompts == sampled.prompts
    assert torch.equal(scored.completion_mask, sampled.completion_mask)
    assert torch.equal(scored.completion_ids, sampled.completion_ids)
    assert torch.allclose(scored.log_probs, sampled.log_probs, atol=1e-5)
    assert all(a.vision.keys() == b.vision.keys() and all(torch.equal(a.vision[k], b.vision[k]) for k in a.vision)
               for a, b in zip(scored.samples, sampled.samples))
    with pytest.raises(ValueError, match="2 answers for 4 observations"):
        policy.score_answers(observations, answers[:2])
    with pytest.raises(ValueError, match="no tokens"):
        policy.score_answers(observations, [[]] + answers[1:])


def test_answer_tokens_keep_the_stop_token_and_adapters_are_handed_over(saved_policy, tiny_vlm_dirs, tmp_path,
                                                                        monkeypatch):
    import types

    vllm_standin.install(monkeypatch)
    config = small_config(do_sample=False, max_new_tokens=10)
    served = VLLMPromptPolicy.from_pretrained(saved_policy, config)
    end = served.eos_token_ids[0]
    stopped = types.SimpleNamespace(token_ids=[5, 6], finish_reason="stop", stop_reason=end)
    assert served._answer_token_ids(stopped) == [5, 6, end]  # an engine that leaves the stop token out
    assert served._answer_token_ids(types.SimpleNamespace(token_ids=[5, end], finish_reason="stop",
                                                          stop_reason=end)) == [5, end]
    assert served._answer_token_ids(types.SimpleNamespace(token_ids=[5, 6], finish_reason="length",
                                                          stop_reason=None)) == [5, 6]
    assert served._answer_token_ids(types.SimpleNamespace(token_ids=[5, 6], finish_reason="stop",
                                                          stop_reason="a stop string")) == [5, 6]

    observations = mixed_observations()
    before = served.act(observations)
    reference = PromptPolicy.from_pretrained(saved_policy, config, device="cpu")
    assert [a[-1] in served.eos_token_ids or len(a) == 10 for a in before.answer_token_ids] == [True] * 4
    assert before.answer_token_ids == [s.completion_ids.tolist() for s in
                                       (reference.act([o]).samples[0] for o in observations)]
    with torch.no_grad():  # a different adapter: the engine must answer as the new weights do
        for name, parameter in reference.model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(-3.0)
    reference.model.save_pretrained(tmp_path / "updated")
    first_id = served.lora_request.lora_int_id
    served.load_adapter(tmp_path / "updated")
    assert served.lora_request.lora_int_id > first_id
    after = served.act(observations)
    assert after.texts == one_by_one(reference, observations) != before.texts

    # a second policy on the same engine (another adapter, another id), and the base model through reference()
    shared = VLLMPromptPolicy.from_pretrained(saved_policy, config, llm=served.llm)
    assert len(vllm_standin.LLM.instances) == 1 and shared.lora_request.lora_int_id > served.lora_request.lora_int_id
    assert shared.act(observations).texts == before.texts
    base = PromptPolicy.from_pretrained(tiny_vlm_dirs["qwen2_5_vl"], config, device="cpu", add_adapter=False)
    with shared.reference():
        assert not shared.has_adapter and shared.act(observations).texts == one_by_one(base, observations)
    assert shared.has_adapter and shared.act(observations).texts == before.texts
    with pytest.raises(ValueError, match="apply to a new engine"):
        VLLMPromptPolicy.from_pretrained(saved_policy, config, llm=served.llm, enforce_eager=True)


def test_a_hub_policy_is_served_at_its_revision(saved_policy, tiny_vlm_dirs, hub_cache, monkeypatch):
    """A policy repo (tag v1) in the hub cache: the engine serves that snapshot's adapter and tokenizer, and starts
    on the base model at the revision the saved policy records."""
    from promptloop.policy.config import POLICY_CONFIG_NAME, PolicyConfig

    vllm_standin.install(monkeypatch)
    config = PolicyConfig.load(saved_policy / POLICY_CONFIG_NAME)
    config.model_revision = "main"
    config.save(saved_policy.parent / "revisioned.json")
    snapshot = hub_cache.add("me/loop", saved_policy, "e" * 40, ("v1",))
    (saved_policy.parent / "revisioned.json").replace(snapshot / POLICY_CONFIG_NAME)
    served = VLLMPromptPolicy.from_pretrained("me/loop", small_config(do_sample=False), revision="v1",
                                              **hub_cache.offline)
    engine = vllm_standin.LLM.instances[-1]
    assert served.lora_request.lora_path == str(snapshot)
    assert engine.kwargs["tokenizer"] == str(snapshot) and engine.kwargs["revision"] == "main"
    assert engine.model_path == str(tiny_vlm_dirs["qwen2_5_vl"])


@pytest.mark.parametrize("family", ["gemma3", "idefics3"])
def test_a_fixed_size_family_served_by_vllm_answers_as_transformers_does(tiny_vlm_dirs, tmp_path, monkeypatch, family):
    """Families without a pixel budget (Gemma 3, Idefics3): the engine gets no pixel budget and no video limit
    (Idefics3: the policy's image splitting); greedy answers and their teacher-forced log-probs equal the
    transformers policy's."""
    vllm_standin.install(monkeypatch)
    config = small_config(do_sample=False, max_new_tokens=6)
    PromptPolicy.from_pretrained(tiny_vlm_dirs[family], config, device="cpu").save_pretrained(tmp_path / "policy")
    served = VLLMPromptPolicy.from_pretrained(tmp_path / "policy", config)
    engine = vllm_standin.LLM.instances[-1]
    assert engine.kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert engine.kwargs["mm_processor_kwargs"] == ({"do_image_splitting": False} if family == "idefics3" else None)
    local = PromptPolicy.from_pretrained(tmp_path / "policy", config, device="cpu")
    observations = mixed_observations()
    answers, expected = served.act(observations), local.act(observations)
    assert answers.texts == expected.texts
    scored = local.score_answers(observations, answers.answer_token_ids)
    torch.testing.assert_close(scored.log_probs, expected.log_probs, atol=1e-5, rtol=0)
