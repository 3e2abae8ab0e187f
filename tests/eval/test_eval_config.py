"""EvalConfig: YAML + --section.key overrides, method variants, errors before any model loads."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from promptloop.cli import main
from promptloop.configuration import ConfigError, describe, load_config
from promptloop.eval import EvalConfig
from promptloop.eval.runner import check_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("eval_*.yaml"))


def _write(tmp_path, data) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _minimal(**extra):
    data = {"prompts": {"source": "prompts.txt"}, "backbones": {"sd": {"name_or_path": "org/model"}},
            "methods": {"base": {"kind": "base"}, "loop": {"kind": "closed", "policy": "org/policy"},
                        "ablation": {"kind": "closed-noimage", "policy": "org/policy"},
                        "zero": {"kind": "untrained", "policy": "org/vlm"}}}
    data.update(extra)
    return data


def test_yaml_and_overrides_give_typed_entries_and_variants(tmp_path):
    path = _write(tmp_path, _minimal())
    config = load_config(EvalConfig, path, ["--backbones.sd.num_inference_steps", "12", "--seeds", "3,4",
                                            "--methods.loop.num_refinements=2,5", "--output.embed_images", "true"])
    assert config.backbones["sd"].num_inference_steps == 12
    assert config.seeds == [3, 4] and config.output.embed_images is True
    variants = config.method_variants()
    assert [v.label for v in variants] == ["base", "loop@2", "loop@5", "ablation", "zero"]
    assert [v.num_refinements for v in variants] == [0, 2, 5, 5, 0]
    assert [v.adapter for v in variants] == [True, True, True, True, False]  # untrained: adapter off
    assert check_config(config) == variants


def test_default_closed_loop_sweeps_one_three_five(tmp_path):
    config = load_config(EvalConfig, _write(tmp_path, _minimal()))
    assert [v.label for v in config.method_variants() if v.method == "loop"] == ["loop@1", "loop@3", "loop@5"]


def test_initial_rewrite_alone_is_a_closed_variant_with_no_refinement(tmp_path):
    config = load_config(EvalConfig, _write(tmp_path, _minimal()), ["--methods.loop.num_refinements=0,1",
                                                                    "--methods.loop.initial_rewrite", "true"])
    first, one = [v for v in config.method_variants() if v.method == "loop"]
    assert (first.label, first.num_refinements, one.label) == ("loop@0", 0, "loop@1")
    assert first.schedule.steps(10) == [0] and one.schedule.steps(10) == [0, 5]


@pytest.mark.parametrize("change,message", [
    ({"methods": {"base": {"kind": "base", "policy": "x/y"}}}, "samples without a policy"),
    ({"methods": {"base": {"kind": "base", "policy_revision": "v1"}}}, "without a policy; remove policy_revision='v1'"),
    ({"methods": {"loop": {"kind": "closed"}}}, "needs a policy"),
    ({"methods": {"loop": {"kind": "oneshot", "policy": "a/b", "num_refinements": [3]}}}, "does not refine"),
    ({"methods": {"loop": {"kind": "closed", "policy": "a/b"}}}, "baseline='base' is not a method label"),
    ({"methods": {"bad label": {"kind": "base"}}}, "may hold only"),
    ({"methods": {"base": {"kind": "sometimes"}}}, "not one of"),
    ({"backbones": {"sd": {"name_or_path": "a/b", "steps": 3}}}, "unknown key"),
    ({"seeds": [1, 1]}, "without duplicates"),
    ({"methods": {"base": {"kind": "base", "feedback_delay": 1}}}, "applies to kinds 'closed'"),
    ({"methods": {"base": {"kind": "base"}, "loop": {"kind": "closed", "policy": "a/b", "feedback_delay": -1}}},
     "feedback_delay=-1 must be >= 0"),
    ({"methods": {"base": {"kind": "base"}, "loop": {"kind": "apriori", "policy": "a/b", "initial_rewrite": True}}},
     "initial_rewrite applies to kinds 'closed'"),
    ({"methods": {"base": {"kind": "base"}, "loop": {"kind": "closed", "policy": "a/b", "num_refinements": [0]}}},
     r"ints >= 1 \(0 only with initial_rewrite: true\)"),
    ({"methods": {"base": {"kind": "base"}, "loop_nr1": {"kind": "oneshot", "policy": "a/b"},
                  "loop": {"kind": "closed", "policy": "a/b", "num_refinements": [1, 2]}}}, "share the folder"),
])
def test_bad_configs_fail_with_the_key_named(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EvalConfig, _write(tmp_path, _minimal(**change)))


def test_refinements_must_fit_the_steps_and_local_paths_must_exist(tmp_path):
    config = load_config(EvalConfig, _write(tmp_path, _minimal()), ["--backbones.sd.num_inference_steps", "4"])
    with pytest.raises(ValueError, match="method 'loop@5' on backbone 'sd'.*at least 6 sampling steps"):
        check_config(config)
    config = load_config(EvalConfig, _write(tmp_path, _minimal()), [f"--methods.loop.policy={tmp_path}/missing"])
    with pytest.raises(ValueError, match="methods.loop.policy .* does not exist"):
        check_config(config)
    config = load_config(EvalConfig, _write(tmp_path, _minimal()), ["--backbones.sd.num_inference_steps", "10",
                                                                    "--methods.loop.feedback_delay", "2"])
    with pytest.raises(ValueError, match=r"method 'loop@3' on backbone 'sd'.*decides at steps \[3, 5, 8\]"):
        check_config(config)  # before any model loads


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    path = _write(tmp_path, _minimal())
    with pytest.raises(SystemExit, match="error: .*unknown key"):
        main(["eval", str(path), "--output.colour", "red"])
    with pytest.raises(SystemExit, match="error: prompt file .*prompts.txt.* does not exist"):
        main(["eval", str(path), f"--prompts.source={tmp_path}/prompts.txt"])


def test_cli_says_what_to_do_when_a_named_set_is_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit, match=r"error: Could not load dataset 'Jialuo21/DrawBench'.*Offline\?"):
        main(["eval", str(_write(tmp_path, _minimal())), "--prompts.source", "drawbench"])
    with pytest.raises(SystemExit, match=r"Offline\?.*prompts.source for eval"):  # the key eval reads
        main(["eval", str(_write(tmp_path, _minimal())), "--prompts.source", "hf:org/queries"])


def test_every_field_has_help_text():
    from promptloop.eval.config import BackboneEntry, MethodEntry, RewardEntry

    for cls in (EvalConfig, BackboneEntry, MethodEntry, RewardEntry):
        for key, help_text, _ in describe(cls):
            assert help_text, f"{cls.__name__}.{key} has no help text"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_load(path):
    config = load_config(EvalConfig, path)
    assert config.method_variants()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_load_policies_where_training_writes_them(path):
    """A policy inside a training run's folder (runs/RUN/...) is where the trainer writes it: RUN/policy or
    RUN/checkpoints/step-N/policy (runs/NAME alone may be a policy copied there)."""
    from promptloop.rl.trainer import POLICY_DIR

    for label, method in load_config(EvalConfig, path).methods.items():
        if method.policy.startswith("runs/") and len(Path(method.policy).parts) > 2:
            assert Path(method.policy).name == POLICY_DIR, f"methods.{label}.policy {method.policy!r}"


def test_there_are_example_configs():
    assert len(CONFIGS) >= 2


def test_labels_with_a_dot_are_refused_with_a_name_to_use(tmp_path):
    for section, entry in (("backbones", {"name_or_path": "a/b"}), ("methods", {"kind": "base"}),
                           ("rewards", {"spec": "imagereward"})):
        data = _minimal()
        data[section] = {**data.get(section, {}), "sd1.5": entry}
        with pytest.raises(ConfigError, match=rf"{section}: label 'sd1.5' holds '\.'.*rename it, e.g. 'sd1-5'"):
            load_config(EvalConfig, _write(tmp_path, data))
    config = load_config(EvalConfig, _write(tmp_path, _minimal(backbones={"sd1-5": {"name_or_path": "a/b"}})),
                         ["--backbones.sd1-5.num_inference_steps", "20"])
    assert config.backbones["sd1-5"].num_inference_steps == 20


def test_list_errors_say_what_is_wrong(tmp_path):
    methods = {"base": {"kind": "base"}, "c": {"kind": "closed", "policy": "a/b", "num_refinements": 3}}
    with pytest.raises(ConfigError, match=r"methods.c.num_refinements: 3 matches none of .*expected a list, got int 3"):
        load_config(EvalConfig, _write(tmp_path, _minimal(methods=methods)))
    with pytest.raises(ConfigError, match=r"num_refinements\[1\]: expected an integer, got str 'two'"):
        load_config(EvalConfig, _write(tmp_path, _minimal()), ["--methods.loop.num_refinements", "2,two"])


def test_unknown_rewards_embedders_and_devices_fail_before_any_model_loads(tmp_path):
    base = ["--backbones.a.name_or_path", "x", "--prompts.source", "p.txt"]
    with pytest.raises(ValueError, match="Unknown text_embedder 'foo'"):
        load_config(EvalConfig, None, [*base, "--text_embedder", "foo"])
    with pytest.raises(ValueError, match="device='banana' is not a device"):
        load_config(EvalConfig, None, [*base, "--device", "banana"])
    config = load_config(EvalConfig, None, [*base, "--rewards.r.spec", "nonexistent_reward"])
    with pytest.raises(ValueError, match="rewards.r.spec: Unknown reward 'nonexistent_reward'"):
        check_config(config)
