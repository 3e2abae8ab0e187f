"""Atomic training checkpoints: written to a temporary folder, completed with a marker, then renamed.

A crash at any moment leaves either the previous checkpoints untouched or a temporary folder that is ignored (and
cleaned up by the next save). Nothing is unpickled on load: tensors use ``torch.load(weights_only=True)``, the rest
is JSON.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..policy.hub import HUB_CHECKPOINT_FOLDER, is_hub_id

COMPLETE_MARKER = "checkpoint.json"
_PREFIX = "step-"
_NAME = re.compile(r"step-(\d+)")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions, a failing writer); earlier ones are intact."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Rename out of the listing first (atomic), then delete: a crash mid-delete never leaves a half checkpoint
    that still looks complete."""
    doomed = path.with_name(f".tmp-old-{path.name}-{os.getpid()}")
    try:
        os.replace(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def write_folder_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp_dir)`` fills a temporary sibling of ``final``, which then takes its place by a rename (an existing
    ``final`` is moved aside first and deleted after). On any failure the temporary folder is removed, ``final`` is
    untouched and the error propagates."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in (*final.parent.glob(f".tmp-{final.name}-*"), *final.parent.glob(f".tmp-old-{final.name}-*")):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crash of an earlier write
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():  # a folder cannot be renamed onto a non-empty one
            old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], meta: dict[str, Any],
                    keep_last: int) -> Path:
    """``write(tmp_dir)`` fills a temporary folder; it becomes ``checkpoints/step-NNNNNNNN`` atomically.

    ``meta`` (JSON) is written last as the completion marker. Older checkpoints beyond ``keep_last`` are removed
    only after the new one is in place. Any failure while writing (disk full, permissions, a writer's own error)
    raises :class:`CheckpointWriteError` naming the path, and leaves every earlier checkpoint intact.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1")
    root = checkpoint_dir(run_dir)
    final = root / f"{_PREFIX}{step:08d}"

    def write_with_marker(tmp: Path) -> None:
        write(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(dict(meta, step=step), indent=2))

    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        write_folder_atomically(final, write_with_marker)
    except Exception as e:  # torch.save and safetensors report a full disk as RuntimeError / SafetensorError
        error = CheckpointWriteError(f"could not write checkpoint {final} ({type(e).__name__}: {e}); earlier "
                                     f"checkpoints in {root} are intact. Free disk space or fix permissions, then "
                                     "resume.")
        error.errno = getattr(e, "errno", None)
        raise error from e
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old != final:
            _remove(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: real folders named ``step-N`` holding the completion marker.

    Anything else in the folder (temporary folders, copies such as ``step-4-backup``, symlinks that could point
    outside the run) is ignored.
    """
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and not p.is_symlink() and p.is_dir()
            and (p / COMPLETE_MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))


def checkpoints_after(run_dir: Path, step: int, overwrite: bool = False) -> list[Path]:
    """The run's complete checkpoints past ``step``, the step a run starts from (0, or its resume checkpoint's):
    left by an earlier run, they would be taken for this run's by ``--resume`` and by ``keep_last``. An error naming
    the fix unless ``overwrite`` (then the caller deletes them: :func:`remove_checkpoints`)."""
    later = [p for p in list_checkpoints(run_dir) if int(p.name[len(_PREFIX):]) > step]
    if later and not overwrite:
        names = ", ".join(p.name for p in later)
        raise ValueError(f"{checkpoint_dir(run_dir)} holds checkpoints after step {step}, where this run starts "
                         f"({names}), left by an earlier run: --resume would continue them. Resume the latest with "
                         "--resume, choose another logging.output_dir, or set logging.overwrite_output_dir true to "
                         "delete them.")
    return later


def remove_checkpoints(checkpoints: list[Path]) -> None:
    for path in checkpoints:
        _remove(path)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_checkpoint(run_dir: Path, resume: bool | str | Path) -> Optional[Path]:
    """The checkpoint ``resume`` names: None for False, the run's latest complete checkpoint for True, else the
    given folder, or a hub repo's ``last-checkpoint/`` (downloaded) when it names no local folder and reads as a
    repo id. A run without checkpoints (``FileNotFoundError``) or a folder that is not a complete checkpoint
    (``ValueError``) is an error naming the fix; cheap, so ``promptloop train`` checks it before any model loads."""
    if resume is False:
        return None
    if resume is True:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {checkpoint_dir(run_dir)}; start without "
                             "--resume or point logging.output_dir at the run to continue.")
        return found
    if not Path(resume).exists() and is_hub_id(str(resume)):
        resume = download_checkpoint(str(resume))
    read_meta(Path(resume))
    return Path(resume)


def push_checkpoint(checkpoint: Path, repo_id: str, *, private: Optional[bool] = None, commit_message: str) -> Any:
    """Upload a complete checkpoint to ``last-checkpoint/`` of the hub repo ``repo_id`` (created if missing), in
    one commit that also deletes the previous one's files; returns huggingface_hub's ``CommitInfo``."""
    from huggingface_hub import HfApi

    read_meta(checkpoint)
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=checkpoint, path_in_repo=HUB_CHECKPOINT_FOLDER,
                             commit_message=commit_message, delete_patterns="*")


def download_checkpoint(repo_id: str) -> Path:
    """The local copy (hub cache) of the checkpoint in ``last-checkpoint/`` of the hub repo ``repo_id``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    hint = (f"{repo_id!r} is neither a local checkpoint folder nor a hub repo holding {HUB_CHECKPOINT_FOLDER}/ (one "
            "written by a run with logging.hub_strategy checkpoint)")
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=f"{HUB_CHECKPOINT_FOLDER}/*"))
    except (EntryNotFoundError, HfHubHTTPError) as e:
        raise FileNotFoundError(f"{hint}: {type(e).__name__}: {e}") from e
    if not (snapshot / HUB_CHECKPOINT_FOLDER).is_dir():
        raise FileNotFoundError(f"{hint}: the repo has no {HUB_CHECKPOINT_FOLDER}/.")
    return snapshot / HUB_CHECKPOINT_FOLDER


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's JSON metadata; a missing or damaged marker is a ``ValueError`` naming the file."""
    marker = Path(checkpoint) / COMPLETE_MARKER
    if not marker.is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {COMPLETE_MARKER}); resume from another one.")
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{marker} is damaged ({e}); resume from another checkpoint.") from e
    step = meta.get("step") if isinstance(meta, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{marker} holds no valid step ({step!r}); resume from another checkpoint.")
    return meta


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
