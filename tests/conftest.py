"""Fixtures shared by several test folders."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory) -> Path:
    """A saved tiny Qwen2.5-VL (the trainer tests' policy), loaded through the real ``from_pretrained`` code."""
    from promptloop.testing.tiny_vlm import save_tiny_vlm

    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "qwen2_5_vl", "qwen2_5_vl")
