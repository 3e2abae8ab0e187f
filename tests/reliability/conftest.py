"""Fixtures of the reliability suite; the tiny training setup is the trainer tests' own (tests/rl/trainer_helpers)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rl"))  # trainer_helpers: imported by name


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory) -> Path:
    """A saved tiny Qwen2.5-VL (the trainer tests' policy), loaded by every trainer built here."""
    from promptloop.testing.tiny_vlm import save_tiny_vlm

    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "qwen2_5_vl", "qwen2_5_vl")
