"""kill -9 of a training process at random moments: the last checkpoint loads, at most one checkpoint interval of
work is lost, and the resumed run ends with the uninterrupted run's adapter."""
from __future__ import annotations

import json
import os
import random

import pytest

from fault_helpers import max_difference
from kill_harness import CHECKPOINT_EVERY, TrainingForkServer, kill_trial, reference_run, summarise

REPORT_ENV = "PROMPTLOOP_RELIABILITY_REPORT"
"""If set, the trials' summary is written to this JSON file (the numbers in docs/reliability.md)."""


@pytest.fixture(scope="module")
def server(tmp_path_factory, vlm_dir):
    server = TrainingForkServer(tmp_path_factory.mktemp("forkserver") / "server.log", vlm_dir)
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    reference = reference_run(server, tmp_path_factory.mktemp("reference"))
    assert max_difference(reference.adapter, reference.initial_adapter) > 1e-4, "training did not move the adapter"
    return reference


def _run_trials(server, reference, root, targets):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    outcomes = [kill_trial(server, root / f"trial{i}", reference, rng, target) for i, target in enumerate(targets)]
    summary = summarise(outcomes, seed)
    print(json.dumps({k: v for k, v in summary.items() if k != "outcomes"}))
    if os.environ.get(REPORT_ENV):
        with open(os.environ[REPORT_ENV], "a") as f:
            f.write(json.dumps(summary) + "\n")
    for o in outcomes:
        context = f"seed {seed}: {o}"
        assert o.killed or o.target == "anytime", context  # a checkpoint-write kill always lands
        assert 0 <= o.lost_steps <= CHECKPOINT_EVERY, context
        assert o.final_difference <= 1e-6, context
        assert not o.temporary_after_resume, context
    return summary


def test_kill_9_at_random_moments_then_resume(server, reference, tmp_path):
    summary = _run_trials(server, reference, tmp_path, ["anytime", "checkpoint write", "anytime"])
    assert summary["killed"] >= 2, summary


@pytest.mark.slow
def test_kill_9_twenty_trials(server, reference, tmp_path):
    summary = _run_trials(server, reference, tmp_path, ["anytime", "checkpoint write"] * 10)
    assert summary["killed"] >= 18, summary
