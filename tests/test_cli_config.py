"""``promptloop train|eval``: ``--help`` lists every config key with its help text, ``--print-config`` prints YAML
that loads back to the same config (contracts: no model is loaded)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from promptloop.cli import main
from promptloop.configuration import ConfigError, describe, dump_config, keys_help, load_config
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


@pytest.mark.parametrize("null", ["null", "None", "~"])
def test_null_words_on_the_command_line_set_optional_fields_to_none(null):
    given = {"backbone.guidance_scale": "7.5", "backbone.height": "512", "backbone.revision": "main",
             "data.eval_prompts": "q.txt", "logging.hub_private_repo": "true", "reward.timeout_s": "30"}
    overrides = [a for key, value in given.items() for a in (f"--{key}", value)]
    before = load_config(TrainConfig, CONFIGS / "miniworld_grpo.yaml", overrides)
    after = load_config(TrainConfig, CONFIGS / "miniworld_grpo.yaml",
                        [*overrides, *(a for key in given for a in (f"--{key}", null))])
    for key in given:
        section, name = key.split(".")
        assert getattr(getattr(before, section), name) is not None, key
        assert getattr(getattr(after, section), name) is None, key
    plain = load_config(TrainConfig, CONFIGS / "miniworld_grpo.yaml", ["--logging.project", null])
    assert plain.logging.project == null  # a field that cannot be none keeps the text
    evaluate = load_config(EvalConfig, CONFIGS / "eval_miniworld_ladder.yaml", ["--baseline", null,
                                                                                 "--prompts.limit", null])
    assert evaluate.baseline is None and evaluate.prompts.limit is None


def test_a_quoted_null_in_yaml_stays_a_string(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("backbone: {name_or_path: x, revision: 'null'}\ndata: {prompts: q.txt}\n")
    assert load_config(TrainConfig, path).backbone.revision == "null"


def test_comma_text_is_the_list_of_a_string_or_list_field(tmp_path):
    def modules(*overrides, path=CONFIGS / "miniworld_grpo.yaml"):
        return load_config(TrainConfig, path, overrides).policy.lora_target_modules

    assert modules("--policy.lora_target_modules", "q_proj,v_proj") == ["q_proj", "v_proj"]
    assert modules("--policy.lora_target_modules", " q_proj , v_proj,") == ["q_proj", "v_proj"]
    assert modules("--policy.lora_target_modules", r".*\.(q_proj|v_proj)") == r".*\.(q_proj|v_proj)"
    assert modules("--policy.lora_target_modules", "q_proj") == "q_proj"
    path = tmp_path / "train.yaml"
    path.write_text("backbone: {name_or_path: x}\ndata: {prompts: q.txt}\npolicy: {lora_target_modules: 'a,b'}\n")
    assert modules(path=path) == "a,b"  # a YAML string keeps its type


def test_untyped_mapping_values_on_the_command_line_are_yaml_scalars(tmp_path):
    overrides = ["--reward.kwargs.download", "false", "--reward.kwargs.batch_size", "4", "--reward.kwargs.scale",
                 "0.5", "--reward.kwargs.device", "null", "--reward.kwargs.path", "/weights/ir", "--reward.kwargs.note",
                 "a #b", "--reward.kwargs.flow", "[1]", "--reward.kwargs.empty", "", "--reward.kwargs.day",
                 "2024-13-45", "--reward.kwargs.aesthetic.path", "/weights/aes"]
    config = load_config(TrainConfig, CONFIGS / "miniworld_grpo.yaml", overrides)
    assert config.reward.kwargs == {"download": False, "batch_size": 4, "scale": 0.5, "device": None,
                                    "path": "/weights/ir", "note": "a #b", "flow": "[1]", "empty": "",
                                    "day": "2024-13-45", "aesthetic": {"path": "/weights/aes"}}
    printed = tmp_path / "printed.yaml"
    printed.write_text(dump_config(config))  # plain values only: the YAML loads back to the same config
    assert load_config(TrainConfig, printed) == config
    path = tmp_path / "train.yaml"
    path.write_text("backbone: {name_or_path: x}\ndata: {prompts: q.txt}\nreward: {kwargs: {download: 'false'}}\n")
    assert load_config(TrainConfig, path).reward.kwargs == {"download": "false"}  # YAML keeps its type


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_config_file_after_the_overrides_says_to_put_it_first(command):
    path = str(CONFIGS / ("miniworld_grpo.yaml" if command == "train" else "eval_miniworld_ladder.yaml"))
    override = "--grpo.group_size" if command == "train" else "--prompts.limit"
    for extra in ([], ["--print-config"]):
        with pytest.raises(SystemExit, match=r"'8' is not a config file .*put the config file first: promptloop "
                                             rf"train\|eval {path} --section.key value"):
            main([command, override, "8", path, *extra])
    with pytest.raises(ConfigError, match="config file 'missing.yaml' does not exist"):
        load_config(TrainConfig, "missing.yaml", ["--grpo.group_size", "8"])


def test_help_shows_required_keys_as_required():
    train, evaluate = keys_help(TrainConfig), keys_help(EvalConfig)
    for key in ("backbone.name_or_path", "data.prompts"):
        assert f"--{key}  [required]" in train, key
    for key in ("prompts.source", "backbones.<label>.name_or_path", "rewards.<label>.spec"):
        assert f"--{key}  [required]" in evaluate, key
    assert '[default: ""]' not in train + evaluate


@pytest.mark.parametrize("cls", [TrainConfig, EvalConfig])
def test_fields_marked_required_are_those_whose_section_rejects_the_empty_default(cls):
    def sections(owner):
        for f in dataclasses.fields(owner):
            for annotation in (hints := typing.get_type_hints(owner))[f.name], *typing.get_args(hints[f.name]):
                if dataclasses.is_dataclass(annotation):
                    yield annotation
                    yield from sections(annotation)

    checked = 0
    for section in set(sections(cls)):
        marked = {f.name: "x" for f in dataclasses.fields(section) if f.metadata.get("required")}
        section(**marked)
        for f in dataclasses.fields(section):
            if f.default == "":
                checked += 1
                try:
                    section(**{**marked, f.name: ""})
                except ValueError:
                    assert f.name in marked, f"{section.__name__}.{f.name} rejects '' but is not marked required"
                else:
                    assert f.name not in marked, f"{section.__name__}.{f.name} is marked required but accepts ''"
    assert checked >= 2
