"""The accuracy promise's test: a betting p-value for a loss in {-1, 0, 1}, checked by simulation."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from adainfer_ray import stats

EPS, DELTA, REPS = 0.01, 0.05, 2000
SLACK = 3 * math.sqrt(DELTA * (1 - DELTA) / REPS)  # Monte Carlo error of a rejection rate at delta


def draws(n, share_worse, share_better, reps=REPS, seed=0):
    """reps synthetic test parts of n items: loss +1 (early exit wrong, full depth right) with
    probability share_worse, -1 (the other way round) with share_better, else 0."""
    rng = np.random.default_rng(seed)
    return rng.choice([1.0, -1.0, 0.0], size=(reps, n), p=[share_worse, share_better, 1 - share_worse - share_better])


def clt_pvalue(losses, epsilon):
    """The naive test: a normal approximation to the mean. Not valid at small n with rare losses."""
    mean, sd = losses.mean(1), losses.std(1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sd > 0, (mean - epsilon) / (sd / np.sqrt(losses.shape[1])), -np.inf)
    return norm.cdf(z)


# At the promise's edge: the true mean is exactly epsilon, with realistic shares of discordant items.
EDGE = [(60, 0.02, 0.01), (300, 0.04, 0.03), (1000, 0.015, 0.005), (1000, 0.06, 0.05)]


@pytest.mark.parametrize("n,worse,better", EDGE)
def test_betting_pvalue_accepts_a_broken_promise_at_most_delta_of_the_time(n, worse, better):
    assert worse - better == pytest.approx(EPS)
    p = stats.betting_pvalue(draws(n, worse, better), EPS, seed=1)
    assert (p <= DELTA).mean() <= DELTA + SLACK


def test_the_simulation_catches_an_invalid_test():
    # The same check fails the normal approximation at small n: most draws show no discordant item
    # at all (sd 0), and it then accepts a promise that is broken.
    p = clt_pvalue(draws(60, 0.02, 0.01), EPS)
    assert (p <= DELTA).mean() > DELTA + SLACK


def test_betting_pvalue_has_power_when_early_exit_loses_nothing():
    # true mean 0 (as many items fixed as broken) is well inside eps = 1 point on 2,000 items
    p = stats.betting_pvalue(draws(2000, 0.01, 0.01, reps=200), EPS, seed=1)
    assert (p <= DELTA).mean() > 0.5
    # and with no discordant item at all, 600 items suffice
    assert stats.betting_pvalue(np.zeros((1, 600)), EPS)[0] <= DELTA


def test_betting_pvalue_is_one_per_candidate_and_checks_its_range():
    p = stats.betting_pvalue(np.stack([np.zeros(500), np.ones(500)]), EPS)
    assert p.shape == (2,) and p[0] < 0.05 and p[1] == 1.0
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        stats.betting_pvalue(np.array([2.0, 0.0]), EPS)
