"""Tiny random-weight Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3 and Idefics3 chat models of the real classes, built
offline.

Qwen-VL: the tokenizer is a byte-level ``Qwen2Tokenizer`` (256 byte symbols, no merges) carrying the special tokens
of the real Qwen-VL vocabularies; the processor is the stock one (image + video processor, which needs
torchvision). Gemma 3: a ``GemmaTokenizer`` of byte-fallback tokens with the real special tokens, the stock
``Gemma3Processor`` at a small fixed image size. Idefics3 (the SmolVLM architecture): a byte-level BPE tokenizer
with the real special tokens, the stock ``Idefics3Processor`` splitting each image into crops plus a global view.
The chat templates are the real ones. ``save_tiny_vlm`` writes a
checkpoint that ``AutoModelForImageTextToText`` and ``AutoProcessor.from_pretrained`` load back like a hub model.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import GenerationConfig, PreTrainedModel, ProcessorMixin, Qwen2Tokenizer

from promptloop.testing.tokenizers import byte_symbols

QWEN_VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TINY_VLM_FAMILIES = QWEN_VL_FAMILIES + ("gemma3", "idefics3")

GEMMA3_SPECIAL_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                         "image_token": "<image_soft_token>"}
"""The named image tokens of the real Gemma 3 tokenizer (``tokenizer.boi_token`` ..., read by its processor)."""

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
"""Special tokens of the real Qwen2-VL / Qwen2.5-VL / Qwen3-VL vocabularies (same order, own ids)."""

PLAIN_ADDED_TOKENS = {
    "qwen2_vl": ("<tool_call>", "</tool_call>"),
    "qwen2_5_vl": ("<tool_call>", "</tool_call>"),
    "qwen3_vl": ("<tool_call>", "</tool_call>", "<think>", "</think>"),
}
"""Added tokens that are not special (the real tokenizers decode them like text)."""

_TRL_TEMPLATE = {"qwen2_vl": "qwen2_5_vl.jinja", "qwen2_5_vl": "qwen2_5_vl.jinja", "qwen3_vl": "qwen3_vl.jinja"}

# Used only when TRL (which ships the real templates) is not installed: the same rendering for the messages this
# project writes (system / user / assistant turns with text and image parts).
_FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and default_system %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _check_family(family: str, families: tuple[str, ...] = QWEN_VL_FAMILIES) -> None:
    if family not in families:
        raise ValueError(f"Unknown tiny VLM family {family!r}; choose one of {families}.")


def _trl_chat_template(name: str) -> Optional[str]:
    """The real chat template ``name`` from TRL's wheel (found without importing TRL), or None without TRL."""
    spec = importlib.util.find_spec("trl")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / name
        if path.is_file():
            return path.read_text()
    return None


def qwen_vl_chat_template(family: str) -> str:
    """The real chat template of ``family``, read from TRL's wheel (found without importing TRL).

    Qwen2-VL-Instruct and Qwen2.5-VL-Instruct share one template. Without TRL installed, an equivalent template
    for system/user/assistant turns with text and image parts is returned.
    """
    _check_family(family)
    real = _trl_chat_template(_TRL_TEMPLATE[family])
    if real is not None:
        return real
    default_system = "true" if family != "qwen3_vl" else "false"
    return "{% set default_system = " + default_system + " %}" + _FALLBACK_TEMPLATE


def make_qwen_vl_tokenizer(family: str = "qwen2_5_vl") -> Qwen2Tokenizer:
    """A byte-level ``Qwen2Tokenizer`` (encodes any text) with the Qwen-VL special tokens and chat template."""
    _check_family(family)
    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
    )
    tokenizer.add_tokens(list(PLAIN_ADDED_TOKENS[family]))
    tokenizer.chat_template = qwen_vl_chat_template(family)
    return tokenizer


def _text_config(family: str, vocab_size: int, hidden_size: int, num_layers: int, ids: dict[str, int]) -> dict:
    num_heads = 4
    head_dim = hidden_size // num_heads
    config: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=2,
        max_position_embeddings=4096, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        bos_token_id=None, tie_word_embeddings=False,
    )
    # mrope_section (temporal, height, width) must sum to head_dim / 2.
    quarter = head_dim // 8
    mrope_section = [quarter, quarter, head_dim // 2 - 2 * quarter]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section}
    if family == "qwen3_vl":
        config["head_dim"] = head_dim
        rope["mrope_interleaved"] = True
    config["rope_parameters"] = rope
    return config


def _vision_config(family: str, hidden_size: int) -> dict:
    if family == "qwen2_vl":
        return dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=4, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2)
    if family == "qwen2_5_vl":
        return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden_size,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                    fullatt_block_indexes=[1])
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden_size,
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                deepstack_visual_indexes=[1])


def _classes(family: str):
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor


def make_gemma3_tokenizer() -> Any:
    """A ``GemmaTokenizer`` that encodes any text (byte fallback, no merges) with the real Gemma 3 special tokens
    (turn markers, image tokens) and TRL's copy of the real chat template."""
    from transformers import GemmaTokenizer

    template = _trl_chat_template("gemma3.jinja")
    if template is None:
        raise ImportError("The tiny Gemma 3 uses TRL's copy of the real chat template: pip install trl.")
    vocab = {token: i for i, token in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"))}
    vocab.update({f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)})
    vocab["\u2581"] = len(vocab)  # what the normaliser turns spaces into
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True,  # as the real one: the chat template
                               extra_special_tokens=dict(GEMMA3_SPECIAL_TOKENS))  # writes <bos> as well
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
                                 replace_extra_special_tokens=False)
    tokenizer.chat_template = template
    return tokenizer


def _make_tiny_gemma3(hidden_size: int, num_layers: int, seed: int, image_size: int,
                      tie_word_embeddings: bool) -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tokenizer = make_gemma3_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    mm_tokens_per_image = 4  # 2 x 2 pooled from the vision tower's (image_size / 14)^2 patches
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hidden_size // 4, max_position_embeddings=4096, sliding_window=1024,
                         pad_token_id=ids("<pad>"), eos_token_id=ids("<eos>"), bos_token_id=ids("<bos>"),
                         tie_word_embeddings=tie_word_embeddings),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=14),
        mm_tokens_per_image=mm_tokens_per_image, boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"),
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config).eval()
    # The real instruct checkpoints stop on either end token.
    model.generation_config = GenerationConfig(eos_token_id=[ids("<eos>"), ids("<end_of_turn>")],
                                               pad_token_id=ids("<pad>"), bos_token_id=ids("<bos>"))
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
                                tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                                image_seq_length=mm_tokens_per_image)
    return model, processor


IDEFICS3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<end_of_utterance>", "<fake_token_around_image>",
                           "<image>", "<global-img>") + tuple(f"<row_{r}_col_{c}>" for r in range(1, 7)
                                                              for c in range(1, 7))
"""Special tokens of the real Idefics3 vocabulary: text markers, the image placeholders and the crop-grid tokens."""


def make_idefics3_tokenizer() -> Any:
    """A byte-level BPE tokenizer (256 byte symbols, no merges) with the real Idefics3 special tokens and TRL's copy
    of the real chat template (which writes ``<|begin_of_text|>``; the tokenizer adds nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    template = _trl_chat_template("idefics3.jinja")
    if template is None:
        raise ImportError("The tiny Idefics3 uses TRL's copy of the real chat template: pip install trl.")
    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(byte_symbols())}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<end_of_utterance>",
                                  "pad_token": "<|end_of_text|>",
                                  "additional_special_tokens": list(IDEFICS3_SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = template
    return tokenizer


def _make_tiny_idefics3(hidden_size: int, num_layers: int, seed: int, image_size: int,
                        tie_word_embeddings: bool) -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, \
        Idefics3Processor

    tokenizer = make_idefics3_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    patch, scale = 14, 2
    config = Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=ids("<|end_of_text|>"),
                         bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<end_of_utterance>"),
                         tie_word_embeddings=tie_word_embeddings),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch),
        scale_factor=scale, image_token_id=ids("<image>"), tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=[ids("<end_of_utterance>"), ids("<|end_of_text|>")],
                                               pad_token_id=ids("<|end_of_text|>"),
                                               bos_token_id=ids("<|begin_of_text|>"))
    # Each image: resized to 2 x image_size on its longest edge, split into image_size crops plus a global view.
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 2 * image_size},
                                             max_image_size={"longest_edge": image_size})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  chat_template=tokenizer.chat_template,
                                  image_seq_len=(image_size // patch) ** 2 // scale ** 2)
    return model, processor


def make_tiny_vlm(
    family: str = "qwen2_5_vl", hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
    max_pixels: int = 128 * 128, min_pixels: Optional[int] = None, tokenizer: Optional[Qwen2Tokenizer] = None,
    tie_word_embeddings: Optional[bool] = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A random-weight chat VLM of the real ``family`` class and its stock processor.

    Qwen-VL: ``max_pixels`` / ``min_pixels`` bound the image size the processor produces (the real models allow
    ~1M pixels; tiny tests want a handful of vision tokens; default minimum: one merged patch); ``tokenizer``
    defaults to the byte-level one of :func:`make_qwen_vl_tokenizer`. Gemma 3: every image is resized to 56 px (the
    real 896 px), 4 image tokens (the real 256). Idefics3: images resized to 112 px and split into 2 x 2 crops of
    56 px plus the whole image, 4 tokens each. ``tie_word_embeddings``: default the real family's (Gemma ties).
    """
    _check_family(family, TINY_VLM_FAMILIES)
    if family == "gemma3":
        if tokenizer is not None:
            raise ValueError("tokenizer= applies to the Qwen-VL families; the tiny Gemma 3 builds its own.")
        return _make_tiny_gemma3(hidden_size, num_layers, seed, 56, tie_word_embeddings is not False)
    if family == "idefics3":
        if tokenizer is not None:
            raise ValueError("tokenizer= applies to the Qwen-VL families; the tiny Idefics3 builds its own.")
        return _make_tiny_idefics3(hidden_size, num_layers, seed, 56, bool(tie_word_embeddings))
    tie_word_embeddings = bool(tie_word_embeddings)
    from transformers import Qwen2VLImageProcessor

    config_cls, model_cls, processor_cls, video_processor_cls = _classes(family)
    tokenizer = tokenizer if tokenizer is not None else make_qwen_vl_tokenizer(family)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = _text_config(family, len(tokenizer), hidden_size, num_layers, ids)
    if tie_word_embeddings:
        text_config["tie_word_embeddings"] = True
    config = config_cls(
        text_config=text_config,
        vision_config=_vision_config(family, hidden_size),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    # The real checkpoints stop on either end token and pad with <|endoftext|>.
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
    )
    patch = config.vision_config.patch_size
    size = {"shortest_edge": (2 * patch) ** 2 if min_pixels is None else min_pixels, "longest_edge": max_pixels}
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2, size=size),
        tokenizer=tokenizer,
        video_processor=video_processor_cls(patch_size=patch, merge_size=2, temporal_patch_size=2, size=size),
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def save_tiny_vlm(path: str | Path, family: str = "qwen2_5_vl", **kwargs: Any) -> Path:
    """Build a tiny VLM (see :func:`make_tiny_vlm`) and save model + processor to ``path`` (safetensors)."""
    model, processor = make_tiny_vlm(family, **kwargs)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
