"""The statistics behind the promises: p-values for calibration, confidence bounds for the audit.

Two losses, two tests. Agreement: the loss is 1[early exit's label != the full model's], a 0/1
loss, and its exact binomial test (`binomial_pvalue`) is the strongest valid one. Accuracy: the
loss is 1[early exit wrong] - 1[full depth wrong] in {-1, 0, 1} (gold labels needed), a bounded
loss that can be negative; `betting_pvalue` tests its mean by testing by betting (Waudby-Smith &
Ramdas, 2023), whose variance-adaptive bets matter here because most items are concordant (loss 0).
Every run's audit asks "how high can the risk be, given what this sample shows?" (a one-sided
upper confidence bound). Reports add a two-sided Wilson interval to every share they
print (`proportion`). Leaf module: numpy and, when present, scipy.
"""

from __future__ import annotations

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


# -- a bounded loss in [-1, 1]: testing by betting ------------------------------------------------

# Bets are capped at BET_CAP / (1 - epsilon): a wealth factor 1 + lambda (epsilon - loss) stays
# >= 1 - BET_CAP > 0 even at loss 1, so one bad item can never wipe the wealth out.
BET_CAP = 0.75


def betting_log_wealth(losses: np.ndarray, epsilon: float, cap: float = BET_CAP) -> np.ndarray:
    """The log of the bettor's wealth after each item, against H0 "E[loss] >= epsilon": losses
    [K, n] in [-1, 1] (K candidates, items in the order they are revealed) -> log wealth [K, n]
    (kept as a log: a long run of concordant items grows the wealth past float range).

    K_t = prod_{i<=t} (1 + lambda_i (epsilon - loss_i)). Under H0 each factor has mean <= 1 for any
    lambda_i >= 0 fixed before item i is seen, so K is a non-negative supermartingale. lambda_i is
    aGRAPA's (Waudby-Smith & Ramdas, 2023, sec. 5): the running mean of the payoff epsilon - loss
    over its running second moment (the Kelly bet's second-order approximation), with a weak prior
    so the first bets are small, clipped to [0, cap / (1 - epsilon)). It bets big only when past
    items were mostly concordant, which is where a variance-adaptive bet wins over Hoeffding.
    """
    x = epsilon - np.atleast_2d(np.asarray(losses, np.float64))  # [K, n] payoffs
    K, n = x.shape
    prior_n, prior_m, prior_v = 1.0, 0.0, 1.0  # as if one item with payoff mean 0, second moment 1 had come
    count = prior_n + np.arange(n)  # items seen before item t (plus the prior)
    past_sum = np.concatenate([np.zeros((K, 1)), np.cumsum(x, 1)[:, :-1]], 1) + prior_m
    past_sq = np.concatenate([np.zeros((K, 1)), np.cumsum(x**2, 1)[:, :-1]], 1) + prior_v
    mean, second = past_sum / count, past_sq / count
    lam = np.clip(mean / np.maximum(second, 1e-12), 0.0, cap / (1.0 - epsilon))  # predictable: past items only
    return np.cumsum(np.log1p(lam * x), 1)


def betting_pvalue(losses, epsilon: float, seed: int = 0, cap: float = BET_CAP) -> np.ndarray:
    """p-values of H0 "E[loss] >= epsilon" for K candidates, losses [K, n] (or [n]) in [-1, 1] on the
    same n items: min(1, 1 / max_t K_t) (Ville's inequality: P(max_t K_t >= 1/a) <= a under H0).

    The items are revealed in one seeded random order (the same for every candidate): the bound
    is valid in any order fixed before the losses are seen, and a random one keeps a sorted input
    (say, by length) from steering the bets.
    """
    losses = np.atleast_2d(np.asarray(losses, np.float64))
    if losses.shape[1] == 0:
        return np.ones(losses.shape[0])
    if losses.min() < -1 or losses.max() > 1:
        raise ValueError("betting_pvalue needs losses in [-1, 1]")
    order = np.random.default_rng(seed).permutation(losses.shape[1])
    log_wealth = betting_log_wealth(losses[:, order], epsilon, cap)
    return np.exp(-np.maximum(log_wealth.max(1), 0.0))  # min(1, 1 / max_t K_t)


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
