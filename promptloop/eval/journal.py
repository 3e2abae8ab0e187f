"""The evaluation's progress journal: the samples of every finished batch, so that an interrupted evaluation
resumes (``promptloop eval CONFIG --resume``) without making them again.

``<output_dir>/.progress/`` holds ``run.json`` (the config and prompts the batches belong to) and one
``rank-N.jsonl`` per process (a JSON line per batch, flushed and synced when the batch is done; a line cut short
by a crash is ignored). It is removed once the results are written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from ..configuration import to_dict
from .config import EvalConfig
from .results import Sample

JOURNAL_DIR = ".progress"
BatchKey = tuple[str, str, int, int]
"""(backbone label, method label, seed, index of the batch's first prompt)."""


def run_identity(config: EvalConfig, queries: Sequence[str]) -> dict[str, Any]:
    """What a resumed evaluation must share with the interrupted one: everything but the output settings."""
    values = to_dict(config)
    values.pop("output")
    return json.loads(json.dumps({"config": values, "prompts": list(queries)}))  # tuples as lists, as read back


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(current))
    out = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


class EvalJournal:
    """One process's view of the journal in ``out_dir``."""

    def __init__(self, out_dir: Path, rank: int):
        self.folder = Path(out_dir) / JOURNAL_DIR
        self.rank = rank

    def begin(self, identity: dict[str, Any]) -> None:
        """A fresh evaluation (call on the main process only, before the others record): an old journal is
        cleared and ``identity`` written."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        tmp = self.folder / "run.json.tmp"
        tmp.write_text(json.dumps(identity), encoding="utf-8")
        os.replace(tmp, self.folder / "run.json")

    def resume(self, identity: dict[str, Any]) -> dict[BatchKey, list[Sample]]:
        """The finished batches of the interrupted evaluation (every process's); an error naming the fix when there
        is none or when it was made with another config or other prompts."""
        marker = self.folder / "run.json"
        if not marker.is_file():
            raise FileNotFoundError(f"--resume: no interrupted evaluation in {self.folder.parent} (no "
                                    f"{JOURNAL_DIR}/run.json); run without --resume.")
        saved = json.loads(marker.read_text(encoding="utf-8"))
        changed = _differences(saved.get("config", {}), identity["config"])
        if saved.get("prompts") != identity["prompts"]:
            changed.append("the prompts")
        if changed:
            raise ValueError(f"--resume: the interrupted evaluation in {self.folder.parent} was made with other "
                             f"settings ({', '.join(changed[:8])}); run without --resume to start again, or "
                             "restore them.")
        return self.batches()

    def batches(self) -> dict[BatchKey, list[Sample]]:
        """Every batch recorded so far, by any process."""
        done: dict[BatchKey, list[Sample]] = {}
        for path in sorted(self.folder.glob("rank-*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    done[(row["backbone"], row["method"], row["seed"], row["start"])] = [
                        Sample(**sample) for sample in row["samples"]]
                except (ValueError, KeyError, TypeError):  # cut short by a crash
                    continue
        return done

    def record(self, key: BatchKey, samples: Sequence[Sample]) -> None:
        """Append a finished batch, durably."""
        backbone, method, seed, start = key
        line = json.dumps({"backbone": backbone, "method": method, "seed": seed, "start": start,
                           "samples": [dataclasses.asdict(sample) for sample in samples]})
        with open(self.folder / f"rank-{self.rank}.jsonl", "a", encoding="utf-8") as f:
            f.write("\n" + line + "\n")  # the leading newline ends a line a crash cut short
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
