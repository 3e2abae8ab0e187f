from types import SimpleNamespace

import pytest

from policy_helpers import make_observation, make_preview
from promptloop.pipeline import policy_mode
from promptloop.policy import DEFAULT_SYSTEM_PROMPTS, PolicyConfig, PromptWriter, build_chat


def _user_text(chat):
    return next(part["text"] for part in chat.messages[1]["content"] if part["type"] == "text")


def test_closed_loop_chat_shows_preview_query_history_and_progress():
    observation = make_observation(
        0, "a red cat", make_preview(32, 32, 0), prompt="a red cat, soft light",
        history=["a red cat", "a red cat, warm", "a red cat, soft light"], k=2, n=5,
    )
    chat = build_chat(observation, "closed")
    assert chat.messages[0]["role"] == "system"
    assert chat.messages[0]["content"][0]["text"] == DEFAULT_SYSTEM_PROMPTS["closed"]
    assert [part["type"] for part in chat.messages[1]["content"]] == ["image", "text"]
    assert len(chat.images) == 1
    text = _user_text(chat)
    assert "User query: a red cat" in text
    assert "Current prompt: a red cat, soft light" in text
    assert "1. a red cat\n2. a red cat, warm" in text
    assert "refinement 3 of 5" in text and "60% of the noise is left" in text


def test_closed_loop_without_preview_says_so():
    chat = build_chat(make_observation(0, "a red cat"), "closed")
    assert chat.images == [] and [part["type"] for part in chat.messages[1]["content"]] == ["text"]
    assert "No preview image" in _user_text(chat)


@pytest.mark.parametrize("mode", ["oneshot", "apriori"])
def test_open_loop_modes_never_show_the_image(mode):
    chat = build_chat(make_observation(0, "a red cat", make_preview(32, 32, 0), n=4), mode)
    assert chat.images == [] and [part["type"] for part in chat.messages[1]["content"]] == ["text"]
    assert chat.messages[0]["content"][0]["text"] == DEFAULT_SYSTEM_PROMPTS[mode]
    assert "User query: a red cat" in _user_text(chat)
    if mode == "apriori":
        assert "Write 4 prompts" in _user_text(chat)


def test_default_system_prompts_state_the_job():
    closed = DEFAULT_SYSTEM_PROMPTS["closed"].lower()
    for phrase in ("intent", "one improved prompt", "layout", "details", "limited number of tokens"):
        assert phrase in closed
    assert '"1: ..."' in DEFAULT_SYSTEM_PROMPTS["apriori"]


def test_system_prompt_from_file_replaces_the_default(tmp_path):
    path = tmp_path / "system.txt"
    path.write_text("You are a careful prompt editor.", encoding="utf-8")
    config = PolicyConfig(system_prompt_file=str(path))
    chat = build_chat(make_observation(0, "a red cat"), "closed", config.resolved_system_prompt())
    assert chat.messages[0]["content"][0]["text"] == "You are a careful prompt editor."


class _ChatOnly(PromptWriter):
    """A writer that only builds chats (its processor's template returns the system prompt)."""

    has_adapter = False
    act = reference = None

    def __init__(self, config):
        super().__init__(SimpleNamespace(apply_chat_template=lambda messages, **kw: messages[0]["content"][0]["text"],
                                         tokenizer=SimpleNamespace(bos_token=None, added_tokens_decoder={},
                                                                   all_special_tokens=[])), config)


def _system(writer, mode):
    with policy_mode(writer, mode):
        return writer.chats([make_observation(0, "a red cat", n=3)])[1][0]


def test_a_custom_system_prompt_is_used_only_in_the_mode_it_was_written_for():
    writer = _ChatOnly(PolicyConfig(system_prompt="Refine it from the preview."))
    assert writer.config.system_prompt_mode == "closed"
    assert [_system(writer, mode) for mode in ("closed", "oneshot", "apriori")] == [
        "Refine it from the preview.", DEFAULT_SYSTEM_PROMPTS["oneshot"], DEFAULT_SYSTEM_PROMPTS["apriori"]]

    writer = _ChatOnly(PolicyConfig(mode="oneshot", system_prompt="Rewrite it once.",
                                    system_prompts={"apriori": "Write a schedule.", "oneshot": "Not this one."}))
    assert [_system(writer, mode) for mode in ("closed", "oneshot", "apriori")] == [
        DEFAULT_SYSTEM_PROMPTS["closed"], "Rewrite it once.", "Write a schedule."]
    assert writer.config.mode == "oneshot"


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        build_chat(make_observation(0, "a red cat"), "loop")
