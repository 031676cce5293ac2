"""Paired statistics over a handful of seeds: a bootstrap interval of the mean difference, an exact sign test and
the verdict they give.

Each seed pairs a variant with its reference (same initial weights and batch order), so the unit of evidence is
one per-seed difference. Neither statistic assumes normality; both are honest about how little 3 seeds can say:
the percentile bootstrap interval of 3 differences is their range (a resample of one value thrice has
probability 1/27 > 2.5%), and the sign test's p cannot go below 2 / 2**n (0.25 at 3 seeds).
"""

import math

import numpy as np


def _values(xs) -> np.ndarray:
    """The values present as floats: None and NaN (a missing metric) dropped."""
    x = np.array([v for v in xs if v is not None], dtype=float)
    return x[~np.isnan(x)]


def paired_bootstrap(
    diffs, n_resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of the per-seed paired differences and its percentile bootstrap interval at
    `level`, from `n_resamples` resamples of the seeds with replacement.

    None and NaN values are dropped first. The RNG is seeded with `seed`, so the same input gives the same
    interval byte for byte. With fewer than 2 values there is nothing to resample: (the one value or nan, nan,
    nan).
    """
    if not 0 < level < 1 or n_resamples < 1:
        raise ValueError(f"level must be in (0, 1) and n_resamples >= 1, got {level}, {n_resamples}")
    d = _values(diffs)
    mean = float(d.mean()) if len(d) else math.nan
    if len(d) < 2:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_resamples, len(d)))].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return mean, float(lo), float(hi)


def sign_test(diffs) -> float:
    """Exact two-sided sign-test p-value: under "no difference" each non-zero difference is positive with
    probability 1/2, so the count of positives is binomial(n, 1/2) over the n non-zero differences.

    Ties (differences of exactly 0), None and NaN are dropped; with no non-zero difference p = 1.0.
    """
    d = _values(diffs)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    n = pos + neg
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(pos, neg) + 1))  # the rarer sign's count or fewer
    return min(1.0, 2 * tail / 2**n)  # int / int is correctly rounded, even for large n


def verdict(lo: float, hi: float, lower_is_better: bool) -> str:
    """ "better", "worse" or "no difference" for an interval [lo, hi] of (variant - reference) of a metric where
    lower (or higher) is better: "no difference" whenever the interval contains 0 or is unknown (nan/None)."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi) or lo <= 0 <= hi:
        return "no difference"
    higher = lo > 0
    return "worse" if higher == lower_is_better else "better"
