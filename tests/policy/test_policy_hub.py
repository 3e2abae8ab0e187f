"""Sharing a policy: the model card written with every saved policy, and the upload to the hub (``fake_hub``, a
recording stand-in for huggingface_hub's HfApi, replaces the network)."""
from __future__ import annotations

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from policy_helpers import small_config
from promptloop.policy import PromptPolicy
from promptloop.policy.hub import (
    TrainingSummary,
    check_hub_token,
    is_hub_id,
    policy_model_card,
    push_policy_folder,
)


def _summary(**overrides) -> TrainingSummary:
    values = dict(backbone="stabilityai/stable-diffusion-xl-base-1.0", reward="imagereward", num_refinements=5,
                  initial_rewrite=False, feedback=True, group_size=8, prompts_per_step=16, steps=300,
                  learning_rate=1e-5, beta=0.01, seed=3, reward_first=0.1234, reward_last=0.5678, eval_reward=None)
    values.update(overrides)
    return TrainingSummary(**values)


def test_is_hub_id_tells_repo_ids_from_local_paths(tmp_path):
    assert is_hub_id("Qwen/Qwen2.5-VL-3B-Instruct") and is_hub_id("gpt2")
    for name in ("../policy_edit", "./x", "/abs/path", "~/models/x", "a/b/c", "", str(tmp_path)):
        assert not is_hub_id(name), name


def test_model_card_has_hub_metadata_usage_and_training():
    config = small_config(model_name_or_path="Qwen/Qwen2.5-VL-3B-Instruct")
    card = ModelCard(policy_model_card(config, has_adapter=True, repo_id="me/sdxl-loop", training=_summary()))
    assert card.data.base_model == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert card.data.library_name == "peft"
    assert {"promptloop", "grpo", "lora"} <= set(card.data.tags)
    text = card.text
    assert 'PromptLoopPipeline.from_pretrained("me/sdxl-loop", pipe' in text
    assert 'DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0"' in text
    assert "num_refinements=5" in text and "--policy me/sdxl-loop" in text
    assert "initial_rewrite" not in text and "--initial-rewrite" not in text
    assert "take the values it was trained with (`loop_config.json`)" in text
    assert "| reward | `imagereward` |" in text and "| steps | 300 |" in text
    assert "| 0.1234 | 0.5678 | not logged |" in text
    assert f"r = {config.lora_r}" in text


def test_model_card_keeps_local_paths_out_of_the_metadata():
    config = small_config(model_name_or_path="../policy_edit")
    card = ModelCard(policy_model_card(config, has_adapter=False, training=_summary(backbone="/data/backbone_a",
                                                                                    initial_rewrite=True)))
    assert card.data.base_model is None and card.data.library_name == "transformers"
    assert "`../policy_edit`" in card.text and "`/data/backbone_a`" in card.text
    assert "PATH_TO_THIS_FOLDER" in card.text and "YOUR/DIFFUSERS-PIPELINE" in card.text
    assert "## Training" not in policy_model_card(config, has_adapter=False)
    assert 'mode="closed", initial_rewrite=True, seed=0)' in card.text and "--initial-rewrite" in card.text


def test_saved_policy_carries_its_own_model_card(tiny_vlm_dirs, tmp_path):
    policy = PromptPolicy.from_pretrained(tiny_vlm_dirs["qwen2_5_vl"], small_config(), device="cpu")
    policy.save_pretrained(tmp_path / "policy")
    card = ModelCard.load(tmp_path / "policy" / "README.md")
    assert card.data.library_name == "peft" and "promptloop" in card.data.tags
    assert "PromptLoopPipeline.from_pretrained" in card.text
    assert "Model Card for Model ID" not in card.text, "peft's template card must be replaced"
    policy.save_pretrained(tmp_path / "custom", model_card="# mine\n")
    assert (tmp_path / "custom" / "README.md").read_text() == "# mine\n"


def test_push_to_hub_uploads_a_loadable_policy(tiny_vlm_dirs, tmp_path, fake_hub):
    policy = PromptPolicy.from_pretrained(tiny_vlm_dirs["qwen2_5_vl"], small_config(), device="cpu")
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    with pytest.warns(UserWarning, match="local path"):  # the tiny base model is a local folder
        commit = policy.push_to_hub("me/tiny-loop", private=True, commit_message="first")
    assert commit == "commit of me/tiny-loop"
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[0][2] == {"private": True, "exist_ok": True}
    assert fake_hub.calls[1][2]["commit_message"] == "first"

    remote = fake_hub.remote / "me/tiny-loop"
    assert 'from_pretrained("me/tiny-loop"' in (remote / "README.md").read_text()
    loaded = PromptPolicy.from_pretrained(remote, device="cpu", is_trainable=False)
    expected = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    uploaded = load_file(str(remote / "adapter_model.safetensors"))
    assert len(uploaded) == len(expected) > 0
    for name, param in loaded.model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, dict(policy.model.named_parameters())[name], atol=0, rtol=0)


def test_push_needs_a_saved_policy_folder_and_a_token(tmp_path, monkeypatch, fake_hub):
    with pytest.raises(FileNotFoundError, match="policy_config.json"):
        push_policy_folder(tmp_path, "me/x")
    assert fake_hub.calls == []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="HF_TOKEN"):
        check_hub_token()
    check_hub_token(token="hf_given")  # an explicit token is enough
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_saved")
    check_hub_token()


def _nudged_policy(base: str, config, seed: int) -> PromptPolicy:
    policy = PromptPolicy.from_pretrained(base, config, device="cpu")
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return policy


def _lora_weights(policy: PromptPolicy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" in n}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


def test_hub_policy_loads_at_the_asked_revision(tiny_vlm_dirs, tmp_path, hub_cache):
    """Two revisions of a policy repo in the hub cache (real huggingface_hub resolution, no network): main and the
    tag v1 hold different adapters; ``revision`` picks one, for both backends' resolution."""
    base = str(tiny_vlm_dirs["qwen2_5_vl"])
    versions = {}
    for seed, (commit, refs) in enumerate((("a" * 40, ("main",)), ("b" * 40, ("v1",)))):
        policy = _nudged_policy(base, small_config(), seed)
        policy.save_pretrained(tmp_path / commit[0])
        hub_cache.add("me/loop", tmp_path / commit[0], commit, refs)
        versions[refs[0]] = _lora_weights(policy)
    assert any(not torch.equal(versions["main"][n], versions["v1"][n]) for n in versions["main"]), \
        "the two revisions must differ for the test to mean anything"
    hub = hub_cache.offline

    for revision, expected in ((None, "main"), ("v1", "v1"), ("b" * 40, "v1")):
        loaded = PromptPolicy.from_pretrained("me/loop", device="cpu", is_trainable=False, revision=revision, **hub)
        _assert_same(_lora_weights(loaded), versions[expected])
    with pytest.raises(OSError):  # a revision the cache does not hold: no saved policy, and no base model either
        PromptPolicy.from_pretrained("me/loop", device="cpu", revision="v9", **hub)


def test_base_model_revision_is_used_and_recorded(tiny_vlm_dirs, tmp_path, hub_cache):
    """``model_revision`` picks the base model's revision on the hub; a saved policy records it and loads its base
    at that revision again."""
    from transformers import AutoModelForImageTextToText

    base_dir = tiny_vlm_dirs["qwen2_5_vl"]
    changed = AutoModelForImageTextToText.from_pretrained(base_dir)
    with torch.no_grad():
        changed.get_output_embeddings().weight.mul_(-1.0)
    changed.save_pretrained(tmp_path / "changed")
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "chat_template.json", "video_preprocessor_config.json", "processor_config.json"):
        if (base_dir / name).is_file():
            (tmp_path / "changed" / name).write_bytes((base_dir / name).read_bytes())
    hub_cache.add("me/base", base_dir, "c" * 40)
    hub_cache.add("me/base", tmp_path / "changed", "d" * 40, ("v2",))
    hub = hub_cache.offline

    def head(policy: PromptPolicy) -> torch.Tensor:
        return policy.model.get_base_model().get_output_embeddings().weight

    main = PromptPolicy.from_pretrained("me/base", small_config(), device="cpu", **hub)
    at_v2 = PromptPolicy.from_pretrained("me/base", small_config(), device="cpu", revision="v2", **hub)
    torch.testing.assert_close(head(at_v2), -head(main), atol=0, rtol=0)
    assert main.config.model_revision is None and at_v2.config.model_revision == "v2"
    from_config = PromptPolicy.from_pretrained("me/base", small_config(model_name_or_path="me/base",
                                                                       model_revision="v2"), device="cpu", **hub)
    torch.testing.assert_close(head(from_config), head(at_v2), atol=0, rtol=0)

    at_v2.save_pretrained(tmp_path / "policy")
    assert "| base model | `me/base` at revision `v2` |" in (tmp_path / "policy" / "README.md").read_text()
    reloaded = PromptPolicy.from_pretrained(tmp_path / "policy", device="cpu", **hub)
    assert reloaded.config.model_name_or_path == "me/base" and reloaded.config.model_revision == "v2"
    torch.testing.assert_close(head(reloaded), head(at_v2), atol=0, rtol=0)
