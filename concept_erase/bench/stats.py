"""Confidence intervals for the benchmark's means, rates, paired differences and ratios.

Means, differences and ratios: percentile bootstrap (Efron). Resample the units with replacement, take the
statistic of each resample, and read the interval off the resampled statistics' quantiles. Runs of one concept
are not independent (their seeds share the concept's difficulty), so where the runs' concepts are given the unit
is the concept: a resample draws concepts with replacement and takes every run of each (the cluster bootstrap);
with a single concept it falls back to resampling runs, and the interval then speaks of that concept alone. A
run's own figure already carries its images' sampling noise. Differences and ratios between two methods are
resampled in pairs (the same concept and seed), which removes the concepts' own spread from the comparison.

Rates (k successes in n trials: runs that met a target, images that still show the concept): the exact
Clopper-Pearson interval, from scipy (`binomtest(...).proportion_ci(method="exact")`), which holds its level
for any n, 0 and n included: 18 of 18 is [0.81, 1], not [1, 1].

The bootstraps are written here rather than taken from `scipy.stats.bootstrap`, which has no cluster
resampling; these few lines are deterministic for a given seed, which the report's reruns rely on.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

RESAMPLES = 4000
LEVEL = 0.95


def mean(xs) -> float:
    """The mean of the values given, None and NaN left out; NaN when none is left."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else float("nan")


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float] | None:
    """The exact interval of a rate of k in n (None for n = 0)."""
    from scipy.stats import binomtest

    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"a rate of {k} in {n} is not one")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def _cluster_sums(values: np.ndarray, clusters) -> tuple[np.ndarray, np.ndarray] | None:
    """Per cluster: the sum of its values and its count (None: fewer than two clusters)."""
    names = sorted(set(clusters), key=str)
    if len(names) < 2:
        return None
    index = np.asarray([names.index(c) for c in clusters])
    return np.bincount(index, weights=values, minlength=len(names)), np.bincount(index, minlength=len(names))


def _picks(k: int, resamples: int, seed: int) -> np.ndarray:
    """Which of k clusters (or units) each resample draws, with replacement: [resamples, k]."""
    return np.random.default_rng(seed).integers(0, k, size=(resamples, k))


def _interval(stats_: np.ndarray, level: float) -> tuple[float, float] | None:
    stats_ = stats_[~np.isnan(stats_)]
    if stats_.size == 0:
        return None
    lo, hi = np.quantile(stats_, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _keep(values, clusters):
    """Values that are numbers, with their clusters."""
    kept = [(float(v), c) for v, c in zip(values, clusters)
            if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return np.asarray([v for v, _ in kept], dtype=np.float64), [c for _, c in kept]


def cluster_mean_ci(values, clusters, *, resamples: int = RESAMPLES, level: float = LEVEL,
                    seed: int = 0) -> tuple[float, float] | None:
    """The interval of the mean of `values`, resampling their clusters (concepts) whole: a resample's mean is the
    sum of its drawn clusters' values over their count. None for no value."""
    xs, cs = _keep(values, clusters)
    if xs.size == 0:
        return None
    sums = _cluster_sums(xs, cs)
    if sums is None:
        return mean_ci(xs, resamples=resamples, level=level, seed=seed)
    total, count = sums
    picks = _picks(len(total), resamples, seed)
    return _interval(total[picks].sum(1) / count[picks].sum(1), level)


def cluster_ratio_ci(a, b, clusters, *, resamples: int = RESAMPLES, level: float = LEVEL,
                     seed: int = 0) -> tuple[float, float] | None:
    """The interval of mean(a) / mean(b) over pairs (a[i], b[i]) resampled together, by cluster (by pair where
    there is one cluster)."""
    if not len(a) == len(b) == len(clusters):
        raise ValueError("paired values must come in equal numbers")
    if not a:
        return None
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    sa, sb = _cluster_sums(xa, list(clusters)), _cluster_sums(xb, list(clusters))
    if sa is None:
        sa, sb = (xa, np.ones_like(xa)), (xb, np.ones_like(xb))
    picks = _picks(len(sa[0]), resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _interval(sa[0][picks].sum(1) / sb[0][picks].sum(1), level)


def _clean(values) -> np.ndarray:
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return np.asarray(xs, dtype=np.float64)


def mean_ci(values, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> tuple[float, float] | None:
    """The `level` percentile-bootstrap interval of the mean of `values` (None and NaN left out).

    None for no value; a single value gives the zero-width interval at it (nothing to resample: the
    report says how many runs a mean is over).
    """
    xs = _clean(values)
    if xs.size == 0:
        return None
    if not 0.0 < level < 1.0:
        raise ValueError("the confidence level must be in (0, 1)")
    rng = np.random.default_rng(seed)
    means = xs[rng.integers(0, xs.size, size=(resamples, xs.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference_ci(a, b, clusters=None, **kwargs) -> tuple[float, float] | None:
    """The interval of mean(a - b) over pairs (a[i], b[i]) resampled together (by cluster where given)."""
    if len(a) != len(b):
        raise ValueError("paired values must come in equal numbers")
    diffs = [x - y for x, y in zip(a, b)]
    if clusters is not None:
        return cluster_mean_ci(diffs, clusters, **kwargs)
    return mean_ci(diffs, **kwargs)


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (ties get their mean rank); None when either side does not vary."""
    from scipy.stats import spearmanr

    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.size < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return None
    return float(spearmanr(xs, ys).statistic)


def cluster_spearman_ci(x, y, clusters, *, resamples: int = 2000, level: float = LEVEL,
                        seed: int = 0) -> tuple[float, float] | None:
    """The interval of Spearman's rank correlation of pairs (x[i], y[i]), resampling clusters whole (a run's points
    along its training are not independent of each other, nor a concept's runs)."""
    if not len(x) == len(y) == len(clusters):
        raise ValueError("paired values must come in equal numbers")
    names = sorted(set(clusters), key=str)
    if len(names) < 2:
        return None
    members = {c: [i for i, k in enumerate(clusters) if k == c] for c in names}
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    out = []
    for pick in _picks(len(names), resamples, seed):
        idx = [i for p in pick for i in members[names[p]]]
        r = spearman(xs[idx], ys[idx])
        out.append(np.nan if r is None else r)
    return _interval(np.asarray(out), level)
