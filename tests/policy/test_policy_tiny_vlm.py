from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import trl
from policy_helpers import make_preview
from promptloop.policy import VLM_FAMILIES
from promptloop.testing.tiny_vlm import (
    QWEN_VL_FAMILIES,
    TINY_VLM_FAMILIES,
    make_gemma3_tokenizer,
    make_qwen_vl_tokenizer,
    qwen_vl_chat_template,
)

CLASSES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Processor"),
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor"),
}
TRL_TEMPLATES = {"qwen2_vl": "qwen2_5_vl.jinja", "qwen2_5_vl": "qwen2_5_vl.jinja", "qwen3_vl": "qwen3_vl.jinja",
                 "gemma3": "gemma3.jinja", "idefics3": "idefics3.jinja"}


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_saved_tiny_vlm_loads_through_the_auto_classes(tiny_vlm_dirs, family):
    path = tiny_vlm_dirs[family]
    assert (path / "model.safetensors").is_file()
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert (type(model).__name__, type(processor).__name__) == CLASSES[family]
    real_template = (Path(trl.__file__).parent / "chat_templates" / TRL_TEMPLATES[family]).read_text()
    assert processor.chat_template == real_template

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "un chat rouge 🐱"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoding = processor(text=[text], images=[make_preview(64, 64, 0)], return_tensors="pt")
    image_tokens = encoding["input_ids"] == model.config.image_token_id
    if family in QWEN_VL_FAMILIES:
        assert processor.video_processor is not None  # the stock processor, built with torchvision
        assert int(image_tokens.sum()) == int(encoding["image_grid_thw"].prod(-1).sum()) // 4
    elif family == "gemma3":
        assert int(image_tokens.sum()) == model.config.mm_tokens_per_image == processor.image_seq_length
        assert encoding["pixel_values"].shape == (1, 3, 56, 56)  # every image at the model's fixed size
    else:  # resized to 112 px, split into 2 x 2 crops of 56 px plus the whole image at 56 px, 4 tokens each
        assert encoding["pixel_values"].shape == (1, 5, 3, 56, 56)
        assert int(image_tokens.sum()) == 5 * processor.image_seq_len == 20
    key = VLM_FAMILIES[family].token_types_key
    if key is not None:
        assert torch.equal(encoding[key].bool(), image_tokens)
    with torch.no_grad():
        logits = model(**encoding).logits
    assert logits.shape[-1] == len(processor.tokenizer)


@pytest.mark.parametrize("family", QWEN_VL_FAMILIES)
def test_byte_level_tokenizer_encodes_any_text_and_keeps_special_tokens_whole(family):
    tokenizer = make_qwen_vl_tokenizer(family)
    text = "Ünïcødé, 漢字 and emoji 🐱 <|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.replace("<|im_end|>", "")


def test_gemma3_tokenizer_encodes_any_text_and_adds_its_bos_as_the_real_one():
    tokenizer = make_gemma3_tokenizer()
    text = "Ünïcødé, 漢字 and emoji 🐱 <end_of_turn>"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert tokenizer.decode(ids[1:]) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.replace(" <end_of_turn>", " ")
    assert (tokenizer.boi_token, tokenizer.image_token) == ("<start_of_image>", "<image_soft_token>")


def test_fallback_template_renders_like_the_real_one(monkeypatch):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a cat"}]},
    ]
    tokenizer = make_qwen_vl_tokenizer("qwen2_5_vl")
    real = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    real_no_system = tokenizer.apply_chat_template(messages[1:], add_generation_prompt=True, tokenize=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    tokenizer.chat_template = qwen_vl_chat_template("qwen2_5_vl")
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == real
    assert tokenizer.apply_chat_template(messages[1:], add_generation_prompt=True, tokenize=False) == real_no_system


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        make_qwen_vl_tokenizer("llava")
