"""An interrupted evaluation resumes from its journal: only unfinished batches are made again, and the results
equal an uninterrupted run's."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import promptloop.eval.runner as runner
from eval_helpers import one_per_batch_config, samples_without_timings
from promptloop.eval.journal import model_fingerprint
from promptloop.cli import main

BATCHES = 2 * 3 * 2  # methods x prompts (one per batch) x seeds


class Interrupted(Exception):
    pass


def _config(tmp_path: Path, backbone_dir: Path, policy_dir: Path) -> str:
    return str(one_per_batch_config(tmp_path, backbone_dir, {
        "base": {"kind": "base"},
        "closed": {"kind": "closed", "policy": str(policy_dir), "num_refinements": [1]}}, str(tmp_path / "out")))


@pytest.fixture
def counted_batches(monkeypatch):
    """Counts sample_batch calls; raises Interrupted at call ``stop_at`` (None: never)."""
    state = {"calls": 0, "stop_at": None}
    real = runner.sample_batch

    def counting(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] == state["stop_at"]:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "sample_batch", counting)
    return state


def _samples(out: Path) -> list[dict]:
    return samples_without_timings(json.loads((out / "results.json").read_text()))


def test_a_resumed_evaluation_makes_only_the_missing_batches(tmp_path, tiny_backbone_dir, tiny_policy_dir,
                                                             counted_batches, capsys):
    config = _config(tmp_path, tiny_backbone_dir, tiny_policy_dir)
    assert main(["eval", config, "--output.output_dir", str(tmp_path / "whole")]) == 0
    assert counted_batches["calls"] == BATCHES

    counted_batches.update(calls=0, stop_at=8)
    with pytest.raises(Interrupted):
        main(["eval", config])
    journal = tmp_path / "out" / ".progress"
    assert len([line for line in (journal / "rank-0.jsonl").read_text().splitlines() if line]) == 7
    assert not (tmp_path / "out" / "results.json").exists()

    # a crash while writing a line leaves half a line; an image lost since makes its batch again
    with open(journal / "rank-0.jsonl", "a") as f:
        f.write('{"backbone": "tiny-sd", "method": "clo')
    (tmp_path / "out" / "images" / "tiny-sd" / "base" / "p0000_s0.png").unlink()
    counted_batches.update(calls=0, stop_at=None)
    capsys.readouterr()
    assert main(["eval", config, "--resume"]) == 0
    assert counted_batches["calls"] == BATCHES - 7 + 1
    assert f"{BATCHES}/{BATCHES}" in capsys.readouterr().err, "the progress bar counts reused batches too"
    assert _samples(tmp_path / "out") == _samples(tmp_path / "whole")
    assert not journal.exists(), "the journal is removed once the results are written"


def test_resume_errors_name_the_fix_before_any_model_loads(tmp_path, tiny_backbone_dir, tiny_policy_dir,
                                                           counted_batches, monkeypatch):
    config = _config(tmp_path, tiny_backbone_dir, tiny_policy_dir)
    with pytest.raises(SystemExit, match="no interrupted evaluation in .*run without --resume"):
        main(["eval", config, "--resume"])
    counted_batches["stop_at"] = 3
    with pytest.raises(Interrupted):
        main(["eval", config])

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the resume check")

    monkeypatch.setattr(runner, "load_backbone", no_model)
    with pytest.raises(SystemExit, match=r"other settings \(backbones.tiny-sd.num_inference_steps, seeds\)"):
        main(["eval", config, "--resume", "--seeds", "0,2", "--backbones.tiny-sd.num_inference_steps", "5"])
    with pytest.raises(SystemExit, match=r"other settings \(prompts.limit, the prompts\)"):
        main(["eval", config, "--resume", "--prompts.limit", "2"])


def test_resume_checks_the_model_files_not_where_or_how_it_runs(tmp_path, tiny_backbone_dir, tiny_policy_dir,
                                                                counted_batches):
    policy = tmp_path / "policy"
    shutil.copytree(tiny_policy_dir, policy)
    config = _config(tmp_path, tiny_backbone_dir, policy)
    counted_batches["stop_at"] = 3
    with pytest.raises(Interrupted):
        main(["eval", config])

    weights = policy / "adapter_model.safetensors"
    saved = weights.read_bytes()
    weights.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))  # retrained in place: same files, other weights
    with pytest.raises(SystemExit, match=r"other settings \(the files of methods.closed\); run without --resume"):
        main(["eval", config, "--resume"])

    weights.write_bytes(saved)
    counted_batches.update(calls=0, stop_at=None)
    assert main(["eval", config, "--resume", "--progress", "false", "--device", "auto", "--warmup", "true",
                 "--rewards.bright.device", "cpu"]) == 0
    assert counted_batches["calls"] == BATCHES - 2 + 2, "the batches left, plus one warm-up per method"


def test_a_hub_model_is_identified_by_the_commit_its_revision_resolves_to(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ref = tmp_path / "models--org--vlm" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    assert model_fingerprint("org/vlm") == "a" * 40
    ref.write_text("b" * 40)  # the default branch moved on
    assert model_fingerprint("org/vlm") == "b" * 40
    assert model_fingerprint("org/vlm", "c" * 40) == "c" * 40, "a pinned commit needs no lookup"
    assert model_fingerprint("org/unknown") is None
