"""Extension points of :class:`~promptloop.rl.trainer.GRPOTrainer`: callbacks that see the run and may stop it.

Subclass :class:`TrainerCallback` and override the hooks you need; pass instances as
``GRPOTrainer(..., callbacks=[...])`` (or ``GRPOTrainer.from_config(config, callbacks=[...])``). Setting
``trainer.should_stop = True`` in a hook ends training after the current step as if it were the last one: a
checkpoint and the final policy are written, and every process stops at the same step (``--resume`` later continues
to ``grpo.max_steps``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

if TYPE_CHECKING:
    from .trainer import GRPOTrainer


class TrainerCallback:
    """No-op hooks, called in this order; ``trainer.step`` is the number of completed training steps.

    Every hook runs on every process except :meth:`on_save`, which runs where the checkpoint is written (the main
    process); act once with ``trainer.accelerator.is_main_process``.
    """

    def on_train_begin(self, trainer: "GRPOTrainer") -> None:
        """Before the first step (after a resume has restored the step, the weights and the data position)."""

    def on_step_end(self, trainer: "GRPOTrainer", metrics: dict[str, float]) -> None:
        """After each training step, with the metrics it logged (``eval/*`` included on evaluation steps)."""

    def on_save(self, trainer: "GRPOTrainer", checkpoint: Path) -> None:
        """After a checkpoint is complete on disk (and uploaded, with ``logging.push_to_hub``)."""

    def on_train_end(self, trainer: "GRPOTrainer", history: list[dict[str, float]]) -> None:
        """After the final policy is written, before the trackers close; ``history`` holds every step's metrics.
        Not called when a SIGTERM stopped training (``trainer.terminated``)."""


class EarlyStoppingCallback(TrainerCallback):
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` consecutive steps that
    report it (by default the periodic held-out evaluation, ``logging.eval_every``); steps without it are ignored.
    """

    def __init__(self, metric: str = "eval/reward_mean", patience: int = 3, min_delta: float = 0.0,
                 mode: Literal["max", "min"] = "max"):
        if patience < 1:
            raise ValueError(f"patience={patience} must be >= 1")
        if min_delta < 0:
            raise ValueError(f"min_delta={min_delta} must be >= 0")
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r} must be 'max' or 'min'")
        self.metric, self.patience, self.min_delta, self.mode = metric, patience, min_delta, mode
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.stale = 0
        """Consecutive reports of the metric without an improvement."""

    def on_step_end(self, trainer: "GRPOTrainer", metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_step, self.stale = value, trainer.step, 0
            return
        self.stale += 1
        if self.stale >= self.patience:
            trainer.should_stop = True
