"""Percentile-bootstrap intervals for the benchmark's averaged figures (subjects, and samples within subjects).

Every averaged figure of the personalisation study is a mean over subjects of a per-subject figure, and most
per-subject figures are themselves computed from per-sample values (a checkpoint's true identity is the mean over its
16 rendered samples; a Spearman correlation ranks those means across checkpoints). Both levels are random: the
subjects are a sample of identities, and the rendered samples are a sample of seeds. The intervals here resample
both (a *two-level* bootstrap):

1. draw ``n`` subjects with replacement from the ``n`` subjects;
2. for every drawn subject, let it redraw its own samples with replacement and recompute its figures
   (the caller's ``figures(unit, rng)``; with ``rng=None`` it returns the figures of the data as measured);
3. average each figure over the drawn subjects (NaN-skipping: a subject whose Spearman is undefined is left out).

The 95 % interval is the 2.5th and 97.5th percentile of the averages over ``n_resamples`` such draws (percentile
method, linear interpolation between order statistics as :func:`numpy.percentile`). A *paired* difference such as
"Spearman NearID - frozen" is one more per-subject figure (the difference computed inside each subject from the
same resampled samples), so both sides are resampled jointly and what they share cancels.

Everything is deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "Interval",
    "percentile_interval",
    "bootstrap_mean",
    "two_level_bootstrap",
    "resample_indices",
    "nanmean",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Interval:
    """A figure and its bootstrap interval: ``low <= mean <= high`` unless the figure is undefined (all NaN)."""

    mean: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high}

    def bounds(self) -> list[float]:
        return [self.low, self.high]


def nanmean(values: Sequence[float] | np.ndarray) -> float:
    """Mean of the finite values; NaN when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return float(finite.mean()) if finite.size else math.nan


def _check(confidence: float, n_resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be an int >= 1, got {n_resamples!r}")


def percentile_interval(distribution: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of a bootstrap distribution (NaN draws ignored).

    Args:
        distribution: ``[R]`` values of the statistic over the resamples.
        confidence: e.g. 0.95 for the 2.5th and 97.5th percentiles.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when no draw is finite.

    Example:
        >>> percentile_interval(np.arange(11.0), 0.5)
        (2.5, 7.5)
    """
    _check(confidence, 1)
    arr = np.asarray(distribution, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return (math.nan, math.nan)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return (float(low), float(high))


def resample_indices(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` indices drawn uniformly with replacement from ``range(n)``: ``[n]`` int64."""
    return rng.integers(0, n, size=n)


def bootstrap_mean(values: Sequence[float] | np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> Interval:
    """One-level percentile bootstrap of a mean (NaN values are skipped in every mean).

    Args:
        values: ``[n]`` per-unit values (e.g. one figure per subject).
        n_resamples: bootstrap draws.
        confidence: interval coverage.
        seed: seeds the draws.

    Example:
        >>> iv = bootstrap_mean([0.1, 0.2, 0.3, 0.4], n_resamples=500)
        >>> iv.low <= iv.mean <= iv.high
        True
    """
    arr = np.asarray(values, dtype=np.float64)
    return two_level_bootstrap(list(arr), lambda v, rng: {"value": float(v)}, n_resamples=n_resamples,
                               confidence=confidence, seed=seed)["value"]


def two_level_bootstrap(
    units: Sequence[T],
    figures: Callable[[T, np.random.Generator | None], Mapping[str, float]],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Percentile intervals of the mean over units of each per-unit figure, resampling units and within units.

    Args:
        units: the ``n`` units (subjects), in any form ``figures`` reads.
        figures: ``figures(unit, rng)`` returns the unit's figures by name. With ``rng=None`` it returns them for the
            data as measured; with a generator it first redraws the unit's own samples with it (e.g. with
            :func:`resample_indices`) and recomputes them (return the unresampled figures to get a one-level
            bootstrap). Every unit should return the same names; a missing name counts as NaN.
        n_resamples: bootstrap draws.
        confidence: interval coverage (0.95: the 2.5th and 97.5th percentiles).
        seed: seeds every draw; the same inputs and seed give the same intervals.

    Returns:
        Per figure name, the :class:`Interval` whose ``mean`` is the NaN-skipping mean over the units as measured.

    Example:
        >>> units = [np.array([0.2, 0.4]), np.array([0.5, 0.7]), np.array([0.9, 0.9])]
        >>> def fig(u, rng):
        ...     u = u if rng is None else u[resample_indices(rng, len(u))]
        ...     return {"mean": float(u.mean())}
        >>> iv = two_level_bootstrap(units, fig, n_resamples=200)["mean"]
        >>> round(iv.mean, 3), iv.low <= iv.mean <= iv.high
        (0.6, True)
    """
    _check(confidence, n_resamples)
    n = len(units)
    if n == 0:
        raise ValueError("units must hold at least one unit, got none")
    measured = [dict(figures(u, None)) for u in units]
    names = sorted({k for m in measured for k in m})
    point = {k: nanmean([m.get(k, math.nan) for m in measured]) for k in names}
    rng = np.random.default_rng([seed, 1818])
    draws = np.full((n_resamples, len(names)), math.nan)
    for r in range(n_resamples):
        chosen = resample_indices(rng, n)
        rows = [figures(units[int(i)], rng) for i in chosen]
        for j, k in enumerate(names):
            draws[r, j] = nanmean([row.get(k, math.nan) for row in rows])
    out: dict[str, Interval] = {}
    for j, k in enumerate(names):
        low, high = percentile_interval(draws[:, j], confidence)
        out[k] = Interval(point[k], low, high)
    return out


def jsonable(intervals: Mapping[str, Interval]) -> dict[str, Any]:
    """``{name: [low, high]}`` for a JSON report."""
    return {k: v.bounds() for k, v in intervals.items()}
