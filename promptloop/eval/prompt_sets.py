"""Evaluation prompt sets: files, named public benchmarks and sets registered by other packages.

``load_prompt_set(source)`` accepts, in this order:
- a registered name (:func:`register_prompt_set`), e.g. the mini world's ``miniworld:heldout``. Names
  ``NAMESPACE:...`` whose namespace is in ``PLUGIN_NAMESPACES`` import that package first, so that it can register
  its sets on import (``promptloop.miniworld.queries`` registers the ``miniworld:*`` sets);
- a named public set (``PUBLIC_SETS``): ``pickapic-v2``, ``drawbench``, ``partiprompts``, ``hpdv2`` (and
  ``hpdv2:anime`` / ``hpdv2:concept-art`` / ``hpdv2:paintings`` / ``hpdv2:photo``), fetched from the Hugging Face
  hub (needs network and the ``datasets`` package; a clear error says what to do offline);
- anything :func:`promptloop.rl.data.load_queries` reads: a .txt (one per line), .jsonl / .csv (``column``) file,
  or ``hf:DATASET[:SPLIT]``.
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from promptloop.rl.data import load_queries

PromptSetLoader = Callable[[], list[str]]
"""``loader() -> queries``: called each time the set is loaded; must work offline for offline sets."""

PLUGIN_NAMESPACES = {"miniworld": "promptloop.miniworld.queries"}
"""Name prefix -> package imported (once) before looking the name up, so that it can register its sets."""

_REGISTRY: dict[str, PromptSetLoader] = {}


def register_prompt_set(name: str, loader: PromptSetLoader) -> None:
    """Make ``load_prompt_set(name)`` call ``loader()``. Registering the same name twice with another loader is an
    error (re-registering the same loader is a no-op, so modules can be re-imported)."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"A prompt set name must be a non-empty string without surrounding spaces, got {name!r}.")
    if not callable(loader):
        raise TypeError(f"loader must be callable () -> list[str], got {type(loader).__name__}.")
    if name in PUBLIC_SETS:
        raise ValueError(f"{name!r} is a built-in public prompt set; register under another name.")
    if name in _REGISTRY and _REGISTRY[name] is not loader:
        raise ValueError(f"A prompt set named {name!r} is already registered ({_REGISTRY[name]}).")
    _REGISTRY[name] = loader


def registered_prompt_sets() -> list[str]:
    """Names registered with :func:`register_prompt_set` (plugins not yet imported are not listed)."""
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class PublicSet:
    """Where a public benchmark's prompts live on the Hugging Face hub."""

    repo: str
    description: str
    split: Optional[str] = None
    column: Optional[str] = None
    """``datasets`` split and column, for sets loaded with ``datasets.load_dataset``."""
    files: tuple[str, ...] = ()
    """JSON files (each a list of prompt strings) in the dataset repository, for sets stored that way."""


_HPD_STYLES = ("anime", "concept-art", "paintings", "photo")

PUBLIC_SETS: dict[str, PublicSet] = {
    "pickapic-v2": PublicSet("yuvalkirstain/pickapic_v2_no_images", "Pick-a-Pic v2 unique test captions (500)",
                             split="test_unique", column="caption"),
    "drawbench": PublicSet("Jialuo21/DrawBench", "DrawBench (200 prompts, 11 categories)", split="test",
                           column="prompts"),
    "partiprompts": PublicSet("nateraw/parti-prompts", "PartiPrompts (1632 prompts)", split="train",
                              column="Prompt"),
    "hpdv2": PublicSet("zhwang/HPDv2", "HPDv2 benchmark test prompts, all four styles (3200)",
                       files=tuple(f"benchmark/{style}.json" for style in _HPD_STYLES)),
    **{f"hpdv2:{style}": PublicSet("zhwang/HPDv2", f"HPDv2 benchmark test prompts, style {style} (800)",
                                   files=(f"benchmark/{style}.json",)) for style in _HPD_STYLES},
}


class PromptSetUnavailableError(RuntimeError):
    """A named public set could not be fetched (offline, missing package, hub error)."""


def _offline_hint(name: str, spec: PublicSet) -> str:
    return (f"Offline? Export the prompts of {spec.repo} once on a machine with network to a .txt/.jsonl/.csv file "
            f"and set prompts.source to that file (prompt set {name!r}).")


def _load_public(name: str, spec: PublicSet) -> list[str]:
    if spec.files:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:
            raise PromptSetUnavailableError(f"Prompt set {name!r} needs huggingface_hub: pip install "
                                            "huggingface_hub.") from e
        queries = []
        for filename in spec.files:
            try:
                path = hf_hub_download(spec.repo, filename, repo_type="dataset")
            except Exception as e:  # offline, hub error: the message below says what to do instead
                raise PromptSetUnavailableError(f"Could not fetch {spec.repo}/{filename} ({type(e).__name__}: "
                                                f"{e}). {_offline_hint(name, spec)}") from e
            with open(path, encoding="utf-8") as file:
                queries += [str(q) for q in json.load(file)]
        return queries
    try:
        import datasets
    except ImportError as e:
        raise PromptSetUnavailableError(f"Prompt set {name!r} needs the datasets package: pip install "
                                        f"'promptloop[datasets]'. {_offline_hint(name, spec)}") from e
    try:
        dataset = datasets.load_dataset(spec.repo, split=spec.split)
    except Exception as e:  # offline, hub error: the message below says what to do instead
        raise PromptSetUnavailableError(f"Could not load dataset {spec.repo!r} split {spec.split!r} "
                                        f"({type(e).__name__}: {e}). {_offline_hint(name, spec)}") from e
    if spec.column not in dataset.column_names:
        raise PromptSetUnavailableError(f"Dataset {spec.repo!r} has no column {spec.column!r} (columns: "
                                        f"{dataset.column_names}); it may have changed upstream.")
    return [str(q) for q in dataset[spec.column]]


def _clean(queries: list[str]) -> list[str]:
    return [q for q in (" ".join(str(x).split()) for x in queries) if q]


def load_prompt_set(source: str, column: str = "prompt", limit: Optional[int] = None) -> list[str]:
    """The queries of ``source`` (see the module docstring), whitespace-normalised, blanks dropped, the first
    ``limit`` kept."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError("prompts.source is empty: give a prompt file, a named set "
                         f"({', '.join(sorted(PUBLIC_SETS))}) or a registered set such as 'miniworld:heldout'.")
    if limit is not None and limit < 1:
        raise ValueError(f"prompts.limit={limit} must be >= 1 (or null for all prompts).")
    namespace = source.partition(":")[0]
    if source not in _REGISTRY and namespace in PLUGIN_NAMESPACES:
        importlib.import_module(PLUGIN_NAMESPACES[namespace])
        if source not in _REGISTRY:
            known = [n for n in _REGISTRY if n.startswith(namespace + ":")]
            raise ValueError(f"No prompt set {source!r}: {PLUGIN_NAMESPACES[namespace]} registers {known or 'none'} "
                             "(a package registers its sets on import with "
                             "promptloop.eval.prompt_sets.register_prompt_set).")
    if source in _REGISTRY:
        queries = _REGISTRY[source]()
    elif source in PUBLIC_SETS:
        queries = _load_public(source, PUBLIC_SETS[source])
    else:
        queries = load_queries(source, column)
    queries = _clean(list(queries))
    if not queries:
        raise ValueError(f"Prompt set {source!r} holds no query.")
    return queries[:limit] if limit is not None else queries


__all__ = ["PLUGIN_NAMESPACES", "PUBLIC_SETS", "PromptSetLoader", "PromptSetUnavailableError", "PublicSet",
           "load_prompt_set", "register_prompt_set", "registered_prompt_sets"]
