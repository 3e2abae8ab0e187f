"""Turn a chat model's raw answer into one clean prompt for a text-to-image model.

An answer that holds no usable prompt keeps the previous prompt, and says so, so that callers can count it.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Optional, Union

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think>.*", re.DOTALL | re.IGNORECASE)  # never closed: all of it is thinking
_THINK_CLOSE = re.compile(r"^.*?</think>", re.DOTALL | re.IGNORECASE)  # opened in the chat template
_CHAT_TOKEN = re.compile(r"<\|[^|<>]{1,40}\|>|</?(?:tool_call|answer|prompt)>", re.IGNORECASE)
_ROLE_TAG = re.compile(r"^\s*(?:assistant|user|system)\s*(?::|$)\s*", re.IGNORECASE)
_LABEL = re.compile(
    r"^\s*(?:(?:sure|okay|ok)[,!.]?\s*)?(?:here(?:'s| is) (?:the |a |my )?)?"
    r"(?:(?:refined|new|improved|final|next|rewritten|revised|updated|image|text)\s+)*prompt\s*(?:\d+\s*)?(?::|-\s)\s*",
    re.IGNORECASE,
)
_CODE_FENCE = re.compile(r"```[a-zA-Z]*")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_MD_EMPHASIS = re.compile(r"(\*{1,3}|_{2,3}|`+)")
_MD_LINE_PREFIX = re.compile(r"^\s*(?:#{1,6}\s+|>\s*|[-*+\u2022]\s+)", re.MULTILINE)
_QUOTE_PAIRS = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "`": "`"}
_WHITESPACE = re.compile(r"\s+")
_WORD_EDGE = ".,;:!?\"'()[]{}"
_NUMBERED_LINE = re.compile(
    r"^\s*(?:[-*#>\s]*)(?:\*\*)?(?:step|prompt|refinement)?\s*(\d+)\s*(?:\*\*)?\s*[:.)\]-]\s*(.*)$", re.IGNORECASE
)


@dataclass
class SanitizedPrompt:
    """The outcome of :func:`sanitize_prompt`."""

    prompt: str
    """The clean prompt (the previous prompt when ``kept_previous``)."""
    kept_previous: bool
    """The answer held no usable prompt (or left out a word of the query given), so the previous prompt was
    kept."""
    truncated: bool
    """The prompt was cut to ``max_words`` words."""


@dataclass
class PromptSchedule:
    """The outcome of :func:`parse_prompt_schedule`: one prompt per refinement."""

    prompts: list[str]
    """Exactly ``num_refinements`` prompts; a missing step repeats the step before it (step 1: the previous
    prompt)."""
    missing: list[bool]
    """Per step: no usable numbered line was found for it (or its prompt left out a word of the query given)."""
    num_extra_lines: int
    """Non-empty lines that were ignored (unnumbered, out of range or a repeated number)."""
    truncated: list[bool]
    """Per step: the prompt was cut to ``max_words`` words."""


def clean_text(text: Union[str, bytes]) -> str:
    """Decode bytes as UTF-8 (dropping invalid bytes) and drop control, format, surrogate and replacement characters.

    Newlines and tabs survive (as newline / space) so that line structure can still be parsed.
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="ignore")
    kept = []
    for char in text:
        if char in "\n\r":
            kept.append("\n")
        elif char == "\t":
            kept.append(" ")
        elif char == "\ufffd" or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            continue
        else:
            kept.append(char)
    return "".join(kept)


def strip_thinking(text: str) -> str:
    """Remove ``<think>...</think>`` blocks, an unclosed ``<think>`` tail and a thinking head ending in ``</think>``."""
    text = _THINK_BLOCK.sub(" ", text)
    text = _THINK_CLOSE.sub(" ", text)
    return _THINK_OPEN.sub(" ", text)


def _strip_markup(line: str) -> str:
    line = _CHAT_TOKEN.sub(" ", line)
    line = _CODE_FENCE.sub(" ", line)
    line = _MD_LINK.sub(r"\1", line)
    line = _MD_LINE_PREFIX.sub("", line)
    line = _MD_EMPHASIS.sub("", line)
    line = _WHITESPACE.sub(" ", line).strip()
    for _ in range(3):  # "Prompt: \"...\"" and similar nestings
        before = line
        line = _ROLE_TAG.sub("", line)
        line = _LABEL.sub("", line)
        if len(line) >= 2 and _QUOTE_PAIRS.get(line[0]) == line[-1]:
            line = line[1:-1].strip()
        if line == before:
            break
    return line


def _finish(prompt: str, previous: str, max_words: Optional[int]) -> SanitizedPrompt:
    if not any(char.isalnum() for char in prompt):
        return SanitizedPrompt(prompt=previous, kept_previous=True, truncated=False)
    words = prompt.split(" ")
    if max_words is not None and len(words) > max_words:
        return SanitizedPrompt(prompt=" ".join(words[:max_words]), kept_previous=False, truncated=True)
    return SanitizedPrompt(prompt=prompt, kept_previous=False, truncated=False)


def sanitize_prompt(
    text: Union[str, bytes], previous: str, max_words: Optional[int] = None, query: Optional[str] = None
) -> SanitizedPrompt:
    """One clean single-line prompt from a raw answer.

    Strips invalid bytes and control characters, thinking blocks, chat tokens and role tags, markdown, "Prompt:"
    labels and enclosing quotes; joins lines. An answer with no letter or digit left keeps ``previous``. With
    ``max_words``, a longer prompt is cut to its first ``max_words`` words. With ``query``, a prompt (as cut) that
    leaves out a word of ``query`` is rejected: ``previous`` is kept (``PolicyConfig.keep_query_words``).
    """
    if max_words is not None and max_words <= 0:
        raise ValueError(f"max_words={max_words!r} must be a positive integer or None.")
    text = strip_thinking(_CHAT_TOKEN.sub("\n", clean_text(text)))
    lines = [_strip_markup(line) for line in text.split("\n")]
    result = _finish(" ".join(line for line in lines if line), previous, max_words)
    if query is not None and not result.kept_previous and missing_query_words(result.prompt, query):
        return SanitizedPrompt(prompt=previous, kept_previous=True, truncated=False)
    return result


def _normalised_words(text: str) -> list[str]:
    return [word for word in (w.strip(_WORD_EDGE).lower() for w in text.split()) if word]


def missing_query_words(prompt: str, query: str) -> list[str]:
    """The words of ``query`` (case and edge punctuation ignored) that ``prompt`` does not contain, in query order."""
    have = set(_normalised_words(prompt))
    return list(dict.fromkeys(word for word in _normalised_words(query) if word not in have))


def parse_prompt_schedule(
    text: Union[str, bytes], num_refinements: int, previous: str, max_words: Optional[int] = None,
    query: Optional[str] = None,
) -> PromptSchedule:
    """Parse an a-priori answer, one numbered line per refinement (``"1: ..."``, ``"2. ..."``, ``"Step 3) ..."``).

    Missing or unusable steps repeat the step before (step 1: ``previous``); with ``query``, so do steps that leave
    out a word of ``query``: a rejected prompt appears at no step. Unnumbered lines, numbers outside
    ``1..num_refinements`` and repeated numbers are ignored and counted. An answer without any numbered line is read
    as a single prompt for step 1.
    """
    if num_refinements <= 0:
        raise ValueError(f"num_refinements={num_refinements!r} must be a positive integer.")
    text = strip_thinking(_CHAT_TOKEN.sub("\n", clean_text(text)))
    found: dict[int, str] = {}
    extra = 0
    numbered = 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        match = _NUMBERED_LINE.match(line)
        if match is None:
            extra += 1
            continue
        numbered += 1
        index = int(match.group(1))
        if 1 <= index <= num_refinements and index not in found:
            found[index] = match.group(2)
        else:
            extra += 1
    if numbered == 0 and text.strip():
        found, extra = {1: text}, 0

    prompts: list[str] = []
    missing: list[bool] = []
    truncated: list[bool] = []
    last = previous
    for index in range(1, num_refinements + 1):
        result = sanitize_prompt(found.get(index, ""), last, max_words, query)
        prompts.append(result.prompt)
        missing.append(result.kept_previous)
        truncated.append(result.truncated)
        last = result.prompt
    return PromptSchedule(prompts=prompts, missing=missing, num_extra_lines=extra, truncated=truncated)
