"""The shipped GRPO policy's recipe (``train_policy``): it trains, exports next to its warm start, and loads."""
import json
import shutil

import pytest
import torch

from promptloop.miniworld.demo import EDIT_WARM_START, SHIPPED_TRAINED_POLICY
from promptloop.miniworld.train_policy import export_policy, main, parse_args
from promptloop.policy import PromptPolicy


def test_a_tiny_run_exports_a_policy_that_names_its_warm_start_relatively(tmp_path):
    bundle = tmp_path / "assets"
    shutil.copytree(EDIT_WARM_START, bundle / "policy_edit")
    dest = main(["--out", str(tmp_path / "run"), "--dest", str(bundle / "policy_grpo"), "--warm-start",
                 str(bundle / "policy_edit"), "--steps", "2", "--checkpoint-every", "1", "--tiny"])
    saved = json.loads((dest / "policy_config.json").read_text())
    assert saved["model_name_or_path"] == "../policy_edit"
    assert json.loads((dest / "adapter_config.json").read_text())["base_model_name_or_path"] == "../policy_edit"
    assert (tmp_path / "run" / "train" / "completions.jsonl").is_file()
    moved = tmp_path / "moved"
    shutil.move(bundle, moved)
    policy = PromptPolicy.from_pretrained(moved / "policy_grpo", device="cpu", is_trainable=False)
    assert policy.has_adapter and policy.config.model_name_or_path == str((moved / "policy_edit").resolve())


def test_export_needs_a_saved_policy_and_a_real_warm_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="policy_config.json"):
        export_policy(tmp_path, tmp_path / "dest", EDIT_WARM_START)
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--dest", str(tmp_path / "d"), "--warm-start", str(tmp_path / "none")])


def test_the_shipped_trained_policy_is_an_adapter_on_the_shipped_warm_start():
    policy = PromptPolicy.from_pretrained(SHIPPED_TRAINED_POLICY, device="cpu", is_trainable=False)
    assert policy.config.model_name_or_path == str(EDIT_WARM_START.resolve())
    assert policy.has_adapter and policy.config.mode == "closed"
    lora_b = [p for name, p in policy.model.named_parameters() if "lora_B" in name]
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 1e-3  # trained, not a fresh adapter
    assert not any(p.name.endswith((".bin", ".pt")) for p in SHIPPED_TRAINED_POLICY.iterdir())
