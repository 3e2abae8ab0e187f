"""Fixtures of the policy tests: tiny saved VLMs of the three real classes."""
from __future__ import annotations

import pytest

from promptloop.testing.tiny_vlm import TINY_VLM_FAMILIES, save_tiny_vlm


@pytest.fixture(scope="session")
def tiny_vlm_dirs(tmp_path_factory):
    """family -> folder holding a saved tiny model + processor."""
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {family: save_tiny_vlm(root / family, family) for family in TINY_VLM_FAMILIES}
