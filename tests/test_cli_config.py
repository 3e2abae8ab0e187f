"""``promptloop train|eval``: ``--help`` lists every config key with its help text, ``--print-config`` prints YAML
that loads back to the same config (contracts: no model is loaded)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from promptloop.cli import main
from promptloop.configuration import describe, load_config
from promptloop.eval.config import EvalConfig
from promptloop.rl.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CASES = [("train", TrainConfig, CONFIGS / "sdxl_imagereward.yaml", ["--grpo.group_size", "4"]),
         ("train", TrainConfig, CONFIGS / "miniworld_grpo.yaml", ["--logging.push_to_hub=true",
                                                                   "--logging.hub_model_id", "me/run"])] + [
    ("eval", EvalConfig, path, ["--prompts.limit", "3"]) for path in sorted(CONFIGS.glob("eval_*.yaml"))]


@pytest.mark.parametrize("command, cls, path, overrides", CASES, ids=[f"{c[0]}-{c[2].stem}" for c in CASES])
def test_print_config_round_trips(command, cls, path, overrides, capsys, tmp_path):
    assert main([command, str(path), "--print-config", *overrides]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    expected = load_config(cls, path, overrides)
    assert load_config(cls, printed) == expected
    assert load_config(cls, path) != expected, "the override must show in the printed config"


def test_print_config_reports_bad_keys_like_a_run(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown key\(s\) \['grpo.groupsize'\]"):
        main(["train", str(CONFIGS / "sdxl_imagereward.yaml"), "--print-config", "--grpo.groupsize", "4"])


@pytest.mark.parametrize("command, cls", [("train", TrainConfig), ("eval", EvalConfig)])
def test_help_lists_every_key_with_its_help(command, cls, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help is wrapped
    rows = describe(cls)
    assert len(rows) > 30
    for key, help_text, _ in rows:
        assert f"--{key} [" in text, key
        assert " ".join(help_text.split()) in text, key
    assert "--backbones.<label>.num_inference_steps" in text or command == "train"


def test_top_level_help_does_not_import_torch():
    code = ("import sys; from promptloop.cli import build_parser; build_parser().format_help(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_overrides_accept_hyphens_in_keys_and_keep_them_in_labels(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("prompts: {source: p.txt}\nbackbones: {tiny-sd: {name_or_path: x}, sd_15: {name_or_path: y}}\n")
    loaded = load_config(EvalConfig, config, ["--backbones.tiny-sd.num-inference-steps", "5",
                                              "--backbones.sd_15.batch_size", "2"])
    assert sorted(loaded.backbones) == ["sd_15", "tiny-sd"]
    assert loaded.backbones["tiny-sd"].num_inference_steps == 5 and loaded.backbones["sd_15"].batch_size == 2
    train = load_config(TrainConfig, CONFIGS / "sdxl_imagereward.yaml", ["--grpo.group-size", "4"])
    assert train.grpo.group_size == 4


def test_the_configuration_reference_in_docs_is_up_to_date():
    from promptloop.configuration import config_reference

    written = (CONFIGS.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert written == config_reference(), ("docs/configuration.md is stale: regenerate it with "
                                           "`python -m promptloop.configuration > docs/configuration.md`")
    for cls in (TrainConfig, EvalConfig):
        assert all(f"| `{key}` |" in written for key, _, _ in describe(cls))


def test_env_and_version_for_bug_reports(capsys):
    import torch

    import promptloop
    from promptloop.environment import LIBRARIES

    assert main(["env"]) == 0
    lines = dict(line[2:].split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["promptloop"] == promptloop.__version__
    assert set(LIBRARIES) <= set(lines) and torch.__version__.startswith(lines["torch"])
    cuda = torch.cuda.is_available()
    assert lines["gpus"].startswith(f"{torch.cuda.device_count()}: ") if cuda else lines["gpus"] == "none (CPU only)"
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"promptloop {promptloop.__version__}"
