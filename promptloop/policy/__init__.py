"""The policy PromptLoop trains: a chat VLM (LoRA) that rewrites the prompt from the x0 preview."""
from promptloop.policy.batch import PolicySample, collate_samples
from promptloop.policy.chat import DEFAULT_SYSTEM_PROMPTS, Chat, build_chat
from promptloop.policy.config import POLICY_MODES, PolicyConfig
from promptloop.policy.families import SUPPORTED_MODEL_TYPES, VLM_FAMILIES, VLMFamily
from promptloop.policy.policy import PolicyActions, PromptPolicy, TokenLogProbs
from promptloop.policy.vllm_backend import VLLMPromptPolicy
from promptloop.policy.writer import PromptActions, PromptWriter, image_row_seed
from promptloop.policy.sanitize import (
    PromptSchedule,
    SanitizedPrompt,
    clean_text,
    missing_query_words,
    parse_prompt_schedule,
    sanitize_prompt,
    strip_thinking,
)

__all__ = [
    "Chat",
    "DEFAULT_SYSTEM_PROMPTS",
    "POLICY_MODES",
    "PolicyActions",
    "PolicyConfig",
    "PolicySample",
    "PromptActions",
    "PromptPolicy",
    "PromptWriter",
    "PromptSchedule",
    "SUPPORTED_MODEL_TYPES",
    "SanitizedPrompt",
    "TokenLogProbs",
    "VLLMPromptPolicy",
    "VLMFamily",
    "VLM_FAMILIES",
    "build_chat",
    "clean_text",
    "collate_samples",
    "image_row_seed",
    "missing_query_words",
    "parse_prompt_schedule",
    "sanitize_prompt",
    "strip_thinking",
]
