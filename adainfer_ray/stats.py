"""Exact binomial statistics: the calibration test and the audit's confidence bound.

Both answer questions about a share of disagreements between early exit and the full model:
calibration asks "is the risk above epsilon?" (a p-value), every run's audit asks "how high can
the risk be, given what this sample shows?" (a one-sided upper confidence bound). Reports add a
two-sided Wilson interval to every share they print (`proportion`). Leaf module: numpy and, when
present, scipy.
"""

from __future__ import annotations

import math


def _binom_cdf_logspace(k: int, n: int, p: float) -> float:
    """P(Binom(n, p) <= k) as a sum of exact terms in log space (lgamma), for when scipy is absent."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_choose = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k + 1)]
    logs = [c + i * math.log(p) + (n - i) * math.log1p(-p) for i, c in enumerate(log_choose)]
    top = max(logs)  # log-sum-exp: terms can be far below the smallest float
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


def binomial_cdf(k: int, n: int, p: float) -> float:
    try:
        from scipy.stats import binom
    except ImportError:
        return _binom_cdf_logspace(int(k), int(n), float(p))
    return float(binom.cdf(int(k), int(n), float(p)))


def binomial_pvalue(k: int, n: int, epsilon: float) -> float:
    """p-value of H0 "risk > epsilon" after seeing k losses in n items: P(Binom(n, epsilon) <= k).

    It is valid (P(p <= a) <= a under H0) because Binom(n, r) only grows stochastically with r.
    """
    return binomial_cdf(k, n, epsilon)


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float | None:
    """One-sided exact (Clopper-Pearson) upper confidence bound on a rate after k events in n trials:
    the largest p with P(Binom(n, p) <= k) >= 1 - confidence. None when n is 0.

    With 0 events it is 1 - (1 - confidence)^(1/n): 300 rows are the fewest that can show a rate
    below 1% at 95% confidence."""
    if n <= 0:
        return None
    if k >= n:
        return 1.0
    alpha = 1.0 - confidence
    try:
        from scipy.stats import beta

        return float(beta.ppf(confidence, k + 1, n - k))
    except ImportError:
        lo, hi = k / n, 1.0  # bisection on the monotone cdf
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _binom_cdf_logspace(k, n, mid) > alpha else (lo, mid)
        return hi


def lower_bound(k: int, n: int, confidence: float = 0.95) -> float | None:
    """One-sided exact lower confidence bound on a rate after k events in n trials (0 when k is 0)."""
    if n <= 0:
        return None
    if k <= 0:
        return 0.0
    return 1.0 - upper_bound(n - k, n, confidence)  # the bound on the complement, mirrored


def rows_to_confirm(epsilon: float, confidence: float = 0.95) -> int:
    """The fewest audited rows whose bound can fall below epsilon (when none disagrees)."""
    return math.ceil(math.log(1 - confidence) / math.log1p(-epsilon))


Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def ratio(numerator, denominator) -> float | None:
    """numerator / denominator as a plain float, or None when the denominator is 0 or missing."""
    if numerator is None or not denominator:
        return None
    return float(numerator) / float(denominator)


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion (95% by default); None when there are no trials.

    Chosen over the plain normal interval because audits are often small or near 100% agreement,
    where the normal interval leaves [0, 1] or collapses to a point.
    """
    if trials <= 0:
        return None
    p = successes / trials
    z2 = z * z
    center = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half_width = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, center - half_width), min(1.0, center + half_width)


def proportion(successes: int, trials: int) -> dict:
    """A proportion with its 95% Wilson interval, as it appears in summary.json."""
    interval = wilson_interval(successes, trials)
    return {
        "rows": int(trials),
        "successes": int(successes),
        "share": ratio(successes, trials),
        "ci95_low": interval[0] if interval else None,
        "ci95_high": interval[1] if interval else None,
        "interval": "wilson",
    }

