"""The evaluation's progress journal: the samples of every finished batch, so that an interrupted evaluation
resumes (``promptloop eval CONFIG --resume``) without making them again.

``<output_dir>/.progress/`` holds ``run.json`` (the config, prompts and model fingerprints the batches belong to)
and one ``rank-N.jsonl`` per process (a JSON line per batch, flushed and synced when the batch is done; a line cut
short by a crash is ignored). It is removed once the results are written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from ..configuration import to_dict
from ..policy.hub import is_hub_id
from ..policy.writer import resolve_policy_config
from .config import EvalConfig
from .results import Sample

JOURNAL_DIR = ".progress"
BatchKey = tuple[str, str, int, int]
"""(backbone label, method label, seed, index of the batch's first prompt)."""
NOT_IDENTITY = ("output", "progress", "device", "warmup")
"""Config sections that do not change the samples (where they go, the progress bar, the device, an untimed warm-up);
a resume may change them, and each reward's ``device``."""
FULL_HASH_BYTES = 16 << 20
"""Files up to this size are hashed whole; larger ones (weights) by their size and first and last MiB."""
_SAMPLE_BYTES = 1 << 20
_COMMIT = re.compile(r"[0-9a-f]{40}")


def file_digest(path: Path) -> str:
    """The size and sha256 of a file (of its first and last MiB when it is over ``FULL_HASH_BYTES``)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            digest.update(f.read())
        else:
            digest.update(f.read(_SAMPLE_BYTES))
            f.seek(size - _SAMPLE_BYTES)
            digest.update(f.read())
    return f"{size}:{digest.hexdigest()}"


def folder_digest(folder: Path) -> str:
    """The sha256 of every file's path and :func:`file_digest` under ``folder`` (hidden files and folders left
    out)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            digest.update(f"{relative.as_posix()}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def hub_commit(repo_id: str, revision: Optional[str]) -> Optional[str]:
    """The commit ``revision`` (default branch: None) of hub model ``repo_id`` is at: asked of the hub, else (offline,
    unreachable, unknown) the commit the local cache resolves it to; None when neither knows."""
    if revision is not None and _COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import repo_folder_name

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().model_info(repo_id, revision=revision).sha
        except Exception:  # no network, unknown or gated repo (the errors differ by huggingface_hub version)
            pass
    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / (
        revision or "main")
    return ref.read_text(encoding="utf-8").strip() if ref.is_file() else None


def model_fingerprint(name_or_path: str, revision: Optional[str] = None) -> Optional[str]:
    """What identifies the weights a model loads from: the digest of a local folder or file, else the hub commit
    (None when it cannot be found: loading it fails later)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return folder_digest(local)
    if local.is_file():
        return file_digest(local)
    return hub_commit(name_or_path, revision) if is_hub_id(name_or_path) else None


def policy_fingerprint(path_or_id: str, revision: Optional[str] = None) -> list[Optional[str]]:
    """A saved policy's folder digest (its config, adapter and processor; a hub policy's snapshot at ``revision``)
    and its base model's fingerprint; for a base model alone, its fingerprint."""
    config, folder = resolve_policy_config(path_or_id, revision=revision)
    base = model_fingerprint(config.model_name_or_path, config.model_revision)
    return [base] if folder is None else [folder_digest(Path(folder)), base]


def run_identity(config: EvalConfig, queries: Sequence[str]) -> dict[str, Any]:
    """What a resumed evaluation must share with the interrupted one: the config but for ``NOT_IDENTITY``, the
    prompts, and the fingerprints of every backbone (``backbones.LABEL``) and policy (``methods.LABEL``)."""
    values = {key: value for key, value in to_dict(config).items() if key not in NOT_IDENTITY}
    for reward in values["rewards"].values():
        reward.pop("device")
    fingerprints = {f"backbones.{label}": model_fingerprint(entry.name_or_path, entry.revision)
                    for label, entry in config.backbones.items()}
    policies: dict[tuple[str, Optional[str]], list[Optional[str]]] = {}
    for label, method in config.methods.items():
        if method.kind != "base":
            source = (method.policy, method.policy_revision)
            if source not in policies:
                policies[source] = policy_fingerprint(*source)
            fingerprints[f"methods.{label}"] = policies[source]
    identity = {"config": values, "prompts": list(queries), "fingerprints": fingerprints}
    return json.loads(json.dumps(identity))  # tuples as lists, as read back


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
        is none or when it was made with another config, other prompts or other model files."""
        marker = self.folder / "run.json"
        if not marker.is_file():
            raise FileNotFoundError(f"--resume: no interrupted evaluation in {self.folder.parent} (no "
                                    f"{JOURNAL_DIR}/run.json); run without --resume.")
        saved = json.loads(marker.read_text(encoding="utf-8"))
        changed = _differences(saved.get("config", {}), identity["config"])
        if saved.get("prompts") != identity["prompts"]:
            changed.append("the prompts")
        changed += [f"the files of {key}" for key in _differences(saved.get("fingerprints", {}),
                                                                   identity["fingerprints"])]
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
