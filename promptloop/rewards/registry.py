"""Rewards by name: ``load_reward("imagereward")``, ``load_reward("imagereward:1.0,aesthetic:0.1")`` or
``load_reward("my_module:my_function")``.

Spec grammar: a comma-separated list of ``target[:weight]``; ``target`` is a registered name or ``module:function``;
``weight`` is a number. One bare target loads that reward; anything with a weight or a comma is a composite.
"""
from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from .base import Reward

RewardFactory = Callable[..., Reward]  # (device=..., dtype=..., **kwargs) -> Reward, loading its model once

_REGISTRY: dict[str, RewardFactory] = {}
_PLUGIN_MODULES = {"miniworld-": "promptloop.miniworld.rewards"}
"""Name prefix -> module that registers those rewards when imported (imported on first use of such a name)."""


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator registering a reward factory (usually a ``Reward`` subclass) under ``name``."""

    def decorator(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"A reward named {name!r} is already registered ({_REGISTRY[name]}).")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_rewards() -> list[str]:
    """Names ``load_reward`` accepts (besides ``module:function``), plugin rewards included."""
    for module in _PLUGIN_MODULES.values():
        importlib.import_module(module)
    return sorted(_REGISTRY)


def _parse_weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def check_weight(weight: Any, name: str) -> float:
    """``weight`` (of component ``name``) as a float; a ``ValueError`` when it is not a finite number."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"The weight of reward {name!r} is {weight!r}; it must be a finite number.")
    return value


def parse_reward_spec(spec: str) -> tuple[list[tuple[str, float]], bool]:
    """``(targets with weights, is_composite)`` for a spec string; see the module docstring for the grammar."""
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"A reward spec must be a non-empty string; got {spec!r}.")
    parts = [p.strip() for p in spec.split(",")]
    components, weighted = [], False
    for part in parts:
        target, _, last = part.rpartition(":")
        weight = _parse_weight(last) if target else None
        if weight is None:
            target, weight = part, 1.0
        else:
            weighted = True
        if not target:
            raise ValueError(f"Empty reward name in spec {spec!r}.")
        components.append((target, check_weight(weight, target)))
    return components, weighted or len(parts) > 1


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _required_positional(fn: Callable) -> int:
    params = inspect.signature(fn).parameters.values()
    return sum(p.kind in _POSITIONAL and p.default is inspect.Parameter.empty for p in params)


def _metadata_passing(fn: Callable, name: str) -> str | None:
    """How scorer ``fn`` takes the metadata: ``"positional"`` (a third positional parameter that is required or
    named ``metadata``; else ``*args`` without a ``metadata`` keyword), ``"keyword"`` (a ``metadata`` parameter
    further on) or None: ``fn(images, queries)``. A callable whose signature cannot be read gets it positionally;
    one requiring more than three positional arguments is a ``TypeError``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins and C extensions
        return "positional"
    positional = [p for p in params.values() if p.kind in _POSITIONAL]
    required = sum(p.default is inspect.Parameter.empty for p in positional)
    if required > 3:
        raise TypeError(f"{name} must be a scorer taking (images, queries[, metadata]); it requires {required} "
                        "positional arguments.")
    if len(positional) > 2 and (positional[2].default is inspect.Parameter.empty or positional[2].name == "metadata"):
        return "positional"
    if "metadata" in params and params["metadata"].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                            inspect.Parameter.KEYWORD_ONLY):
        return "keyword"
    if len(positional) <= 2 and any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values()):
        return "positional"
    return None


class CallableReward(Reward):
    """A user scorer ``fn(images, queries[, metadata]) -> scores | RewardOutput`` behind the reward contract; the
    metadata is passed only when ``fn`` takes it (see :func:`_metadata_passing`, decided once here)."""

    def __init__(self, fn: Callable[..., Any], name: str, on_nonfinite: str = "warn"):
        super().__init__(on_nonfinite=on_nonfinite)
        self.fn = fn
        self.name = name
        self.metadata_passing = _metadata_passing(fn, name)

    def score_batch(self, images, queries, metadata):
        if self.metadata_passing == "positional":
            return self.fn(images, queries, metadata)
        if self.metadata_passing == "keyword":
            return self.fn(images, queries, metadata=metadata)
        return self.fn(images, queries)


def _load_callable(target: str, device, dtype, kwargs: dict[str, Any]) -> Reward:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"Cannot import module {module_name!r} of reward {target!r}: {exc}. Make it importable "
                         "(installed or on sys.path).") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"Module {module_name!r} has no callable {attr!r} (reward {target!r}).")
    required = _required_positional(fn)
    if required >= 2:
        if kwargs:
            raise ValueError(f"{target} is a scorer (it takes images, queries); keyword arguments {sorted(kwargs)} "
                             "are only for factories.")
        return CallableReward(fn, target)
    if required == 0:
        accepted = inspect.signature(fn).parameters
        extra = {k: v for k, v in (("device", device), ("dtype", dtype)) if k in accepted}
        made = fn(**extra, **kwargs)
        if isinstance(made, Reward):
            return made
        if callable(made):
            return CallableReward(made, target)
        raise TypeError(f"Factory {target} returned {type(made).__name__}; it must return a scorer "
                        "(images, queries[, metadata]) -> scores.")
    raise TypeError(f"{target} must be a scorer taking (images, queries[, metadata]) or a factory taking no "
                    f"required positional arguments; it takes {required}.")


def _registered(target: str) -> bool:
    """Whether ``target`` names a registered reward (importing the plugin module its prefix names, if any)."""
    for prefix, module in _PLUGIN_MODULES.items():
        if target.startswith(prefix) and target not in _REGISTRY:
            importlib.import_module(module)
    return target in _REGISTRY


def _unknown(target: str) -> ValueError:
    return ValueError(f"Unknown reward {target!r}. Known rewards: {', '.join(available_rewards())}; or give a user "
                      "callable as 'module:function'.")


def check_reward_spec(spec: str) -> None:
    """Raise ``ValueError`` for a spec naming a reward that is neither registered nor a 'module:function' (no model
    loads: for checks before a run starts)."""
    for target, _ in parse_reward_spec(spec)[0]:
        if not _registered(target) and ":" not in target:
            raise _unknown(target)


def _load_one(target: str, device, dtype, kwargs: dict[str, Any]) -> Reward:
    if _registered(target):
        return _REGISTRY[target](device=device, dtype=dtype, **kwargs)
    if ":" in target:
        return _load_callable(target, device, dtype, kwargs)
    raise _unknown(target)


def load_reward(spec: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                **kwargs: Any) -> Reward:
    """Load a reward from a spec string; each model is loaded once on ``device`` in ``dtype``.

    For one reward, ``kwargs`` go to its factory (e.g. ``path=``, ``cache_dir=``, ``download=``). For a composite,
    each keyword is a component name mapping to that component's kwargs:
    ``load_reward("imagereward:1,aesthetic:0.1", aesthetic={"path": "/weights/aesthetic"})``.
    """
    components, composite = parse_reward_spec(spec)
    if not composite:
        return _load_one(components[0][0], device, dtype, kwargs)
    from .composite import CompositeReward

    names = [target for target, _ in components]
    unknown = set(kwargs) - set(names)
    if unknown or not all(isinstance(v, dict) for v in kwargs.values()):
        raise ValueError(f"For a composite spec, keyword arguments must be component names ({names}) mapping to "
                         f"dicts of that component's arguments; got {sorted(kwargs)}.")
    rewards = [(_load_one(t, device, dtype, dict(kwargs.get(t, {}))), w) for t, w in components]
    return CompositeReward([(t, r, w) for (t, _), (r, w) in zip(components, rewards)])


__all__ = ["CallableReward", "RewardFactory", "available_rewards", "check_reward_spec", "check_weight",
           "load_reward", "parse_reward_spec", "register_reward"]
