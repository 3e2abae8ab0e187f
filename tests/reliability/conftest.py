"""Reliability suite setup: the tiny training setup is the trainer tests' own (tests/rl/trainer_helpers)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rl"))  # trainer_helpers: imported by name
