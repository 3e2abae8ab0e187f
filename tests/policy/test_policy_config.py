import json
from pathlib import Path

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
        ({"system_prompt": "x", "system_prompt_mode": "loop"}, "system_prompt_mode"),
        ({"system_prompts": {"loop": "x"}}, "system_prompts"),
        ({"system_prompts": {"apriori": " "}}, "system_prompts"),
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


def test_the_mode_of_a_system_prompt_is_recorded_and_saved(tmp_path):
    config = PolicyConfig(mode="oneshot", system_prompt="Rewrite it once.")
    assert config.system_prompt_mode == "oneshot" and PolicyConfig().system_prompt_mode is None
    config.mode = "closed"  # a policy switched to another mode (pipeline.policy_mode) keeps it
    config.save(tmp_path / "policy_config.json")
    loaded = PolicyConfig.load(tmp_path / "policy_config.json")
    assert loaded == config and loaded.system_prompt_for("oneshot") == "Rewrite it once."
    assert loaded.system_prompt_for("closed") is None


def test_a_config_saved_before_the_mode_was_recorded_reads_its_prompt_as_its_mode(tmp_path):
    """A policy saved before system prompts had modes: its prompt stays its own mode's, other modes get defaults.
    The shipped mini-world policy records its prompt's mode and the mini world's prompts of the other modes."""
    from promptloop.miniworld.policy_warmstart import MINIWORLD_SYSTEM_PROMPTS

    shipped = Path(__file__).parents[2] / "promptloop/miniworld/assets/policy_grpo/policy_config.json"
    data = json.loads(shipped.read_text(encoding="utf-8"))
    older = {k: v for k, v in data.items() if k not in ("system_prompt_mode", "system_prompts")}
    (tmp_path / "policy_config.json").write_text(json.dumps(older), encoding="utf-8")
    config = PolicyConfig.load(tmp_path / "policy_config.json")
    assert config.system_prompt_mode == "closed"
    assert config.system_prompt_for("closed") == data["system_prompt"]
    assert config.system_prompt_for("apriori") is None and config.system_prompt_for("oneshot") is None
    current = PolicyConfig.load(shipped)
    assert {mode: current.system_prompt_for(mode) for mode in MINIWORLD_SYSTEM_PROMPTS} == MINIWORLD_SYSTEM_PROMPTS