"""Refinement schedules: at which sampler steps a new prompt takes effect.

Semantics (shared by every backbone): a refinement that takes effect at sampler step ``i`` sees the x0 estimate
computed during step ``i - 1``, the latest completed step, so it costs no extra denoiser evaluation. Valid decision
steps are therefore ``1 .. T - 1`` for ``T`` sampling steps, and a schedule holds at most ``T - 1`` refinements
(``N_R <= T - 1``; e.g. up to 3 for 4-step turbo sampling). Step 0 runs with the initial prompt, unless the schedule
has an *initial rewrite*: then the policy also writes the prompt for step 0, before any denoiser evaluation, so that
decision has no preview (no x0 estimate exists yet) and costs no extra evaluation either. It comes on top of the
N_R refinements.
"""
from __future__ import annotations

import math
import random as _random
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch


@dataclass(frozen=True)
class RefinementSchedule:
    """Where the ``num_refinements`` prompt rewrites of one trajectory happen.

    Build it with :meth:`none`, :meth:`uniform`, :meth:`random` or :meth:`explicit`, then resolve it for a given
    number of sampling steps with :meth:`steps`. A schedule is immutable and :meth:`steps` is a pure function of
    the number of steps (a random schedule stores its seed), so resolving twice gives the same steps.
    """

    kind: Literal["uniform", "random", "explicit"]
    num_refinements: int
    """N_R, the number of prompt rewrites after the initial prompt."""
    seed: Optional[int] = None
    """Seed of a ``random`` schedule."""
    explicit_steps: tuple[int, ...] = ()
    """The sorted decision steps (>= 1) of an ``explicit`` schedule."""
    initial_rewrite: bool = False
    """Also decide at step 0, before the first denoiser evaluation (without a preview), on top of the N_R."""

    @classmethod
    def none(cls) -> "RefinementSchedule":
        """No refinement: the initial prompt is in force for every step (N_R = 0)."""
        return cls(kind="explicit", num_refinements=0)

    @classmethod
    def uniform(cls, num_refinements: int, initial_rewrite: bool = False) -> "RefinementSchedule":
        """Evenly spaced decision steps (inference): step ``round((k + 1) * T / (N_R + 1))`` for k < N_R, after
        step 0 if ``initial_rewrite``."""
        return cls(kind="uniform", num_refinements=_check_count(num_refinements),
                   initial_rewrite=_check_flag(initial_rewrite))

    @classmethod
    def random(
        cls, num_refinements: int, seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
        initial_rewrite: bool = False,
    ) -> "RefinementSchedule":
        """A uniformly random subset of ``N_R`` decision steps out of ``1 .. T - 1`` (training), after step 0 if
        ``initial_rewrite``.

        The draw is seeded by ``seed``, else by one draw from ``generator``, else by one draw from torch's global
        generator (so ``torch.manual_seed`` makes it reproducible).
        """
        if seed is not None and generator is not None:
            raise ValueError("RefinementSchedule.random takes `seed` or `generator`, not both.")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return cls(kind="random", num_refinements=_check_count(num_refinements), seed=int(seed),
                   initial_rewrite=_check_flag(initial_rewrite))

    @classmethod
    def explicit(cls, steps: Sequence[int]) -> "RefinementSchedule":
        """The given decision steps (any order; duplicates and negative steps are rejected). Step 0 is the initial
        rewrite; the other steps are the N_R refinements."""
        steps = list(steps)
        bad = [s for s in steps if not isinstance(s, int) or isinstance(s, bool)]
        if bad:
            raise TypeError(f"Explicit refinement steps must be ints, got {bad!r}.")
        duplicates = sorted({s for s in steps if steps.count(s) > 1})
        if duplicates:
            raise ValueError(f"Explicit refinement steps contain duplicates {duplicates}; each step may appear once.")
        negative = [s for s in steps if s < 0]
        if negative:
            raise ValueError(
                f"Explicit refinement steps {negative} are out of range: a new prompt can take effect at steps "
                "0 .. T-1 (step 0: the initial rewrite, without a preview)."
            )
        later = tuple(sorted(s for s in steps if s > 0))
        return cls(kind="explicit", num_refinements=len(later), explicit_steps=later, initial_rewrite=0 in steps)

    @property
    def num_decisions(self) -> int:
        """Policy calls per trajectory: N_R, plus one for the initial rewrite."""
        return self.num_refinements + int(self.initial_rewrite)

    def steps(self, num_inference_steps: int) -> list[int]:
        """Sorted sampler step indices at which a new prompt takes effect: ``0`` for the initial rewrite, then the
        N_R refinements in ``1 .. T - 1``."""
        return [0] * self.initial_rewrite + self._refinement_steps(num_inference_steps)

    def _refinement_steps(self, num_inference_steps: int) -> list[int]:
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}.")
        T, n = num_inference_steps, self.num_refinements
        if n > T - 1:
            raise ValueError(
                f"A schedule with {n} refinements needs at least {n + 1} sampling steps, got num_inference_steps={T} "
                f"(valid decision steps are 1..{T - 1}, so at most {T - 1} refinements)."
            )
        if self.kind == "uniform":
            return [math.floor((k + 1) * T / (n + 1) + 0.5) for k in range(n)]
        if self.kind == "random":
            return sorted(_random.Random(self.seed).sample(range(1, T), n))
        out_of_range = [s for s in self.explicit_steps if s > T - 1]
        if out_of_range:
            raise ValueError(
                f"Refinement steps {out_of_range} are out of range for num_inference_steps={T}: valid decision steps "
                f"are 1..{T - 1}."
            )
        return list(self.explicit_steps)


def _check_flag(initial_rewrite) -> bool:
    if not isinstance(initial_rewrite, bool):
        raise TypeError(f"initial_rewrite must be a bool, got {initial_rewrite!r}.")
    return initial_rewrite


def _check_count(num_refinements: int) -> int:
    if not isinstance(num_refinements, int) or isinstance(num_refinements, bool) or num_refinements < 0:
        raise ValueError(f"num_refinements must be an int >= 0, got {num_refinements!r}.")
    return num_refinements
