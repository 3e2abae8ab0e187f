import json

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from policy_helpers import make_observation, mixed_observations, small_config
from promptloop.policy import PolicySample, PromptPolicy, VLLMPromptPolicy, build_chat
from promptloop.policy.policy import RowSeededSampling, nucleus
from promptloop.testing import vllm_standin
from promptloop.testing.tiny_vlm import TINY_VLM_FAMILIES

TOL = 1e-5


def load(tiny_vlm_dirs, family="qwen2_5_vl", **overrides) -> PromptPolicy:
    return PromptPolicy.from_pretrained(tiny_vlm_dirs[family], small_config(**overrides), device="cpu")


def bias_logits(policy: PromptPolicy, token_ids, value: float) -> None:
    """Give the output layer a bias that makes ``token_ids`` likely (random tiny models rarely emit them)."""
    head = policy.base_model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[list(token_ids)] = value
    head.bias = torch.nn.Parameter(bias, requires_grad=False)


def truncated(sample: PolicySample, length: int) -> PolicySample:
    return PolicySample(sample.prompt_ids, sample.mm_token_type_ids, sample.completion_ids[:length], sample.vision)


@pytest.mark.parametrize("family, overrides", [(f, {}) for f in TINY_VLM_FAMILIES]
                         + [("idefics3", {"image_splitting": True})],
                         ids=list(TINY_VLM_FAMILIES) + ["idefics3-crops"])
def test_teacher_forced_log_probs_equal_generation(tiny_vlm_dirs, family, overrides):
    policy = load(tiny_vlm_dirs, family, max_new_tokens=16, **overrides)
    bias_logits(policy, policy.eos_token_ids, 3.0)  # completions of different lengths
    observations = mixed_observations()
    actions = policy.act(observations, seed=3)
    lengths = actions.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "the test needs completions of different lengths"
    assert len({len(s.prompt_ids) for s in actions.samples}) == len(observations)  # left padding in play
    assert actions.log_probs.dtype == torch.float32
    assert bool((actions.log_probs[actions.completion_mask] < 0).all())

    with torch.no_grad():
        scored = policy.log_probs(actions.samples)
    assert torch.equal(scored.mask, actions.completion_mask)
    assert scored.log_probs.dtype == torch.float32
    torch.testing.assert_close(scored.log_probs, actions.log_probs, atol=TOL, rtol=0)

    # Re-batched differently (reordered, a text-only row alone, shortened completions): same numbers.
    order = [3, 2, 0, 1]
    cut = [truncated(actions.samples[i], max(1, int(lengths[i]) - j)) for j, i in enumerate(order)]
    with torch.no_grad():
        rebatched = policy.log_probs(cut)
        text_only = policy.log_probs([actions.samples[2]])
    for row, i in enumerate(order):
        n = len(cut[row].completion_ids)
        torch.testing.assert_close(rebatched.log_probs[row, :n], actions.log_probs[i, :n], atol=TOL, rtol=0)
        assert int(rebatched.mask[row].sum()) == n
    n = int(lengths[2])
    torch.testing.assert_close(text_only.log_probs[0, :n], actions.log_probs[2, :n], atol=TOL, rtol=0)


def test_log_probs_are_those_of_the_sampling_distribution(tiny_vlm_dirs):
    """The transform (temperature, suppressed tokens) equals what the sampler used (top_p = 1)."""
    policy = load(tiny_vlm_dirs, temperature=0.7)
    actions = policy.act(mixed_observations(), seed=0)
    encoding, _ = policy._encode(mixed_observations())
    config = policy._generation_config()
    config.output_scores = True
    torch.manual_seed(0)
    with torch.no_grad():
        output = policy.model.generate(**encoding, generation_config=config)
    scores = torch.log_softmax(torch.stack(output.scores, 1).float(), -1)
    prompt_len = encoding["input_ids"].shape[1]
    generated = output.sequences[:, prompt_len:]
    mask = actions.completion_mask
    assert torch.equal(generated[mask], actions.completion_ids[mask])
    expected = scores.gather(-1, generated[..., None]).squeeze(-1)
    torch.testing.assert_close(actions.log_probs[mask], expected[mask], atol=TOL, rtol=0)


@pytest.mark.parametrize("draw", [{"seed": 0}, {"row_seeds": [0, 1, 2, 3]}], ids=["batch_seed", "row_seeds"])
def test_generation_never_emits_special_or_vision_tokens(tiny_vlm_dirs, draw):
    policy = load(tiny_vlm_dirs, max_new_tokens=16)
    tokenizer = policy.processor.tokenizer
    vision = [tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|video_pad|>")]
    assert set(vision) <= set(policy.suppressed_token_ids)
    assert not set(policy.eos_token_ids) & set(policy.suppressed_token_ids)
    bias_logits(policy, policy.suppressed_token_ids, 8.0)
    encoding, _ = policy._encode(mixed_observations())

    # Control: without suppression the biased model emits them almost always.
    free = policy._generation_config()
    free.suppress_tokens = None
    with torch.no_grad():
        unsuppressed = policy.model.generate(**encoding, generation_config=free).sequences
    assert torch.isin(unsuppressed[:, encoding["input_ids"].shape[1]:], torch.tensor(vision)).any()

    actions = policy.act(mixed_observations(), **draw)
    generated = actions.completion_ids[actions.completion_mask]
    assert not torch.isin(generated, torch.tensor(policy.suppressed_token_ids)).any()
    # The prompts keep one placeholder per vision token, flagged in mm_token_type_ids, and a second forward works.
    image_token = policy.base_model.config.image_token_id
    for sample in actions.samples:
        placeholders = sample.prompt_ids == image_token
        assert torch.equal(sample.mm_token_type_ids.bool(), placeholders)
        expected = int(sample.vision["image_grid_thw"].prod(-1).sum()) // 4 if sample.vision else 0
        assert int(placeholders.sum()) == expected
        assert not (sample.completion_ids == image_token).any()
    with torch.no_grad():
        torch.testing.assert_close(policy.log_probs(actions.samples).log_probs, actions.log_probs, atol=TOL, rtol=0)


def test_sampling_is_reproducible_and_leaves_the_global_rng_alone(tiny_vlm_dirs):
    policy = load(tiny_vlm_dirs, max_new_tokens=6)
    observations = mixed_observations()[:2]
    state = torch.get_rng_state()
    first = policy.act(observations, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(policy.act(observations, seed=11).completion_ids, first.completion_ids)
    assert not torch.equal(policy.act(observations, seed=12).completion_ids, first.completion_ids)
    from_generator = policy.act(observations, generator=torch.Generator().manual_seed(5))
    again = policy.act(observations, generator=torch.Generator().manual_seed(5))
    assert torch.equal(from_generator.completion_ids, again.completion_ids)
    assert len(first.prompts) == len(observations) and all(isinstance(p, str) and p for p in first.prompts)
    with pytest.raises(ValueError, match="either seed or generator"):
        policy.act(observations, seed=1, generator=torch.Generator())


def test_greedy_decoding_ignores_the_seed(tiny_vlm_dirs):
    policy = load(tiny_vlm_dirs, do_sample=False)
    observations = mixed_observations()[:2]
    assert torch.equal(policy.act(observations, seed=1).completion_ids, policy.act(observations, seed=2).completion_ids)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_row_seeded_answers_do_not_depend_on_the_batch(tiny_vlm_dirs, top_p):
    policy = load(tiny_vlm_dirs, max_new_tokens=10, top_p=top_p)
    observations = mixed_observations()
    batch = policy.act(observations, row_seeds=[5, 6, 7, 8])
    for i, observation in enumerate(observations):
        alone = policy.act([observation], row_seeds=[5 + i])
        n = int(batch.completion_mask[i].sum())
        assert int(alone.completion_mask[0].sum()) == n
        assert alone.completion_ids[0, :n].tolist() == batch.completion_ids[i, :n].tolist()
        torch.testing.assert_close(alone.log_probs[0, :n], batch.log_probs[i, :n], atol=TOL, rtol=0)
    assert policy.act(observations[::-1], row_seeds=[8, 7, 6, 5]).texts[::-1] == batch.texts
    other = policy.act(observations, row_seeds=[1, 2, 3, 4])
    assert all(a != b for a, b in zip(other.texts, batch.texts))
    with torch.no_grad():  # the log-probs are still those of the answers under the policy
        torch.testing.assert_close(policy.log_probs(batch.samples).log_probs, batch.log_probs, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="row_seeds .* or seed/generator"):
        policy.act(observations, seed=1, row_seeds=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="row_seeds holds 2 seeds for 4 observations"):
        policy.act(observations, row_seeds=[1, 2])


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_row_seeded_sampling_draws_from_the_sampling_distribution(top_p):
    """Per-row draws follow the distribution transformers' own sampling uses (its temperature and top-p)."""
    temperature, rows = 0.8, 20000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    expected = torch.softmax(warped, -1)[0]
    kept = nucleus(torch.softmax(logits / temperature, -1), top_p)[0]
    torch.testing.assert_close(kept / kept.sum(), expected)
    assert (expected == 0).any() == (top_p < 1.0)

    sampler = RowSeededSampling(lambda scores: scores / temperature, top_p, range(rows))
    out = sampler(None, logits.expand(rows, -1).clone())
    assert bool((torch.isfinite(out).sum(-1) == 1).all()), "exactly one token left for greedy search per row"
    frequencies = torch.bincount(out.argmax(-1), minlength=logits.shape[1]).float() / rows
    assert bool((frequencies[expected == 0] == 0).all())
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)


def _train_one_step(policy: PromptPolicy, samples) -> None:
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=0.05)
    policy.model.train()
    scored = policy.log_probs(samples)
    (-(scored.log_probs.sum() / scored.mask.sum())).backward()
    optimizer.step()
    policy.model.eval()


def test_reference_is_the_base_model_and_differs_after_an_update(tiny_vlm_dirs):
    policy = load(tiny_vlm_dirs)
    base = PromptPolicy.from_pretrained(tiny_vlm_dirs["qwen2_5_vl"], small_config(), device="cpu", add_adapter=False)
    samples = policy.act(mixed_observations(), seed=0).samples
    with torch.no_grad():
        base_lp = base.log_probs(samples).log_probs
        initial = policy.log_probs(samples).log_probs
    torch.testing.assert_close(initial, base_lp, atol=TOL, rtol=0)  # LoRA starts as the identity

    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    _train_one_step(policy, samples)
    with torch.no_grad():
        trained = policy.log_probs(samples).log_probs
        with policy.reference():
            reference = policy.log_probs(samples).log_probs
        after = policy.log_probs(samples).log_probs  # the adapter is back on
    torch.testing.assert_close(reference, base_lp, atol=TOL, rtol=0)
    assert (trained - reference).abs().max() > 1e-3
    torch.testing.assert_close(after, trained, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="no LoRA adapter"):
        with base.reference():
            pass


def test_save_and_load_roundtrip_gives_identical_log_probs(tiny_vlm_dirs, tmp_path):
    policy = load(tiny_vlm_dirs, temperature=0.9, system_prompt="Rewrite the prompt.")
    samples = policy.act(mixed_observations(), seed=0).samples
    _train_one_step(policy, samples)
    policy.save_pretrained(tmp_path / "policy")
    files = {p.name for p in (tmp_path / "policy").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "policy_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert any("chat_template" in name for name in files)
    saved = json.loads((tmp_path / "policy" / "policy_config.json").read_text())
    assert saved["model_name_or_path"] == str(tiny_vlm_dirs["qwen2_5_vl"])

    loaded = PromptPolicy.from_pretrained(tmp_path / "policy", device="cpu")
    assert loaded.config == policy.config
    assert loaded.processor.chat_template == policy.processor.chat_template
    assert loaded.trainable_parameters(), "a loaded adapter stays trainable by default"
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_probs(samples).log_probs, policy.log_probs(samples).log_probs,
                                   atol=1e-6, rtol=0)
        with loaded.reference(), policy.reference():
            torch.testing.assert_close(loaded.log_probs(samples).log_probs, policy.log_probs(samples).log_probs,
                                       atol=1e-6, rtol=0)
    assert torch.equal(loaded.act(mixed_observations(), seed=4).completion_ids,
                       policy.act(mixed_observations(), seed=4).completion_ids)

    # Sampling settings can be replaced at load time; the model and the adapter stay the saved ones.
    greedy = PromptPolicy.from_pretrained(tmp_path / "policy", small_config(do_sample=False, model_name_or_path="x"),
                                          device="cpu", is_trainable=False)
    assert greedy.config.model_name_or_path == str(tiny_vlm_dirs["qwen2_5_vl"]) and not greedy.config.do_sample
    assert not greedy.trainable_parameters()


def test_a_saved_adapter_may_name_its_base_relative_to_its_folder(tiny_vlm_dirs, tmp_path):
    import shutil

    shutil.copytree(tiny_vlm_dirs["qwen2_5_vl"], tmp_path / "bundle" / "base")
    policy = PromptPolicy.from_pretrained(tmp_path / "bundle" / "base", small_config(), device="cpu")
    for p in policy.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    policy.save_pretrained(tmp_path / "bundle" / "adapter")
    config_path = tmp_path / "bundle" / "adapter" / "policy_config.json"
    saved = json.loads(config_path.read_text())
    saved["model_name_or_path"] = "../base"
    config_path.write_text(json.dumps(saved))
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "bundle", moved)

    loaded = PromptPolicy.from_pretrained(moved / "adapter", device="cpu")
    assert loaded.config.model_name_or_path == str((moved / "base").resolve())
    samples = policy.act(mixed_observations(), seed=0).samples
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_probs(samples).log_probs, policy.log_probs(samples).log_probs,
                                   atol=1e-6, rtol=0)


def test_gradients_reach_only_the_adapter_with_gradient_checkpointing(tiny_vlm_dirs):
    policy = load(tiny_vlm_dirs, "qwen3_vl", gradient_checkpointing=True)
    samples = policy.act(mixed_observations(), seed=0).samples
    policy.model.train()
    scored = policy.log_probs(samples)
    scored.log_probs.sum().backward()
    grads = {n: p.grad for n, p in policy.model.named_parameters() if p.requires_grad}
    # LoRA starts with B = 0, so only the B matrices get a gradient at the first step.
    assert grads and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(p.grad is None for p in policy.model.parameters() if not p.requires_grad)


def test_one_shot_mode_rewrites_from_the_query_alone(tiny_vlm_dirs):
    policy = load(tiny_vlm_dirs, mode="oneshot")
    actions = policy.act(mixed_observations(), seed=0)
    assert all(not s.vision and not s.mm_token_type_ids.any() for s in actions.samples)
    with torch.no_grad():
        torch.testing.assert_close(policy.log_probs(actions.samples).log_probs, actions.log_probs, atol=TOL, rtol=0)


def test_a_priori_mode_writes_every_step_at_once(tiny_vlm_dirs, monkeypatch):
    policy = load(tiny_vlm_dirs, mode="apriori", max_new_tokens=8)
    observations = [make_observation(row, q, k=0, n=3) for row, q in enumerate(["a red cat", "a dog"])]
    actions = policy.act(observations, seed=0)
    assert [len(s.prompts) for s in actions.schedules] == [3, 3]
    assert actions.prompts == [s.prompts[0] for s in actions.schedules]

    refine = policy.as_refine_fn(seed=0)
    first = refine(observations)
    calls = []
    monkeypatch.setattr(policy, "act", lambda *a, **k: calls.append(a) or actions)
    later = refine([make_observation(row, q, k=2, n=3) for row, q in enumerate(["a red cat", "a dog"])])
    assert calls == [], "later refinements read the schedule written at refinement 0"
    assert len(first) == len(later) == 2 and all(isinstance(p, str) for p in later)


def test_refine_fn_returns_one_prompt_per_observation_reproducibly(tiny_vlm_dirs):
    policy = load(tiny_vlm_dirs, max_new_tokens=6)
    observations = mixed_observations()[1:3]
    prompts = policy.as_refine_fn(seed=7)(observations)
    assert len(prompts) == len(observations) and all(isinstance(p, str) and p for p in prompts)
    assert policy.as_refine_fn(seed=7)(observations) == prompts


def test_log_probs_report_the_entropy_of_the_sampled_distribution(tmp_path):
    import math

    from promptloop.testing.tiny_vlm import save_tiny_vlm

    path = save_tiny_vlm(tmp_path / "vlm", "qwen2_5_vl")
    policy = PromptPolicy.from_pretrained(str(path), small_config(model_name_or_path=str(path)), device="cpu")
    actions = policy.act(mixed_observations(), seed=0)
    out = policy.log_probs(actions.samples)
    allowed = policy.base_model.config.get_text_config().vocab_size - len(policy.suppressed_token_ids)
    ent = out.entropy[out.mask]
    assert (ent > 0).all() and (ent <= math.log(allowed) + 1e-4).all()  # at most uniform over allowed tokens
    assert torch.equal(out.entropy[~out.mask], torch.zeros_like(out.entropy[~out.mask]))


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_static_kv_cache_gives_the_same_tokens_and_log_probs(tiny_vlm_dirs, family):
    observations = mixed_observations()
    dynamic = load(tiny_vlm_dirs, family, max_new_tokens=8).act(observations, seed=3)
    static = load(tiny_vlm_dirs, family, max_new_tokens=8, cache_implementation="static").act(observations, seed=3)
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    assert torch.allclose(static.log_probs, dynamic.log_probs, atol=TOL)
    with pytest.raises(ValueError, match="cache_implementation='sliding' must be one of"):
        small_config(cache_implementation="sliding")


@pytest.mark.parametrize("mode", ["closed", "apriori"])
def test_keep_query_words_rejects_rewrites_that_drop_a_query_word(tiny_vlm_dirs, monkeypatch, mode):
    answers = {"closed": ["Red, circle big top", "circle big top", "???"],
               "apriori": ["1: Red, circle big\n2: red big", "1: circle big", "1: red circle\n2: red circle top"]}[mode]
    observations = [make_observation(row, "red circle", prompt="red circle left", k=0, n=2) for row in range(3)]
    guarded = load(tiny_vlm_dirs, mode=mode, max_new_tokens=4, keep_query_words=True)
    monkeypatch.setattr(guarded.processor.tokenizer, "batch_decode", lambda *a, **k: list(answers))
    actions = guarded.act(observations, seed=0)
    assert actions.prompts == ["Red, circle big" if mode == "apriori" else "Red, circle big top",
                               "red circle left", "red circle left" if mode == "closed" else "red circle"]
    assert actions.kept_previous == [False, True, mode == "closed"]
    if mode == "apriori":  # later refinements read the schedule, so every step of it is guarded
        assert actions.schedules[0].prompts == ["Red, circle big", "Red, circle big"]
        assert actions.schedules[0].missing == [False, True]

    unguarded = load(tiny_vlm_dirs, mode=mode, max_new_tokens=4)
    monkeypatch.setattr(unguarded.processor.tokenizer, "batch_decode", lambda *a, **k: list(answers))
    assert unguarded.act(observations, seed=0).prompts[1] == ("circle big" if mode == "apriori" else "circle big top")


def test_keep_query_words_never_lets_a_rejected_a_priori_step_reach_a_later_one(tiny_vlm_dirs, monkeypatch):
    answers = ["1: blue circle", "1: red circle big\n2: blue circle"]
    observations = [make_observation(row, "red circle", k=0, n=3) for row in range(2)]
    policy = load(tiny_vlm_dirs, mode="apriori", max_new_tokens=4, keep_query_words=True)
    monkeypatch.setattr(policy.processor.tokenizer, "batch_decode", lambda *a, **k: list(answers))
    schedules = policy.act(observations, seed=0).schedules
    assert [s.prompts for s in schedules] == [["red circle"] * 3, ["red circle big"] * 3]
    assert [s.missing for s in schedules] == [[True] * 3, [False, True, True]]


def test_other_vlm_families_are_refused_before_any_weights_load(tmp_path, tiny_vlm_dirs, monkeypatch):
    """A LLaVA chat model (only its config.json on disk: nothing else could load) is named as unsupported."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                               num_attention_heads=2),
                text_config=LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2)).save_pretrained(tmp_path / "llava")
    with pytest.raises(ValueError, match=r"is a 'llava' model; the policy runs the chat VLM families .*'gemma3'"):
        PromptPolicy.from_pretrained(tmp_path / "llava", device="cpu")
    vllm_standin.install(monkeypatch)
    with pytest.raises(ValueError, match=r"is a 'llava' model"):  # vLLM too, before any engine starts
        VLLMPromptPolicy.from_pretrained(tmp_path / "llava")
    qwen = PromptPolicy.from_pretrained(tiny_vlm_dirs["qwen2_5_vl"], device="cpu", add_adapter=False)
    qwen.model.config.model_type = "llava"  # a model object built elsewhere is checked too
    with pytest.raises(ValueError, match="is a 'llava' model"):
        PromptPolicy(qwen.model, qwen.processor, qwen.config)


def test_a_gemma3_chat_starts_with_one_bos(tiny_vlm_dirs):
    """Gemma's chat template writes <bos> and its tokenizer adds one: the policy keeps one (a second would be an input
    the model never saw), in the text vLLM tokenizes as in the ids transformers samples from."""
    policy = load(tiny_vlm_dirs, "gemma3")
    bos = policy.processor.tokenizer.bos_token
    rendered = policy.processor.apply_chat_template(
        build_chat(mixed_observations()[0], "closed", None).messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith(bos)  # what the template writes
    _, texts = policy.chats(mixed_observations())
    assert not any(text.startswith(bos) for text in texts)
    for sample in policy.act(mixed_observations(), seed=0).samples:
        assert sample.prompt_ids[0] == policy.processor.tokenizer.bos_token_id
        assert int((sample.prompt_ids == policy.processor.tokenizer.bos_token_id).sum()) == 1


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_special_token_strings_in_queries_and_prompts_are_plain_text_to_the_policy(tiny_vlm_dirs, family):
    """A query or an earlier prompt holding the image placeholder or a turn marker must not be read as one: the
    processor would count an image that is not there, or the turn would end early."""
    policy = load(tiny_vlm_dirs, family, max_new_tokens=4)
    tokenizer = policy.processor.tokenizer
    image = tokenizer.convert_ids_to_tokens(policy.base_model.config.image_token_id)
    end = tokenizer.convert_ids_to_tokens(policy.eos_token_ids[0])
    clean = mixed_observations()
    dirty = mixed_observations()
    for o in dirty:
        o.query, o.prompt = f"{o.query} {image}", f"{image}{o.prompt} {end}"
        o.history = [f"{h} {image}" for h in o.history]
    _, clean_texts = policy.chats(clean)
    _, dirty_texts = policy.chats(dirty)
    assert dirty_texts == clean_texts
    actions = policy.act(dirty, seed=0)  # raised "found 2 image tokens and 1 image" on Idefics3 before
    assert len(actions.prompts) == len(dirty)


def test_idefics3_previews_are_one_image_unless_splitting_is_asked_for(tiny_vlm_dirs):
    """SmolVLM's processor upscales and splits every image by default; the policy asks for one image per preview
    (image_splitting=False), or the crops and the global view."""
    observations = mixed_observations()
    one = load(tiny_vlm_dirs, "idefics3")._encode(observations)[0]["pixel_values"]
    crops = load(tiny_vlm_dirs, "idefics3", image_splitting=True)._encode(observations)[0]["pixel_values"]
    assert one.shape[:2] == (4, 1) and crops.shape[:2] == (4, 5)


def test_the_chat_templates_turn_end_is_an_end_token():
    """A checkpoint whose generation config names only the text model's end token still stops at the turn end."""
    from promptloop.policy.writer import end_token_ids
    from promptloop.testing.tiny_vlm import make_idefics3_tokenizer

    tokenizer = make_idefics3_tokenizer()
    turn_end = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    text_end = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    assert end_token_ids(text_end, tokenizer, "<end_of_utterance>") == sorted({text_end, turn_end})
    assert end_token_ids(text_end, tokenizer, "<not_in_vocab>") == [text_end]
    assert end_token_ids(None, tokenizer) == [turn_end]  # the tokenizer's end token
