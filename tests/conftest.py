"""Fixtures shared by several test folders."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# No test may reach the hub (the rule: no test downloads weights); a stray download then fails at once, not after
# network retries. Set before huggingface_hub is imported; subprocesses (accelerate launch tests) inherit it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory) -> Path:
    """A saved tiny Qwen2.5-VL (the trainer tests' policy), loaded through the real ``from_pretrained`` code."""
    from promptloop.testing.tiny_vlm import save_tiny_vlm

    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "qwen2_5_vl", "qwen2_5_vl")


class RecordingHubApi:
    """Records ``create_repo`` / ``upload_folder`` calls and copies each uploaded folder into ``remote/<repo>``."""

    remote: Path
    calls: list

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, delete_patterns=None, **kwargs):
        self.calls.append(("upload_folder", repo_id, dict(kwargs, path_in_repo=path_in_repo,
                                                          delete_patterns=delete_patterns)))
        target = self.remote / repo_id / (path_in_repo or "")
        if delete_patterns == "*":  # the only pattern promptloop uses: the folder's earlier files go
            shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        return f"commit of {repo_id}"


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub.HfApi replaced by a :class:`RecordingHubApi` class writing under ``tmp_path / "remote"``."""
    import huggingface_hub

    api = type("Api", (RecordingHubApi,), {"remote": tmp_path / "remote", "calls": []})
    monkeypatch.setattr(huggingface_hub, "HfApi", api)
    return api


class HubCache:
    """A huggingface_hub cache folder that tests fill with repos, so that the real download code finds them with
    ``local_files_only`` (no network)."""

    def __init__(self, path: Path):
        self.path = path

    def add(self, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
        """Copy ``folder`` in as ``repo_id`` at ``commit`` (40 hex digits), with ``refs`` (branches, tags) on it."""
        repo = self.path / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        for ref in refs:
            (repo / "refs" / ref).write_text(commit)
        return repo / "snapshots" / commit

    @property
    def offline(self) -> dict:
        """The ``from_pretrained`` keywords that read this cache only."""
        return {"cache_dir": self.path, "local_files_only": True}


@pytest.fixture
def hub_cache(tmp_path) -> HubCache:
    return HubCache(tmp_path / "hub-cache")
