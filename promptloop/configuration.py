"""Nested dataclass configs from YAML files and ``--section.key value`` command-line overrides.

Every field carries its help text in ``field(metadata={"help": ...})``; ``metadata={"required": True}`` marks a
field whose default (e.g. ``""``) the section rejects, so that ``--help`` shows it as required. Unknown keys, wrong
types and invalid values fail before any model is loaded, with a message that names the key.

A command-line value is text read as its field's type: ``true``/``false`` for a bool, ``1,3,5`` for a list; for an
optional field ``null``, ``None`` or ``~`` mean none (as YAML's null); for a field that is a string or a list
(``Union[str, list[str]]``), text with a comma is the list; under an untyped mapping (``dict[str, Any]``, e.g.
``--reward.kwargs.download false``) it is read as an unquoted YAML scalar (``false``, ``4``, ``null``; other text
stays text). A YAML value keeps its YAML type.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


class _Text(str):
    """A command-line value: text still to be read as its field's type (a YAML value keeps its own type)."""


_NULL_TEXT = ("null", "None", "~")
"""Command-line spellings of none for an optional field."""
_LISTS = (list, tuple, Sequence)


def _kind(value: Any) -> str:
    return "str" if isinstance(value, str) else type(value).__name__


def _yaml_scalar(text: str) -> Any:
    """``text`` as the plain (unquoted) YAML scalar it spells: false, 4, 0.5, null; other text stays text."""
    text = str(text)
    if not text:
        return ""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(yaml.ScalarNode(loader.resolve(yaml.ScalarNode, text, (True, False)), text))
    except (yaml.YAMLError, ValueError):  # e.g. a date that does not exist, an int past Python's digit limit
        return text
    finally:
        loader.dispose()


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and for strings, convert) ``value`` against ``annotation``; command-line text (:class:`_Text`) becomes
    plain values (see the module docstring)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        if isinstance(value, dict):
            return {k: _coerce(v, Any, f"{key}.{k}") for k, v in value.items()}
        return _yaml_scalar(value) if isinstance(value, _Text) else value
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or isinstance(value, _Text) and value in _NULL_TEXT):
            return None
        arms = [a for a in args if a is not type(None)]
        if isinstance(value, _Text) and "," in value:  # "q_proj,v_proj" for Union[str, list[str]] is the list
            arms.sort(key=lambda a: typing.get_origin(a) not in _LISTS)
        errors = []
        for arg in arms:
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {annotation} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return args[args.index(value)]
    if origin in _LISTS:
        if isinstance(value, str):
            value = [_Text(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_kind(value)} {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_kind(value)}")
        inner = args[1] if args else Any
        if dataclasses.is_dataclass(inner):  # label -> entry: the owning section checks the labels, then builds
            return dict(value)
        return {k: _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {_kind(value)}")
        return build(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation in (int, float):
        return _number(value, annotation, key)
    if annotation is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {_kind(value)} {value!r}")
    return value


def _number(value: Any, kind: type, key: str) -> Any:
    """``value`` as an int (ints or integer strings only) or a finite float (ints, floats or numeric strings)."""
    what = "an integer" if kind is int else "a finite number"
    accepted = (int,) if kind is int else (int, float)
    if (isinstance(value, accepted) and not isinstance(value, bool)) or isinstance(value, str):
        try:
            number = kind(value)
        except (ValueError, OverflowError):  # "abc", "1.5" for an int, 10**400 for a float
            pass
        else:
            if kind is int or math.isfinite(number):
                return number
    raise ConfigError(f"{key}: expected {what}, got {_kind(value)} {value!r}")


def build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a (nested) mapping; unknown keys are errors naming the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {_kind(data)}")
    fields = _field_types(cls)
    data = {k.replace("-", "_") if isinstance(k, str) and k not in fields and k.replace("-", "_") in fields else k: v
            for k, v in data.items()}  # --grpo.group-size means group_size
    unknown = sorted(f"{prefix}{k}" for k in set(data) - set(fields))  # YAML keys may be numbers, None, ...
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; valid keys here: {[prefix + k for k in fields]}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"missing required key(s) {[prefix + k for k in missing]}")
    kwargs = {k: _coerce(v, fields[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["--grpo.group_size", "8", "--policy.lora_r=16"]`` -> nested dict of command-line text (:class:`_Text`,
    a ``str``), read as the fields' types by :func:`build`."""
    nested: dict[str, Any] = {}
    items = list(overrides)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise ConfigError(f"override {item!r} must look like --section.key VALUE or --section.key=VALUE")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise ConfigError(f"override --{key} has no value")
            value = items[i + 1]
            i += 1
        i += 1
        node = nested
        parts = key.split(".")  # hyphens stay: labels may hold them; build() accepts --key-name for key_name
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key}: {part} is not a section")
        node[parts[-1]] = _Text(value)
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> T:
    """YAML file (optional) + overrides -> a validated ``cls`` instance."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        misplaced = [o for o in overrides if not o.startswith("--") and Path(o).suffix in (".yaml", ".yml")]
        if misplaced and not (file.is_file() and file.suffix in (".yaml", ".yml")):  # CONFIG after an override
            raise ConfigError(f"{str(path)!r} is not a config file and {misplaced[0]!r} comes after an override: "
                              f"put the config file first: promptloop train|eval {misplaced[0]} --section.key value")
        if not file.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8-sig")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: {e}") from e
        except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an integer beyond Python's digit limit
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (section: {{key: value}}), "
                              f"not a {type(data).__name__}")
    return build(cls, merge(data, parse_overrides(overrides)))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, help, default) for every field, recursively: for ``--help`` and the docs. A required field's default
    (no default, or ``metadata={"required": True}``) is ``dataclasses.MISSING``; the fields of a
    ``dict[str, <dataclass>]`` section follow it as ``section.<label>.field``."""
    rows = []
    for f in dataclasses.fields(cls):
        annotation = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(annotation):
            rows += describe(annotation, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if f.metadata.get("required"):
            default = dataclasses.MISSING
        rows.append((prefix + f.name, f.metadata.get("help", ""), default))
        entry = typing.get_args(annotation)[1] if typing.get_origin(annotation) is dict else None
        if dataclasses.is_dataclass(entry):
            rows += describe(entry, prefix + f.name + ".<label>.")
    return rows


def _shown_default(default: Any) -> str:
    import json

    if default is dataclasses.MISSING:
        return "required"
    return json.dumps(default, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o))


def keys_help(cls: type, width: int = 100) -> str:
    """Every key of ``cls`` with its default and help text, as ``promptloop train/eval --help`` lists them."""
    import textwrap

    lines = ["config keys (YAML sections; override any with --section.key VALUE):"]
    for key, help_text, default in describe(cls):
        shown = _shown_default(default)
        lines.append(f"  --{key}  [{shown if shown == 'required' else 'default: ' + shown}]")
        lines += textwrap.wrap(help_text, width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                               break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines)


def config_reference() -> str:
    """``docs/configuration.md``: every key of ``promptloop train`` and ``promptloop eval`` configs as markdown
    tables (``python -m promptloop.configuration > docs/configuration.md`` regenerates it)."""
    from promptloop.eval.config import EvalConfig
    from promptloop.rl.config import TrainConfig

    parts = ["# Configuration reference", "",
             "Generated from the config dataclasses (`python -m promptloop.configuration > docs/configuration.md`); "
             "the same text is printed by `promptloop train --help` and `promptloop eval --help`. YAML sections "
             "map to `--section.key VALUE` overrides; `--print-config` prints a resolved config.", ""]
    for title, cls in (("`promptloop train` (`promptloop.rl.config.TrainConfig`)", TrainConfig),
                       ("`promptloop eval` (`promptloop.eval.config.EvalConfig`)", EvalConfig)):
        parts += [f"## {title}", "", "| key | default | meaning |", "|---|---|---|"]
        for key, help_text, default in describe(cls):
            default_cell, help_cell = (text.replace("|", "\\|") for text in (_shown_default(default), help_text))
            parts.append(f"| `{key}` | `{default_cell}` | {help_cell} |")
        parts.append("")
    return "\n".join(parts)


def dump_config(config: Any) -> str:
    """``config`` as YAML that :func:`load_config` reads back to an equal config (every key, defaults included)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True, default_flow_style=False)


if __name__ == "__main__":
    print(config_reference(), end="")
