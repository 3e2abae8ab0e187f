"""Atomic training checkpoints: written to a temporary folder, completed with a marker, then renamed.

A crash at any moment leaves either the previous checkpoints untouched or a temporary folder that is ignored (and
cleaned up by the next save). Nothing is unpickled on load: tensors use ``torch.load(weights_only=True)``, the rest
is JSON.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

COMPLETE_MARKER = "checkpoint.json"
_PREFIX = "step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], meta: dict[str, Any],
                    keep_last: int) -> Path:
    """``write(tmp_dir)`` fills a temporary folder; it becomes ``checkpoints/step-NNNNNNNN`` atomically.

    ``meta`` (JSON) is written last as the completion marker. Older checkpoints beyond ``keep_last`` are removed
    only after the new one is in place. Errors (disk full, permissions) propagate with the path, and leave every
    earlier checkpoint intact.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{_PREFIX}{step:08d}-{os.getpid()}"
    try:
        tmp.mkdir()
        write(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(dict(meta, step=step), indent=2))
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. at exit right after a periodic save)
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"could not write checkpoint {final} ({e.strerror or e}); earlier checkpoints in "
                               f"{root} are intact. Free disk space or fix permissions, then resume.") from e
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / COMPLETE_MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text())


def rng_state() -> dict[str, Any]:
    """Python and torch RNG states as tensors/lists (loadable with ``weights_only=True``)."""
    version, state, gauss = random.getstate()
    out: dict[str, Any] = {"python": [version, list(state), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_tensors(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
