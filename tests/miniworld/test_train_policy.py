"""The shipped GRPO policy's recipe (``train_policy``): it trains, exports next to its warm start, and loads."""
import json
import shutil

import pytest

from promptloop.miniworld.backbone import SHIPPED_BACKBONE_A
from promptloop.miniworld.demo import EDIT_WARM_START, QUICK, SHIPPED_TRAINED_POLICY, train_config
from promptloop.miniworld.rewards import DEFAULT_PREFERENCE_DIR
from promptloop.miniworld.train_policy import export_policy, main, parse_args
from promptloop.policy import PromptPolicy


def test_a_tiny_run_exports_a_policy_that_names_its_warm_start_relatively(tmp_path):
    bundle = tmp_path / "assets"
    shutil.copytree(EDIT_WARM_START, bundle / "policy_edit")
    shutil.copytree(SHIPPED_BACKBONE_A, bundle / "backbone_a")
    shutil.copytree(DEFAULT_PREFERENCE_DIR, bundle / "preference")
    dest = main(["--out", str(tmp_path / "run"), "--dest", str(bundle / "policy_grpo"), "--warm-start",
                 str(bundle / "policy_edit"), "--steps", "2", "--checkpoint-every", "1", "--tiny",
                 "--backbone", str(bundle / "backbone_a"), "--preference", str(bundle / "preference"),
                 "--refinements", "3", "--keep-query-words", "--no-feedback"])
    config = json.loads((tmp_path / "run" / "train" / "config.json").read_text())
    assert config["grpo"]["num_refinements"] == 3 and config["policy"]["keep_query_words"] is True
    assert config["grpo"]["feedback"] is False
    assert config["backbone"]["name_or_path"] == str(bundle / "backbone_a")
    assert config["reward"]["kwargs"] == {"path": str(bundle / "preference")}
    saved = json.loads((dest / "policy_config.json").read_text())
    assert saved["model_name_or_path"] == "../policy_edit" and saved["keep_query_words"] is True
    assert json.loads((dest / "adapter_config.json").read_text())["base_model_name_or_path"] == "../policy_edit"
    assert (tmp_path / "run" / "train" / "completions.jsonl").is_file()
    moved = tmp_path / "moved"
    shutil.move(bundle, moved)
    policy = PromptPolicy.from_pretrained(moved / "policy_grpo", device="cpu", is_trainable=False)
    assert policy.has_adapter and policy.config.model_name_or_path == str((moved / "policy_edit").resolve())


def test_export_needs_a_saved_policy_and_a_real_warm_start(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="policy_config.json"):
        export_policy(tmp_path, tmp_path / "dest", EDIT_WARM_START)
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--dest", str(tmp_path / "d"), "--warm-start", str(tmp_path / "none")])
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--dest", str(tmp_path / "d"), "--refinements", "0"])
    assert "--refinements must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag, message", [("--backbone", "holds no model_index.json"),
                                           ("--preference", "holds no config.json")])
def test_a_missing_backbone_or_reward_model_is_refused_before_training(tmp_path, capsys, flag, message):
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--dest", str(tmp_path / "d"), flag, str(tmp_path)])
    assert f"{flag} {tmp_path} {message}" in capsys.readouterr().err


def test_the_shipped_trained_policy_is_an_adapter_on_the_shipped_warm_start():
    policy = PromptPolicy.from_pretrained(SHIPPED_TRAINED_POLICY, device="cpu", is_trainable=False)
    assert policy.config.model_name_or_path == str(EDIT_WARM_START.resolve())
    assert policy.has_adapter and policy.config.mode == "closed"
    lora_b = [p for name, p in policy.model.named_parameters() if "lora_B" in name]
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 1e-3  # trained, not a fresh adapter
    assert not any(p.name.endswith((".bin", ".pt")) for p in SHIPPED_TRAINED_POLICY.iterdir())


def test_the_recipe_shows_the_preview_unless_told_not_to(tmp_path):
    assert parse_args(["--out", str(tmp_path), "--dest", str(tmp_path / "d")]).feedback is True
    assert train_config(tmp_path, tmp_path / "q.txt", QUICK).grpo.feedback is True
    assert train_config(tmp_path, tmp_path / "q.txt", QUICK, feedback=False).grpo.feedback is False


def test_the_trainer_loads_its_reward_with_the_configured_kwargs(tmp_path):
    from promptloop.rl.trainer import GRPOTrainer

    queries = tmp_path / "queries.txt"
    queries.write_text("red circle\n", encoding="utf-8")
    config = train_config(tmp_path, queries, QUICK, preference=tmp_path / "no_model_here")
    assert config.reward.kwargs == {"path": str(tmp_path / "no_model_here")}
    with pytest.raises(FileNotFoundError, match="no_model_here"):
        GRPOTrainer.from_config(config)
