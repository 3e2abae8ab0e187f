import json

import pytest
import torch

from promptloop.policy import PolicyConfig


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "loop"}, "mode"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_target_modules": []}, "lora_target_modules"),
        ({"dtype": "fp8"}, "dtype"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_prompt_words": 0}, "max_prompt_words"),
        ({"system_prompt": "  "}, "system_prompt"),
        ({"system_prompt_file": "/nonexistent/system.txt"}, "system_prompt_file"),
        ({"min_pixels": 0}, "min_pixels"),
        ({"min_pixels": 100, "max_pixels": 99}, "max_pixels"),
        ({"model_name_or_path": ""}, "model_name_or_path"),
    ],
)
def test_invalid_fields_raise_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        PolicyConfig(**overrides)


def test_system_prompt_and_file_are_exclusive(tmp_path):
    path = tmp_path / "system.txt"
    path.write_text("Rewrite prompts.")
    with pytest.raises(ValueError, match="either system_prompt or system_prompt_file"):
        PolicyConfig(system_prompt="x", system_prompt_file=str(path))


def test_auto_dtype_is_bf16_on_cuda_and_fp32_on_cpu():
    config = PolicyConfig()
    assert config.torch_dtype(torch.device("cpu")) == torch.float32
    assert config.torch_dtype(torch.device("cuda")) == torch.bfloat16
    assert PolicyConfig(dtype="float16").torch_dtype(torch.device("cpu")) == torch.float16


def test_save_inlines_the_system_prompt_file_and_loads_back(tmp_path):
    path = tmp_path / "system.txt"
    path.write_text("Rewrite prompts, carefully.", encoding="utf-8")
    config = PolicyConfig(system_prompt_file=str(path), temperature=0.7, lora_target_modules=["q_proj", "v_proj"])
    config.save(tmp_path / "policy_config.json")
    path.unlink()  # the saved config must not depend on the file any more
    loaded = PolicyConfig.load(tmp_path / "policy_config.json")
    assert loaded.system_prompt == "Rewrite prompts, carefully."
    assert loaded.system_prompt_file is None
    assert loaded.temperature == 0.7 and loaded.lora_target_modules == ["q_proj", "v_proj"]


def test_unknown_fields_in_a_saved_config_are_rejected(tmp_path):
    (tmp_path / "policy_config.json").write_text(json.dumps({"lora_rank": 8}))
    with pytest.raises(ValueError, match="lora_rank"):
        PolicyConfig.load(tmp_path / "policy_config.json")
