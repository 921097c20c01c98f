"""The accuracy promise's test: the exact discordant-pairs p-value for a loss in {-1, 0, 1},
checked by simulation at the promise's edge, against the naive test that the same check fails."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from adainfer_ray import stats

EPS, DELTA, REPS = 0.01, 0.05, 4000
GAMMA = stats.NUISANCE_SHARE * DELTA
SLACK = 3 * math.sqrt(DELTA * (1 - DELTA) / REPS)  # Monte Carlo error of a rejection rate at delta


def draws(n, share_worse, share_better, reps=REPS, seed=0):
    """reps synthetic test parts of n items, as counts: (worse [reps], better [reps]): loss +1
    (early exit wrong, full depth right) with probability share_worse, -1 with share_better."""
    counts = np.random.default_rng(seed).multinomial(n, [share_worse, share_better, 1 - share_worse - share_better],
                                                     size=reps)
    return counts[:, 0], counts[:, 1]


def pvalues(n, worse, better):
    return np.array([stats.paired_pvalue(int(w), int(b), n, EPS, GAMMA) for w, b in zip(worse, better)])


def clt_pvalue(n, worse, better, epsilon):
    """The naive test: a normal approximation to the mean loss. Not valid at small n with rare losses."""
    mean = (worse - better) / n
    sd = np.sqrt(np.maximum((worse + better) / n - mean**2, 0) * n / (n - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sd > 0, (mean - epsilon) / (sd / np.sqrt(n)), -np.inf)
    return norm.cdf(z)


# At the promise's edge: the true loss is exactly epsilon, with realistic shares of discordant items.
EDGE = [(60, 0.02, 0.01), (300, 0.04, 0.03), (1000, 0.015, 0.005), (1000, 0.06, 0.05), (4800, 0.03, 0.02),
        (700, 0.0101, 0.0001)]


@pytest.mark.parametrize("n,worse,better", EDGE)
def test_the_paired_pvalue_accepts_a_broken_promise_at_most_delta_of_the_time(n, worse, better):
    assert worse - better == pytest.approx(EPS)
    p = pvalues(n, *draws(n, worse, better))
    assert (p <= DELTA).mean() <= DELTA + SLACK
    assert (p <= 2 * GAMMA).mean() <= 2 * GAMMA + 3 * math.sqrt(2 * GAMMA / REPS)  # valid at a smaller level too


def test_the_simulation_catches_an_invalid_test():
    # The same check fails the normal approximation at small n: most draws show no discordant item
    # at all (sd 0), and it then accepts a promise that is broken.
    worse, better = draws(60, 0.02, 0.01)
    assert (clt_pvalue(60, worse, better, EPS) <= DELTA).mean() > DELTA + SLACK


def test_the_paired_pvalue_has_power_when_early_exit_loses_little():
    # true loss 0 (as many items fixed as broken) is well inside eps = 1 point on 2,000 items
    assert (pvalues(2000, *draws(2000, 0.01, 0.01, reps=400)) <= DELTA).mean() > 0.5
    # 0.25 points lost, 5% discordant, 4,800 items (a calibration's test part): accepted more often than not
    assert (pvalues(4800, *draws(4800, 0.02625, 0.02375, reps=400)) <= DELTA).mean() > 0.5
    # and with no discordant item at all, 600 items suffice
    assert stats.paired_pvalue(0, 0, 600, EPS, GAMMA) <= DELTA


def test_the_loss_bound_inverts_the_test():
    bound = stats.paired_loss_bound(40, 20, 2000)
    assert 0.01 < bound < 0.03  # observed loss 1 point
    assert stats.paired_pvalue(40, 20, 2000, bound, stats.NUISANCE_SHARE * 0.05) <= 0.05
    assert stats.paired_pvalue(40, 20, 2000, bound - 1e-3, stats.NUISANCE_SHARE * 0.05) > 0.05
