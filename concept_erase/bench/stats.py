"""Bootstrap confidence intervals for the benchmark's means and paired differences.

Percentile bootstrap (Efron): resample the units with replacement, take the mean of each resample, and
read the interval off the resampled means' quantiles. The unit is a run (a concept and a seed): a run's
own figure already carries its images' sampling noise, so resampling runs covers both the seed-to-seed
and the image-to-image variation. Differences between two methods are resampled in pairs (the same
concept and seed), which removes the concepts' own spread from the comparison.

Written here rather than taken from scipy (`scipy.stats.bootstrap`): scipy is not otherwise needed,
and these few lines are deterministic for a given seed, which the report's reruns rely on.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 4000
LEVEL = 0.95


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


def paired_difference_ci(a, b, **kwargs) -> tuple[float, float] | None:
    """The interval of mean(a - b) over pairs (a[i], b[i]) resampled together."""
    if len(a) != len(b):
        raise ValueError("paired values must come in equal numbers")
    return mean_ci([x - y for x, y in zip(a, b)], **kwargs)
