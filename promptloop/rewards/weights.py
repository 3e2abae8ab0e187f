"""Where each reward's published weights live, and how they are found on disk before any model is built.

Every scorer declares its files once, in ``EXPECTED_FILES``. A reward folder is found, per group of files, in this
order: the ``path`` the user passed; else ``<cache_dir>/<folder>`` (``cache_dir`` defaults to
``$PROMPTLOOP_REWARDS_CACHE`` or ``~/.cache/promptloop/rewards``); else the Hugging Face hub cache (read offline);
else, only with ``download=True``, the hub. Nothing is downloaded by default.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV_VAR = "PROMPTLOOP_REWARDS_CACHE"
HPSV2_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
AESTHETIC_CHECKPOINT = "sac+logos+ava1-l14-linearMSE.pth"


class MissingRewardWeightsError(FileNotFoundError):
    """A reward's weight files are not on disk; the message names each missing file and where to put it."""


@dataclass(frozen=True)
class WeightGroup:
    """Files that are published together and must sit in one folder.

    Attributes:
        files: one entry per file; each entry lists its accepted names, the published name first (later names are
            accepted conversions, e.g. a ``.safetensors`` copy of a ``.pt`` checkpoint).
        repo_id: the Hugging Face hub repository that publishes the files, or None if they are not on the hub.
        subfolder: where the group lives inside a local reward folder ("" = the folder itself).
        url: a page to get the files from when they are not on the hub.
    """

    files: tuple[tuple[str, ...], ...]
    repo_id: str | None = None
    subfolder: str = ""
    url: str | None = None

    @property
    def source(self) -> str:
        return f"https://huggingface.co/{self.repo_id}" if self.repo_id else (self.url or "its publisher")


@dataclass(frozen=True)
class RewardWeights:
    """The published files of one reward.

    Attributes:
        folder: the reward's sub-folder of the rewards cache.
        groups: its files, grouped by publisher.
    """

    folder: str
    groups: tuple[WeightGroup, ...]


def _clip_group(repo_id: str, subfolder: str = "") -> WeightGroup:
    return WeightGroup(files=(("config.json",), ("model.safetensors",)), repo_id=repo_id, subfolder=subfolder)


def _hpsv2_weights(checkpoint: str) -> RewardWeights:
    stem = checkpoint.rsplit(".", 1)[0]
    return RewardWeights("hpsv2", (WeightGroup(files=((checkpoint, f"{stem}.safetensors"),), repo_id="xswu/HPSv2"),))


EXPECTED_FILES: dict[str, RewardWeights] = {
    "imagereward": RewardWeights(
        "imagereward",
        (
            WeightGroup(files=(("ImageReward.pt", "ImageReward.safetensors"), ("med_config.json",)),
                        repo_id="THUDM/ImageReward"),
            WeightGroup(files=(("vocab.txt",),), repo_id="google-bert/bert-base-uncased"),
        ),
    ),
    "pickscore": RewardWeights("pickscore", (_clip_group("yuvalkirstain/PickScore_v1"),)),
    "hpsv2-v2.0": _hpsv2_weights(HPSV2_CHECKPOINTS["v2.0"]),
    "hpsv2-v2.1": _hpsv2_weights(HPSV2_CHECKPOINTS["v2.1"]),
    "aesthetic": RewardWeights(
        "aesthetic",
        (
            WeightGroup(
                files=((AESTHETIC_CHECKPOINT, AESTHETIC_CHECKPOINT.replace(".pth", ".safetensors")),),
                url="https://github.com/christophschuhmann/improved-aesthetic-predictor",
            ),
            _clip_group("openai/clip-vit-large-patch14", subfolder="clip"),
        ),
    ),
    "clipscore": RewardWeights("clipscore", (_clip_group("openai/clip-vit-base-patch32"),)),
}


@dataclass(frozen=True)
class ResolvedWeights:
    """Paths of a reward's files on disk.

    Attributes:
        files: the path found for each file, keyed by its published name.
        folders: the folder of each group, keyed by the group's ``subfolder``.
    """

    files: dict[str, Path]
    folders: dict[str, Path]


def default_cache_dir() -> Path:
    """``$PROMPTLOOP_REWARDS_CACHE`` if set, else ``~/.cache/promptloop/rewards``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "promptloop" / "rewards")


def with_repo(weights: RewardWeights, repo_id: str, folder: str) -> RewardWeights:
    """``weights`` with its first group published by ``repo_id`` and cached under ``folder`` (a configurable model)."""
    first = dataclasses.replace(weights.groups[0], repo_id=repo_id)
    return RewardWeights(folder, (first,) + weights.groups[1:])


def _find_in_folder(folder: Path, group: WeightGroup) -> tuple[dict[str, Path], list[tuple[str, ...]]]:
    found, missing = {}, []
    for names in group.files:
        hit = next((folder / n for n in names if (folder / n).is_file()), None)
        if hit is None:
            missing.append(names)
        else:
            found[names[0]] = hit
    return found, missing


def _find_in_hub(group: WeightGroup, download: bool) -> dict[str, Path] | None:
    if group.repo_id is None:
        return None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None
    found = {}
    for names in group.files:
        cached = next((p for n in names if isinstance(p := try_to_load_from_cache(group.repo_id, n), str)), None)
        if cached is None and download:
            cached = hf_hub_download(group.repo_id, names[0])
        if cached is None:
            return None
        found[names[0]] = Path(cached)
    if len({p.parent for p in found.values()}) != 1:
        return None
    return found


def resolve_weights(
    weights: RewardWeights,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> ResolvedWeights:
    """Find every file of ``weights``; raise ``MissingRewardWeightsError`` naming each missing file and where to
    put it. Touches only the file system (and the hub if ``download``)."""
    root = Path(path) if path is not None else Path(cache_dir or default_cache_dir()) / weights.folder
    files: dict[str, Path] = {}
    folders: dict[str, Path] = {}
    problems: list[str] = []
    for group in weights.groups:
        local = root / group.subfolder
        found, missing = _find_in_folder(local, group)
        if missing and path is None:
            found = _find_in_hub(group, download) or found
            missing = [names for names in group.files if names[0] not in found]
        for names in missing:
            alternatives = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
            problems.append(f"  - {names[0]}{alternatives}: put it in {local}/ (published at {group.source})")
        if found and not missing:
            files.update(found)
            folders[group.subfolder] = next(iter(found.values())).parent
    if problems:
        hint = ("pass path=<folder holding these files>" if path is None else "check the path you passed")
        hub = "" if download else ", or download=True to fetch hub files"
        raise MissingRewardWeightsError(
            f"Reward weights for {weights.folder!r} are missing:\n" + "\n".join(problems) + f"\nFix: {hint}{hub}."
        )
    return ResolvedWeights(files=files, folders=folders)
