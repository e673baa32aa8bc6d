"""The benchmark's bootstrap (nearid_world.stats) against exactly enumerated bootstrap distributions and scipy."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from nearid_world.stats import (
    Interval,
    bootstrap_mean,
    percentile_interval,
    resample_indices,
    two_level_bootstrap,
)

DRAWS = 40000  # the empirical CDF's standard error at 2.5 % is 0.0008: the cases below keep 5 of them from a jump


def _inner(values: list[int]) -> Counter[Fraction]:
    """Exact distribution of the mean of ``len(values)`` draws with replacement (every ordered draw equally likely)."""
    n = len(values)
    dist: Counter[Fraction] = Counter()
    for draw in itertools.product(range(n), repeat=n):
        dist[Fraction(sum(values[i] for i in draw), n)] += Fraction(1, n**n)
    return dist


def _exact_two_level(units: list[list[int]]) -> Counter[Fraction]:
    """Exact distribution of the two-level bootstrap mean: units drawn with replacement, then samples within each."""
    n = len(units)
    inner = [_inner(u) for u in units]
    total: Counter[Fraction] = Counter()
    for draw in itertools.product(range(n), repeat=n):
        acc: Counter[Fraction] = Counter({Fraction(0): Fraction(1)})
        for i in draw:  # the drawn units' inner means are independent: convolve
            nxt: Counter[Fraction] = Counter()
            for a, pa in acc.items():
                for b, pb in inner[i].items():
                    nxt[a + b] += pa * pb
            acc = nxt
        for value, p in acc.items():
            total[value / n] += p / n**n
    return total


def _exact_quantile(dist: Counter[Fraction], q: float) -> float:
    """The smallest support value whose CDF reaches ``q``, after checking no CDF jump lies within 0.004 of ``q``."""
    cdf = 0.0
    for value in sorted(dist):
        before, cdf = cdf, cdf + float(dist[value])
        if cdf >= q:
            assert q - before > 0.004 and cdf - q > 0.004, "the hand-worked case must not sit on a CDF jump"
            return float(value)
    raise AssertionError("unreachable")


def test_percentile_interval_hand_worked() -> None:
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    assert percentile_interval(np.arange(11.0), 0.5) == pytest.approx((2.5, 7.5))  # linear between order stats
    assert percentile_interval([1.0, math.nan, 3.0], 0.5) == pytest.approx((1.5, 2.5))  # NaN draws ignored
    assert all(math.isnan(x) for x in percentile_interval([math.nan, math.nan]))


def test_one_level_bootstrap_matches_the_enumerated_distribution() -> None:
    values = [0, 1, 3, 9]  # 4^4 equally likely resamples
    dist = _inner(values)
    iv = bootstrap_mean(values, n_resamples=DRAWS, seed=3)
    assert iv.mean == pytest.approx(13 / 4)
    assert iv.low == pytest.approx(_exact_quantile(dist, 0.025))  # 0.5 (5 % would give 0.75)
    assert iv.high == pytest.approx(_exact_quantile(dist, 0.975))  # 7.0 (95 % would give 6.75)


def test_two_level_bootstrap_matches_the_enumerated_distribution() -> None:
    units = [[0, 4], [9, 9], [1, 6]]

    def figures(unit: list[int], rng: np.random.Generator | None) -> dict[str, float]:
        arr = np.asarray(unit, dtype=float)
        if rng is not None:
            arr = arr[resample_indices(rng, len(arr))]
        return {"mean": float(arr.mean())}

    dist = _exact_two_level(units)
    iv = two_level_bootstrap(units, figures, n_resamples=DRAWS, seed=5)["mean"]
    assert iv.mean == pytest.approx(29 / 6)
    # 4/3 and 9: resampling the subjects only (unit means 2, 9, 3.5) would give 2 as the low end; resampling the
    # samples only would never reach 9
    assert iv.low == pytest.approx(_exact_quantile(dist, 0.025))
    assert iv.high == pytest.approx(_exact_quantile(dist, 0.975))


def test_one_level_percentile_agrees_with_scipy() -> None:
    from scipy.stats import bootstrap

    values = np.random.default_rng(0).normal(size=30)
    ours = bootstrap_mean(values, n_resamples=DRAWS, seed=1)
    theirs = bootstrap((values,), np.mean, method="percentile", n_resamples=DRAWS,
                       random_state=np.random.default_rng(2)).confidence_interval
    spread = values.std() / math.sqrt(len(values))
    assert ours.low == pytest.approx(theirs.low, abs=0.05 * spread)
    assert ours.high == pytest.approx(theirs.high, abs=0.05 * spread)


def test_paired_difference_resamples_both_sides_jointly() -> None:
    rng = np.random.default_rng(1)
    frozen = rng.uniform(0.2, 0.9, size=12)
    nearid = frozen + 0.05  # every subject gains exactly 0.05

    def figures(i: int, _: np.random.Generator | None) -> dict[str, float]:
        return {"nearid": nearid[i], "frozen": frozen[i], "nearid_minus_frozen": nearid[i] - frozen[i]}

    out = two_level_bootstrap(list(range(12)), figures, n_resamples=500)
    diff = out["nearid_minus_frozen"]
    assert diff.low == pytest.approx(0.05) and diff.high == pytest.approx(0.05)  # independent draws would spread
    assert out["nearid"].high - out["nearid"].low > 0.05


def test_bootstrap_is_deterministic_and_nan_safe() -> None:
    values = [0.3, math.nan, 0.5, 0.9, math.nan, 0.1]
    a, b = bootstrap_mean(values, n_resamples=300, seed=7), bootstrap_mean(values, n_resamples=300, seed=7)
    assert a == b
    assert bootstrap_mean(values, n_resamples=300, seed=8) != a
    assert a.mean == pytest.approx(0.45) and 0.1 <= a.low <= a.mean <= a.high <= 0.9
    nan = bootstrap_mean([math.nan, math.nan], n_resamples=50)
    assert all(math.isnan(x) for x in (nan.mean, nan.low, nan.high))
    assert isinstance(a, Interval) and a.as_dict() == {"mean": a.mean, "low": a.low, "high": a.high}


def test_bad_arguments_raise_naming_them() -> None:
    with pytest.raises(ValueError, match="confidence must be in"):
        bootstrap_mean([1.0], confidence=95)
    with pytest.raises(ValueError, match="n_resamples must be an int"):
        bootstrap_mean([1.0], n_resamples=0)
    with pytest.raises(ValueError, match="at least one unit"):
        two_level_bootstrap([], lambda u, r: {})
