"""Means with Student-t confidence intervals, and paired differences on matched (prompt, seed) samples.

Images of one prompt under different seeds are correlated, so an evaluation's intervals take the prompts as the
independent units (:func:`clustered_ci`, :func:`paired_ci`): a cluster-robust t-interval over prompts, which for
prompts with the same number of seeds is the t-interval of the prompts' means (treating every image as
independent made paired intervals up to 30% too narrow on the mini world's 4 seeds). Non-finite values (a reward
that returned NaN) are left out; ``n`` counts the units of the interval (the prompts, for the clustered ones) and
``samples`` the values used. With ``n < 2`` the interval is undefined (NaN).
The t quantile is exact for the integer degrees of freedom used here (Abramowitz & Stegun 26.7.3-4, inverted by
bisection); above ``_EXPANSION_DF`` degrees of freedom the Cornish-Fisher expansion (A&S 26.7.5) is used, which
agrees to better than 1e-9 there.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import asdict, dataclass
from statistics import NormalDist

_EXPANSION_DF = 2000


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` finite values with its two-sided confidence interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    std: float
    """Sample standard deviation (ddof = 1) of the ``n`` units (the cluster means' for equal clusters); NaN when
    ``n < 2``."""
    n: int
    """Independent units the interval is over: values, or clusters (prompts) for :func:`clustered_ci`."""
    confidence: float
    samples: int = -1
    """Finite values the mean is over (``n`` unless clustered; -1: not given)."""

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _abs_t_probability(theta: float, df: int) -> float:
    """P(|T| <= sqrt(df) * tan(theta)) for Student's t with integer ``df`` (A&S 26.7.3 / 26.7.4)."""
    c2 = math.cos(theta) ** 2
    if df % 2:
        if df == 1:
            return 2 * theta / math.pi
        term, total = 1.0, 1.0
        for k in range(1, (df - 3) // 2 + 1):  # (2*4*...*(2k)) / (3*5*...*(2k+1)) cos^(2k)
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):  # (1*3*...*(2k-1)) / (2*4*...*(2k)) cos^(2k)
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def student_t_cdf(t: float, df: int) -> float:
    """CDF of Student's t distribution with a positive integer number of degrees of freedom."""
    _check_df(df)
    theta = math.atan(abs(t) / math.sqrt(df))
    half = 0.5 * _abs_t_probability(theta, df)
    return 0.5 + half if t >= 0 else 0.5 - half


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with integer ``df`` (e.g. ``t_quantile(0.975, 4) = 2.7764...``)."""
    _check_df(df)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p!r} must be in (0, 1).")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    if df > _EXPANSION_DF:
        x = NormalDist().inv_cdf(p)
        g1 = (x**3 + x) / 4
        g2 = (5 * x**5 + 16 * x**3 + 3 * x) / 96
        g3 = (3 * x**7 + 19 * x**5 + 17 * x**3 - 15 * x) / 384
        return x + g1 / df + g2 / df**2 + g3 / df**3
    target = 2 * p - 1  # P(|T| <= t)
    low, high = 0.0, math.pi / 2
    for _ in range(200):
        mid = (low + high) / 2
        if _abs_t_probability(mid, df) < target:
            low = mid
        else:
            high = mid
        if high - low < 1e-15:
            break
    return math.sqrt(df) * math.tan((low + high) / 2)


def _check_df(df: int) -> None:
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise ValueError(f"degrees of freedom must be a positive int, got {df!r}.")


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """Mean and two-sided Student-t interval ``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)`` of the finite values."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1).")
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0, confidence, 0)
    mean = math.fsum(finite) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1, confidence, 1)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1))
    half = t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, std, n, confidence, n)


def clustered_ci(values: Mapping[tuple[Hashable, Hashable], float], confidence: float = 0.95) -> Interval:
    """Mean of the finite values keyed ``(cluster, item)`` (e.g. ``(prompt, seed)``) with a cluster-robust (CR1)
    t-interval over the ``n`` clusters: ``se = sqrt(n / (n - 1) * sum_c (sum_{i in c} (y_i - mean))^2) / N``,
    ``n - 1`` degrees of freedom. With equal clusters this is exactly the t-interval of the cluster means."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1).")
    clusters: dict[Hashable, list[float]] = {}
    for (cluster, _), value in values.items():
        if value is not None and math.isfinite(float(value)):
            clusters.setdefault(cluster, []).append(float(value))
    total = sum(len(v) for v in clusters.values())
    n = len(clusters)
    if total == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0, confidence, 0)
    mean = math.fsum(v for members in clusters.values() for v in members) / total
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1, confidence, total)
    se = math.sqrt(n / (n - 1) * math.fsum(math.fsum(v - mean for v in members) ** 2
                                           for members in clusters.values())) / total
    half = t_quantile((1 + confidence) / 2, n - 1) * se
    return Interval(mean, mean - half, mean + half, se * math.sqrt(n), n, confidence, total)


def paired_differences(values: Mapping[Hashable, float], baseline: Mapping[Hashable, float]) -> dict[Hashable, float]:
    """``values[k] - baseline[k]`` for every key present in both (e.g. keys ``(prompt_index, seed)``), in the
    order of ``values``; pairs where either side is not finite are left out."""
    out = {}
    for key, value in values.items():
        if key not in baseline or value is None or baseline[key] is None:
            continue
        difference = float(value) - float(baseline[key])
        if math.isfinite(difference):
            out[key] = difference
    return out


def paired_ci(values: Mapping[tuple[Hashable, Hashable], float], baseline: Mapping[tuple[Hashable, Hashable], float],
              confidence: float = 0.95) -> Interval:
    """Mean paired difference ``values - baseline`` over matched ``(prompt, seed)`` keys with its t-interval over
    prompts (:func:`clustered_ci` of the differences)."""
    return clustered_ci(paired_differences(values, baseline), confidence)


__all__ = ["Interval", "clustered_ci", "mean_ci", "paired_ci", "paired_differences", "student_t_cdf", "t_quantile"]
