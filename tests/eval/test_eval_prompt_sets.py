"""Prompt sets: files, registered sets (the mini world's hook), public sets with a clear offline error."""
from __future__ import annotations

import json

import pytest

from promptloop.eval import prompt_sets
from promptloop.eval.prompt_sets import (
    PUBLIC_SETS,
    PromptSetUnavailableError,
    load_prompt_set,
    register_prompt_set,
)


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(prompt_sets, "_REGISTRY", {})


def test_files_in_every_format_with_limit(tmp_path):
    (tmp_path / "q.txt").write_text("a  cat\n\n  a dog \nan owl\n")
    (tmp_path / "q.jsonl").write_text(json.dumps({"caption": "a cat"}) + "\n" + json.dumps({"caption": "a dog"}))
    (tmp_path / "q.csv").write_text("id,prompt\n1,a cat\n2,a dog\n")
    assert load_prompt_set(str(tmp_path / "q.txt")) == ["a cat", "a dog", "an owl"]
    assert load_prompt_set(str(tmp_path / "q.txt"), limit=2) == ["a cat", "a dog"]
    assert load_prompt_set(str(tmp_path / "q.jsonl"), column="caption") == ["a cat", "a dog"]
    assert load_prompt_set(str(tmp_path / "q.csv")) == ["a cat", "a dog"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompt_set(str(tmp_path / "missing.txt"))


def test_registered_sets_and_plugin_namespaces(tmp_path, monkeypatch, clean_registry):
    register_prompt_set("mine:small", lambda: ["one", " two  words "])
    assert load_prompt_set("mine:small") == ["one", "two words"]
    with pytest.raises(ValueError, match="already registered"):
        register_prompt_set("mine:small", lambda: ["other"])
    with pytest.raises(ValueError, match="built-in public prompt set"):
        register_prompt_set("drawbench", lambda: ["x"])

    # A namespace's package is imported on first use and registers its sets then (as promptloop.miniworld.queries does).
    (tmp_path / "toyworld_sets.py").write_text(
        "from promptloop.eval.prompt_sets import register_prompt_set\n"
        "register_prompt_set('toyworld:heldout', lambda: ['a red square', 'a blue circle'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(prompt_sets.PLUGIN_NAMESPACES, "toyworld", "toyworld_sets")
    assert load_prompt_set("toyworld:heldout") == ["a red square", "a blue circle"]
    with pytest.raises(ValueError, match=r"No prompt set 'toyworld:train'.*\['toyworld:heldout'\]"):
        load_prompt_set("toyworld:train")


def test_miniworld_sets_load_through_the_plugin_hook():
    heldout = load_prompt_set("miniworld:heldout", limit=32)
    assert len(heldout) == 32 and len(set(heldout)) == 32
    assert not set(heldout) & set(load_prompt_set("miniworld:train"))


def test_public_sets_say_what_to_do_offline(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert {"pickapic-v2", "drawbench", "partiprompts", "hpdv2"} <= set(PUBLIC_SETS)
    for name in ("pickapic-v2", "drawbench", "partiprompts", "hpdv2", "hpdv2:photo"):
        with pytest.raises(PromptSetUnavailableError, match=r"Offline\? Export the prompts .*prompts.source"):
            load_prompt_set(name)


def test_public_sets_read_the_right_column_and_files(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    calls = []

    def fake_load_dataset(repo, split):
        calls.append((repo, split))
        return datasets.Dataset.from_dict({"caption": ["a  cat", ""], "other": ["x", "y"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_prompt_set("pickapic-v2") == ["a cat"]
    assert calls == [("yuvalkirstain/pickapic_v2_no_images", "test_unique")]
    with pytest.raises(PromptSetUnavailableError, match="no column 'prompts'"):
        load_prompt_set("drawbench")

    def fake_download(repo, filename, repo_type):
        path = tmp_path / filename.replace("/", "_")
        path.write_text(json.dumps([f"{filename} prompt"]))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_prompt_set("hpdv2") == [f"benchmark/{s}.json prompt" for s in
                                        ("anime", "concept-art", "paintings", "photo")]
