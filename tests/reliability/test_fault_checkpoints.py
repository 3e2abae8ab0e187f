"""Checkpoint writes that fail (disk full, permissions, a crash while old checkpoints are removed) and checkpoint
folders holding things that are not checkpoints: clear errors, the previous checkpoint intact and loadable."""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

import promptloop.rl.checkpoint as checkpoint_module
from fault_helpers import file_size_limit, load_whole_checkpoint
from promptloop.rl.checkpoint import (CheckpointWriteError, latest_checkpoint, list_checkpoints, read_meta,
                                      save_checkpoint, write_folder_atomically)
from trainer_helpers import adapter_state, tiny_trainer


@pytest.fixture
def trainer(tmp_path, vlm_dir):
    """A tiny trainer with one good checkpoint (step 1) already written."""
    trainer = tiny_trainer(tmp_path / "run", vlm_dir, prompts_per_step=1, group_size=2, micro_batch_size=2)
    trainer.step = 1
    trainer.save_checkpoint()
    trainer.step = 2
    return trainer


def _assert_previous_intact(trainer):
    run = trainer.run_dir
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001"]
    assert load_whole_checkpoint(latest_checkpoint(run))["step"] == 1
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def _raise(error):
    def fail(*args, **kwargs):
        raise error
    return fail


def test_disk_full_during_the_real_writers_keeps_the_previous_checkpoint(trainer):
    """The adapter (safetensors) and torch.save report a full disk with their own exception types; both become a
    CheckpointWriteError that names the checkpoint."""
    with file_size_limit(16 * 1024), pytest.raises(CheckpointWriteError, match=r"step-00000002.*are intact"):
        trainer.save_checkpoint()
    _assert_previous_intact(trainer)
    assert trainer.save_checkpoint().name == "step-00000002"  # space is back: the next save works
    assert load_whole_checkpoint(latest_checkpoint(trainer.run_dir))["step"] == 2


@pytest.mark.parametrize("stage, patch", [
    ("folder", lambda mp: mp.setattr(checkpoint_module.Path, "mkdir", _raise(PermissionError(
        errno.EACCES, "Permission denied")))),
    ("marker", lambda mp: mp.setattr(checkpoint_module.json, "dumps", _raise(OSError(
        errno.ENOSPC, "No space left on device")))),
    ("fsync", lambda mp: mp.setattr(checkpoint_module, "_fsync_tree", _raise(OSError(errno.EIO, "I/O error")))),
    ("rename", lambda mp: mp.setattr(checkpoint_module.os, "replace", _raise(OSError(
        errno.ENOSPC, "No space left on device")))),
])
def test_failure_at_every_stage_of_a_save_is_clear_and_harmless(trainer, monkeypatch, stage, patch):
    patch(monkeypatch)
    with pytest.raises(CheckpointWriteError, match="earlier checkpoints .* are intact") as caught:
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert isinstance(caught.value, OSError) and caught.value.__cause__ is not None
    _assert_previous_intact(trainer)


def test_crash_while_removing_an_old_checkpoint_never_leaves_a_half_one_listed(trainer, monkeypatch):
    """keep_last removes old checkpoints; a crash half-way through a removal must not leave a folder that still
    has its completion marker but lacks weights."""
    trainer.config.logging.keep_last = 1

    def crash_half_way(path, ignore_errors=False):
        os.remove(next(p for p in sorted(path.rglob("*.safetensors"))))
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()
    listed = list_checkpoints(trainer.run_dir)
    assert [p.name for p in listed] == ["step-00000002"]
    for checkpoint in listed:
        load_whole_checkpoint(checkpoint)
    trainer.step = 3
    trainer.save_checkpoint()  # the next save clears the leftovers
    assert sorted(p.name for p in (trainer.run_dir / "checkpoints").iterdir()) == ["step-00000003"]


def test_things_that_are_not_checkpoints_are_ignored(trainer, tmp_path):
    root = trainer.run_dir / "checkpoints"
    good = latest_checkpoint(trainer.run_dir)
    shutil.copytree(good, root / "step-00000009-backup")  # a user's copy: used to crash the listing (int())
    (root / "step-00000010").mkdir()  # no completion marker: a half-written checkpoint from an old version
    outside = tmp_path / "elsewhere" / "step-00000099"
    shutil.copytree(good, outside)
    (root / "step-00000099").symlink_to(outside, target_is_directory=True)  # points out of the run folder
    (root / "step-00000011").write_text("a file, not a folder")
    assert list_checkpoints(trainer.run_dir) == [good]
    for step in (2, 3):  # keep_last=1 removes older checkpoints, never what the symlink points at
        trainer.step = step
        trainer.config.logging.keep_last = 1
        trainer.save_checkpoint()
    assert read_meta(outside)["step"] == 1 and (outside / "policy" / "adapter_model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(trainer.run_dir)] == ["step-00000003"]


@pytest.mark.parametrize("content, match", [
    ("{not json", "is damaged"),
    (json.dumps({"data": {}}), "no valid step"),
    (json.dumps({"step": "../../etc"}), "no valid step"),
    (json.dumps([1, 2]), "no valid step"),
    ("\udcff", "is damaged"),
])
def test_a_damaged_marker_is_a_clear_error_on_resume(trainer, content, match):
    marker = latest_checkpoint(trainer.run_dir) / checkpoint_module.COMPLETE_MARKER
    marker.write_bytes(content.encode("utf-8", errors="surrogateescape"))
    with pytest.raises(ValueError, match=match):
        trainer.train(resume=True)


@pytest.mark.parametrize("step", [-1, "../x", 1.5, True, None])
def test_checkpoint_steps_cannot_name_paths(tmp_path, step):
    with pytest.raises(ValueError, match="non-negative integer"):
        save_checkpoint(tmp_path, step, lambda tmp: None, {}, keep_last=1)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_the_final_policy_folder_is_replaced_whole_or_not_at_all(tmp_path):
    """What ``<output_dir>/policy`` is written with: a failing writer (or a crash's leftovers) never touches the
    previous folder, and a success replaces it with nothing of the old one left."""
    final = tmp_path / "run" / "policy"
    write_folder_atomically(final, lambda tmp: (tmp / "a.txt").write_text("first"))

    def half_then_fail(tmp):
        (tmp / "a.txt").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_folder_atomically(final, half_then_fail)
    assert sorted(p.name for p in final.parent.iterdir()) == ["policy"]
    assert (final / "a.txt").read_text() == "first"
    (final.parent / ".tmp-policy-99999").mkdir()  # left by a killed writer
    write_folder_atomically(final, lambda tmp: (tmp / "b.txt").write_text("second"))
    assert sorted(p.name for p in final.parent.iterdir()) == ["policy"]
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def test_resumed_training_after_a_failed_save_matches_the_saved_state(trainer, tmp_path, vlm_dir):
    """After a failed save the run resumes from the earlier checkpoint with exactly its adapter."""
    saved = adapter_state(trainer)
    with file_size_limit(16 * 1024), pytest.raises(CheckpointWriteError):
        trainer.save_checkpoint()
    fresh = tiny_trainer(trainer.run_dir, vlm_dir, prompts_per_step=1, group_size=2, micro_batch_size=2, seed=1)
    fresh.load_checkpoint()
    assert fresh.step == 1 and read_meta(latest_checkpoint(trainer.run_dir))["step"] == 1
    restored = adapter_state(fresh)
    assert all(float((restored[k] - saved[k]).abs().max()) == 0 for k in saved)
