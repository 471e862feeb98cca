"""Means, confidence intervals and paired differences: which differences between settings are real.

Pure functions over arrays of per-repeat (or per-query) values. Intervals are Student-t intervals of the mean,
``mean +- t_{0.975, n-1} * sd / sqrt(n)``; a paired difference is the interval of the per-repeat differences
(same split, same mask), so split-to-split noise shared by both variants cancels.
"""

from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95
HOLDS, REVERSED, NOISE, UNKNOWN = "holds", "reversed", "within noise", "unknown"


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """t_{(1+c)/2, n-1}: the half-width multiplier of a mean's interval over n values."""
    from scipy.stats import t

    return float(t.ppf((1 + confidence) / 2, n - 1))


def mean_ci(values) -> tuple[float, float]:
    """Mean and 95% half-width of the values (NaNs dropped); half-width NaN with fewer than two values."""
    v = np.asarray([x for x in np.asarray(values, np.float64).ravel() if math.isfinite(x)])
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), t_quantile(v.size) * float(v.std(ddof=1)) / math.sqrt(v.size)


def paired(a, b) -> tuple[float, float, int]:
    """Mean and 95% half-width of a - b over the pairs where both are finite, and how many pairs there were."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    mean, ci = mean_ci(a[ok] - b[ok])
    return mean, ci, int(ok.sum())


def verdict(diff: float, ci: float, higher_is_better: bool = True) -> str:
    """Whether "a beats b" holds (the interval excludes 0 on the better side), is reversed, or is noise."""
    if not math.isfinite(diff) or not math.isfinite(ci):
        return UNKNOWN
    better = diff if higher_is_better else -diff
    if better - ci > 0:
        return HOLDS
    if better + ci < 0:
        return REVERSED
    return NOISE
