"""The statistics behind the promises: p-values for calibration, confidence bounds for the audit.

Two losses, two tests. Agreement: the loss is 1[early exit's label != the full model's], a 0/1
loss, and its exact binomial test (`binomial_pvalue`) is the strongest valid one. Accuracy: the
loss is 1[early exit wrong] - 1[full depth wrong] in {-1, 0, 1} (gold labels needed), a paired
loss that can be negative; `paired_pvalue` tests its mean exactly from the discordant items
alone, which matters because most items are concordant (loss 0).
Every run's audit asks "how high can the risk be, given what this sample shows?" (a one-sided
upper confidence bound). Reports add a two-sided Wilson interval to every share they
print (`proportion`). Leaf module: numpy and, when present, scipy.
"""

from __future__ import annotations

import functools
import math

import numpy as np


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


# -- a paired loss in {-1, 0, 1}: the exact discordant-pairs test ------------------------------

# The share of delta spent on bounding the discordance rate (see `paired_pvalue`). Measured by
# simulation (n = 700 and 4,800, discordance 2-12%): power is flat from delta/20 to delta/5 and
# best near delta/10.
NUISANCE_SHARE = 0.1


@functools.lru_cache(maxsize=1 << 16)  # calibration asks the same counts for many rules
def paired_pvalue(worse: int, better: int, n: int, epsilon: float, gamma: float) -> float:
    """p-value of H0 "p_w - p_b >= epsilon" from n paired items, `worse` of them with loss +1 (early
    exit wrong, full depth right: probability p_w) and `better` with loss -1 (the reverse: p_b):
    H0 says early exit loses at least epsilon of accuracy. gamma: the part of the level spent on
    the discordance rate q = p_w + p_b (a nuisance), e.g. NUISANCE_SHARE * delta.

    The exact conditional test of discordant pairs (McNemar's, with a nuisance bound in the manner
    of Berger & Boos, 1994). Given m = worse + better discordant items, worse ~ Binom(m, pi) with
    pi = p_w / q, and H0 means pi >= (1 + epsilon / q) / 2. q is unknown: q_hi, the exact upper
    (1 - gamma) bound on q from m of n, replaces it, so under H0 and q <= q_hi, pi >= pi0 =
    (1 + epsilon / q_hi) / 2. The p-value is gamma + P(Binom(m, pi0) <= worse): P(p <= a) <= gamma
    (q above its bound) + (a - gamma) (the binomial test given m) = a, at every level a.

    Only the discordant items carry information, so the test is as sharp as the data allows when
    most items are concordant (early exit and full depth agree): at n = 4,800, 5% discordance and
    a true loss of 0.25 points, it accepts an epsilon = 1 point promise in 57% of draws, where
    the betting test this replaced (Waudby-Smith & Ramdas) accepted it in 22%.
    """
    q_hi = upper_bound(worse + better, n, 1.0 - gamma)
    if q_hi is None:
        return 1.0
    if epsilon >= q_hi:  # a loss of epsilon needs more discordant items than q <= q_hi allows
        return gamma
    return min(1.0, gamma + binomial_cdf(worse, worse + better, (1.0 + epsilon / q_hi) / 2.0))


def paired_loss_bound(worse: int, better: int, n: int, confidence: float = 0.95, tol: float = 1e-5) -> float:
    """One-sided upper confidence bound on the accuracy lost, p_w - p_b (see `paired_pvalue`): the
    smallest epsilon the test accepts at level 1 - confidence (test inversion; the p-value falls
    as epsilon rises). Never below 0: a bound under 0 would say nothing more to a promise."""
    alpha = 1.0 - confidence
    gamma = NUISANCE_SHARE * alpha
    lo, hi = 0.0, 1.0
    if paired_pvalue(worse, better, n, 0.0, gamma) <= alpha:
        return 0.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if paired_pvalue(worse, better, n, mid, gamma) <= alpha else (mid, hi)
    return hi


# -- Learn-then-Test ------------------------------------------------------------------------------


def fixed_sequence(pvalues, delta: float) -> int | None:
    """Fixed-sequence testing over hypotheses ordered before the data was seen (most conservative
    first): accept while p <= delta, stop at the first failure. Controls the family-wise error at
    delta with no correction for the number of hypotheses. Returns the index of the last accepted
    one, or None if the first already fails."""
    failed = np.flatnonzero(np.asarray(pvalues) > delta)
    stop = failed[0] if len(failed) else len(pvalues)  # candidates [0, stop) are accepted
    return int(stop) - 1 if stop > 0 else None


def largest_accepted_count(n: int, epsilon: float, delta: float) -> int:
    """The most losses among n items that the exact binomial test still accepts (-1: none)."""
    k = int(n * epsilon)
    while k >= 0 and binomial_pvalue(k, n, epsilon) > delta:
        k -= 1
    return k
