"""Security: no unrestricted unpickling, no remote code unless asked, rewards loaded only from what the user names,
and nothing written outside the run folder whatever the names involved."""
from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path

import pytest

import promptloop
from promptloop.configuration import ConfigError, build, load_config
from promptloop.policy import PolicyConfig
from promptloop.rewards import load_reward
from promptloop.rl.config import TrainConfig

PACKAGE = Path(promptloop.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.AST) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else "?"


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_the_scan_sees_the_package():
    assert len(SOURCES) > 40 and any(p.name == "checkpoint.py" for p in SOURCES)


def test_every_torch_load_is_weights_only():
    offenders, found = [], 0
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and \
                    any(a.name == "load" for a in node.names):
                offenders.append(f"{path}:{node.lineno}: 'from torch import load' hides torch.load from this check")
        for call in _calls(tree):
            if _name(call.func) in ("torch.load", "torch.serialization.load"):
                found += 1
                flag = _keyword(call, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{call.lineno}")
    assert found >= 2, "the scan found no torch.load at all: is it still looking at the package?"
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_no_pickle_eval_or_exec_in_the_package():
    offenders = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal", "shelve") for n in names):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports a pickle module")
        for call in _calls(tree):
            if _name(call.func) in ("eval", "exec", "yaml.load", "yaml.unsafe_load", "numpy.load", "np.load"):
                allow = _keyword(call, "allow_pickle")
                if _name(call.func) in ("numpy.load", "np.load") and not (isinstance(allow, ast.Constant)
                                                                          and allow.value is True):
                    continue
                offenders.append(f"{path.relative_to(PACKAGE)}:{call.lineno} calls {_name(call.func)}")
    assert not offenders, offenders


def test_trust_remote_code_is_off_unless_the_user_sets_it():
    assert PolicyConfig().trust_remote_code is False
    config = build(TrainConfig, {"backbone": {"name_or_path": "x"}, "data": {"prompts": "q.txt"}})
    assert config.policy.trust_remote_code is False
    offenders = []
    for path in SOURCES:
        for call in _calls(ast.parse(path.read_text(encoding="utf-8"))):
            value = _keyword(call, "trust_remote_code")
            if value is not None and not (isinstance(value, ast.Attribute) and value.attr == "trust_remote_code"
                                          or isinstance(value, ast.Constant) and value.value is False):
                offenders.append(f"{path.relative_to(PACKAGE)}:{call.lineno}: trust_remote_code={ast.unparse(value)}")
    assert not offenders, f"trust_remote_code not taken from the user's config: {offenders}"


def test_a_saved_policy_cannot_switch_remote_code_on(tmp_path, vlm_dir, monkeypatch):
    import transformers

    from promptloop.policy import PromptPolicy
    from trainer_helpers import tiny_policy

    tiny_policy(vlm_dir).save_pretrained(tmp_path / "policy")
    saved = json.loads((tmp_path / "policy" / "policy_config.json").read_text())
    (tmp_path / "policy" / "policy_config.json").write_text(json.dumps(dict(saved, trust_remote_code=True)))
    seen = []
    original = transformers.AutoModelForImageTextToText.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", spy)
    import promptloop.policy.policy as policy_module

    monkeypatch.setattr(policy_module.AutoModelForImageTextToText, "from_pretrained", spy)
    PromptPolicy.from_pretrained(tmp_path / "policy", device="cpu", is_trainable=False)
    assert seen == [False]


# ------------------------------------------------------------------------------------------------ user rewards
@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module on sys.path that records being imported."""
    (tmp_path / "my_rewards.py").write_text(
        "import builtins\nbuiltins.__dict__.setdefault('_my_rewards_imports', []).append(1)\n"
        "def score(images, queries, metadata=None):\n    return [0.0] * len(images)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)
    import builtins

    builtins.__dict__.pop("_my_rewards_imports", None)


def test_a_custom_reward_imports_exactly_the_named_module(user_module):
    import builtins

    before = set(sys.modules)
    reward = load_reward(f"{user_module}:score")
    new = set(sys.modules) - before
    assert user_module in new and builtins._my_rewards_imports == [1]
    assert not {m for m in new if m != user_module and not m.startswith(("promptloop.", "open_clip"))}, new
    assert reward.fn.__module__ == user_module


@pytest.mark.parametrize("spec, error, match", [
    ("my_rewards:missing", ValueError, "no callable 'missing'"),
    ("my_rewards:score.__globals__", ValueError, "no callable"),
    ("no_such_module_xyz:score", ValueError, "Cannot import module 'no_such_module_xyz'"),
    ("not_registered_name", ValueError, "Unknown reward 'not_registered_name'"),
    (".my_rewards:score", TypeError, r"relative import.*\.my_rewards"),
    (":score", ValueError, "Empty module name"),
])
def test_reward_specs_load_nothing_but_what_they_name(user_module, spec, error, match):
    with pytest.raises(error, match=match):
        load_reward(spec)
    if spec.split(":")[0] != user_module:
        assert user_module not in sys.modules


def test_resuming_never_imports_the_reward_named_in_a_checkpoint(tmp_path, vlm_dir, user_module):
    from trainer_helpers import tiny_trainer

    trainer = tiny_trainer(tmp_path / "run", vlm_dir, prompts_per_step=1, group_size=2, micro_batch_size=2)
    trainer.config.reward.spec = f"{user_module}:score"  # recorded in the checkpoint's metadata only
    trainer.step = 1
    trainer.save_checkpoint()
    fresh = tiny_trainer(tmp_path / "run", vlm_dir, prompts_per_step=1, group_size=2, micro_batch_size=2)
    fresh.load_checkpoint()
    assert user_module not in sys.modules


# ------------------------------------------------------------------------------------------------------- paths
def test_training_writes_only_inside_the_run_folder(tmp_path, vlm_dir):
    from trainer_helpers import tiny_trainer

    run = tmp_path / "outer" / "run"
    (tmp_path / "outer").mkdir()
    (tmp_path / "outer" / "sibling.txt").write_text("untouched")
    trainer = tiny_trainer(run, vlm_dir, prompts_per_step=1, group_size=2, micro_batch_size=2, max_steps=2)
    trainer.config.logging.image_every = 1
    trainer.config.logging.checkpoint_every = 1
    trainer.train()
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert written - {p for p in written if run in p.parents} == {tmp_path / "outer" / "sibling.txt"}
    assert {p.relative_to(run).parts[0] for p in written if run in p.parents} == {
        "checkpoints", "images", "config.json", "metrics.jsonl", "policy"}


@pytest.mark.parametrize("label", ["../escape", "a/b", "..", "/abs", "sd\\..\\x", ".hidden", ""])
def test_evaluation_labels_that_name_folders_cannot_hold_paths(label):
    """Backbone and method labels become image folders of the evaluation output."""
    from promptloop.eval import EvalConfig

    data = {"backbones": {label: {"name_or_path": "x"}}, "methods": {"base": {"kind": "base"}},
            "prompts": {"source": "q.txt"}}
    with pytest.raises(ConfigError, match="label"):
        build(EvalConfig, data)


def test_config_keys_cannot_smuggle_fields(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("backbone: {name_or_path: x, __class__: y}\ndata: {prompts: q.txt}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TrainConfig, path)
    assert not any(f.name.startswith("_") for f in dataclasses.fields(TrainConfig))
