import pytest

from promptloop.policy import clean_text, missing_query_words, parse_prompt_schedule, sanitize_prompt

PREVIOUS = "a red cat on a sofa"


@pytest.mark.parametrize("answer", ["", "   \n\t  ", "<think>the cat should be redder</think>", "<think>unfinished",
                                    "<|im_end|>", '""', "**  **", "Prompt:", "\x00\x01\x02"])
def test_unusable_answers_keep_the_previous_prompt(answer):
    result = sanitize_prompt(answer, PREVIOUS)
    assert result.prompt == PREVIOUS
    assert result.kept_previous
    assert not result.truncated


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("a fluffy red cat on a velvet sofa", "a fluffy red cat on a velvet sofa"),
        ("<think>more light</think>\na red cat, soft light", "a red cat, soft light"),
        ("I should add light.</think>a red cat, soft light", "a red cat, soft light"),
        ("Refined prompt: \"a red cat, soft light\"<|im_end|>", "a red cat, soft light"),
        ("assistant\nPrompt: a red cat, soft light", "a red cat, soft light"),
        ("Sure! Here is the new prompt: \u201ca red cat, soft light\u201d", "a red cat, soft light"),
        ("**A red cat**, soft _light_\n\n- golden hour", "A red cat, soft _light_ golden hour"),
        ("```\na red cat, soft light\n```", "a red cat, soft light"),
        ("a red\x07 cat\u200b on a sofa\ufffd", "a red cat on a sofa"),
        ("Prompt-based art of a red cat", "Prompt-based art of a red cat"),
    ],
)
def test_chat_artefacts_thinking_and_markdown_are_stripped(answer, expected):
    result = sanitize_prompt(answer, PREVIOUS)
    assert result.prompt == expected
    assert not result.kept_previous


def test_non_utf8_bytes_are_dropped():
    raw = "a red cat".encode() + b"\xff\xfe\x80" + " on a sofa".encode()
    result = sanitize_prompt(raw, PREVIOUS)
    assert result.prompt == "a red cat on a sofa"
    assert clean_text(b"caf\xc3\xa9 \xc3") == "café "


def test_ten_times_too_long_answer_is_cut_to_the_word_budget():
    words = [f"word{i}" for i in range(500)]
    result = sanitize_prompt(" ".join(words), PREVIOUS, max_words=50)
    assert result.truncated and not result.kept_previous
    assert result.prompt.split(" ") == words[:50]
    untouched = sanitize_prompt(" ".join(words[:50]), PREVIOUS, max_words=50)
    assert not untouched.truncated and untouched.prompt == " ".join(words[:50])
    with pytest.raises(ValueError, match="max_words"):
        sanitize_prompt("x", PREVIOUS, max_words=0)


def test_schedule_in_the_requested_format():
    schedule = parse_prompt_schedule("1: a red cat\n2: a red cat, soft light\n3: a red cat, soft light, fur", 3,
                                     PREVIOUS)
    assert schedule.prompts == ["a red cat", "a red cat, soft light", "a red cat, soft light, fur"]
    assert schedule.missing == [False, False, False] and schedule.num_extra_lines == 0


def test_schedule_missing_steps_repeat_the_step_before():
    schedule = parse_prompt_schedule("2. a red cat\n4) a red cat, fur", 5, PREVIOUS)
    assert schedule.prompts == [PREVIOUS, "a red cat", "a red cat", "a red cat, fur", "a red cat, fur"]
    assert schedule.missing == [True, False, True, False, True]


def test_schedule_extra_lines_are_ignored_and_counted():
    text = ("<think>plan</think>Here are the prompts:\n**1:** a red cat\nStep 2: a red cat, warm light\n"
            "3: out of range\n1: a repeated step\n\ntrailing remark")
    schedule = parse_prompt_schedule(text, 2, PREVIOUS)
    assert schedule.prompts == ["a red cat", "a red cat, warm light"]
    assert schedule.missing == [False, False]
    assert schedule.num_extra_lines == 4  # header, out of range, repeated, trailing


def test_schedule_without_numbers_is_one_prompt_for_every_step():
    schedule = parse_prompt_schedule("a red cat, warm light", 3, PREVIOUS)
    assert schedule.prompts == ["a red cat, warm light"] * 3
    assert schedule.missing == [False, True, True]


def test_empty_schedule_keeps_the_previous_prompt_everywhere():
    schedule = parse_prompt_schedule("<think>nothing</think>", 2, PREVIOUS)
    assert schedule.prompts == [PREVIOUS, PREVIOUS] and schedule.missing == [True, True]


def test_schedule_steps_are_cut_to_the_word_budget():
    schedule = parse_prompt_schedule("1: " + "cat " * 40 + "\n2: dog", 2, PREVIOUS, max_words=4)
    assert schedule.prompts == ["cat cat cat cat", "dog"] and schedule.truncated == [True, False]


def test_a_schedule_step_leaving_out_a_query_word_appears_at_no_step():
    schedule = parse_prompt_schedule("1: blue circle", 3, "red circle", query="red circle")
    assert schedule.prompts == ["red circle"] * 3 and schedule.missing == [True, True, True]
    schedule = parse_prompt_schedule("1: red circle big\n2: blue circle\n4: red", 4, "red circle", query="red circle")
    assert schedule.prompts == ["red circle big"] * 4 and schedule.missing == [False, True, True, True]
    schedule = parse_prompt_schedule("1: big top red circle\n2: red circle", 2, "red circle", 3, query="red circle")
    assert schedule.missing == [True, False], "the prompt as cut to max_words is checked"
    assert sanitize_prompt("blue circle", "red circle left", query="red circle").kept_previous


def test_missing_query_words_ignores_case_order_and_edge_punctuation():
    assert missing_query_words("Big, RED circle top", "red circle") == []
    assert missing_query_words("red square", "red circle top circle") == ["circle", "top"]
    assert missing_query_words("a red-circle", "red circle") == ["red", "circle"]
    assert missing_query_words("anything", "") == []
