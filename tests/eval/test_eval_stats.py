"""Confidence intervals against hand computation and printed t-tables."""
from __future__ import annotations

import math

import pytest

from promptloop.eval.stats import clustered_ci, mean_ci, paired_ci, paired_differences, student_t_cdf, t_quantile

# Two-sided 95% critical values t_{0.975, df} from a printed Student t-table.
T_TABLE_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281, 30: 2.0423, 120: 1.9799}


@pytest.mark.parametrize("df,expected", sorted(T_TABLE_975.items()))
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-5)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=5e-5)


def test_t_quantile_inverts_the_cdf_and_tends_to_the_normal():
    for df in (1, 2, 7, 50, 1999, 2001, 10_000):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert student_t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)
    assert t_quantile(0.975, 10**6) == pytest.approx(1.959966, abs=1e-5)
    assert t_quantile(0.995, 60) == pytest.approx(2.6603, abs=5e-5)  # printed table, 99% two-sided
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.975, 0)


def test_mean_ci_by_hand():
    # values 1..5: mean 3, sample variance 2.5, se = sqrt(2.5 / 5) = 0.70711; t_{0.975,4} = 2.77645
    interval = mean_ci([1, 2, 3, 4, 5])
    assert interval.mean == 3 and interval.n == 5
    assert interval.std == pytest.approx(math.sqrt(2.5))
    assert interval.half_width == pytest.approx(2.776445 * 0.7071068, abs=1e-5)  # 1.963243
    assert (interval.low, interval.high) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-5)
    ninety = mean_ci([1, 2, 3, 4, 5], confidence=0.90)  # t_{0.95,4} = 2.131847
    assert ninety.half_width == pytest.approx(2.131847 * 0.7071068, abs=1e-5)


def test_non_finite_values_are_left_out_and_tiny_samples_have_no_interval():
    with_nan = mean_ci([1.0, float("nan"), 3.0, None, float("inf")])
    assert with_nan.n == 2 and with_nan.mean == 2.0
    assert with_nan.half_width == pytest.approx(12.706205 * math.sqrt(2) / math.sqrt(2), abs=1e-5)
    one = mean_ci([4.0])
    assert one.mean == 4.0 and one.n == 1 and math.isnan(one.low) and math.isnan(one.high)
    empty = mean_ci([])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_paired_difference_matches_keys_not_positions():
    method = {("p0", 0): 2.0, ("p1", 0): 5.0, ("p2", 0): 4.0, ("p3", 0): float("nan")}
    base = {("p2", 0): 1.0, ("p0", 0): 1.5, ("p1", 0): 3.0, ("p3", 0): 0.0, ("p9", 0): 9.0}
    assert paired_differences(method, base) == {("p0", 0): 0.5, ("p1", 0): 2.0, ("p2", 0): 3.0}
    # differences 0.5, 2, 3: mean 11/6, sample sd sqrt(((−4/3)² + (1/6)² + (7/6)²) / 2) = 1.258306
    interval = paired_ci(method, base)
    assert interval.n == 3
    assert interval.mean == pytest.approx(11 / 6)
    assert interval.std == pytest.approx(1.2583057, abs=1e-6)
    assert interval.half_width == pytest.approx(4.302653 * 1.2583057 / math.sqrt(3), abs=1e-5)


def test_intervals_take_prompts_as_the_units_not_images():
    # two prompts x three seeds; the seeds of a prompt agree closely, the prompts differ
    values = {("a", 0): 1.0, ("a", 1): 1.1, ("a", 2): 0.9, ("b", 0): 3.0, ("b", 1): 3.3, ("b", 2): 3.0}
    interval, of_means = clustered_ci(values), mean_ci([1.0, 3.1])
    assert (interval.n, interval.samples) == (2, 6)
    for field in ("mean", "low", "high", "std"):  # equal clusters: the t-interval of the prompts' means
        assert getattr(interval, field) == pytest.approx(getattr(of_means, field)), field
    assert interval.half_width > mean_ci(values.values()).half_width  # images of a prompt are not independent
    base = {key: 0.5 for key in values}
    assert paired_ci(values, base).half_width == pytest.approx(of_means.half_width)
    # unequal clusters (a NaN dropped): mean over the values, CR1 standard error by hand, t with 1 degree of freedom
    values[("b", 1)] = float("nan")
    mean = (1.0 + 1.1 + 0.9 + 3.0 + 3.0) / 5
    se = math.sqrt(2 / 1 * ((3.0 - 3 * mean) ** 2 + (6.0 - 2 * mean) ** 2)) / 5
    unequal = clustered_ci(values)
    assert (unequal.n, unequal.samples) == (2, 5) and unequal.mean == pytest.approx(mean)
    assert unequal.half_width == pytest.approx(12.706205 * se, rel=1e-6)
