"""Choosing one exit rule on calibration's fit part (step 3 of calibrate.py's Learn then Test).

Every candidate rule (feature mode x with or without history x rule family, weights and
min_layer) gets thresholds from its scores on the fit part, and a value: the FLOPs it saves at
the loss the test part will likely accept (`fit_value`). The chosen rule is the simplest whose
value is within one bootstrap standard error of the best (`simplest_within_noise`). Nothing here
looks at the test part, so the guarantee never depends on how well this aims.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from adainfer_ray.exits import item_flops_saved, rule_decisions, rule_outcomes
from adainfer_ray.policy import ExitPolicy
from adainfer_ray.rules import candidate_rules, candidate_thresholds
from adainfer_ray.stats import NUISANCE_SHARE, largest_accepted_count, paired_pvalue

# ----------------------------------------------------------------------------------------------
# Losses, and what the test part will tolerate


@functools.lru_cache(maxsize=None)  # asked once per candidate rule with the same (n, epsilon, delta)
def tolerated_rate(n: int, epsilon: float, delta: float) -> float:
    """The largest disagreement share among n items that the binomial test still accepts: where
    Learn-then-Test will land, so the fit part aims its choice of rule there."""
    return max(largest_accepted_count(n, epsilon, delta), 0) / n


def fit_tolerates(losses_fit: np.ndarray, promise: str, n_test: int, epsilon: float, delta: float) -> np.ndarray:
    """Which thresholds' fit-part losses [m, K] the test part (n_test items) would likely accept [K]:
    the test itself, on the fit part's rates scaled to n_test items. Only aims the choice of rule
    on the fit part: the guarantee never depends on it."""
    if promise == "agreement":
        return losses_fit.mean(0) <= tolerated_rate(n_test, epsilon, delta)
    worse = np.rint((losses_fit > 0).mean(0) * n_test).astype(int)
    better = np.rint((losses_fit < 0).mean(0) * n_test).astype(int)
    return np.array([paired_pvalue(int(w), int(b), n_test, epsilon, NUISANCE_SHARE * delta) <= delta
                     for w, b in zip(worse, better)])


def item_losses(answers: np.ndarray, final: np.ndarray, gold: np.ndarray | None, promise: str) -> np.ndarray:
    """Each item's loss at every threshold: answers [m, K] at exit, final [m], gold [m] -> [m, K].
    agreement: 1[exit answer != full depth's]; accuracy: 1[exit wrong] - 1[full depth wrong]."""
    if promise == "agreement":
        return (answers != final[:, None]).astype(np.float64)
    return (answers != gold[:, None]).astype(np.float64) - (final != gold)[:, None]


# ----------------------------------------------------------------------------------------------
# Candidates and their value on the fit part


# Rules that must beat a simpler one by more than the fit part's noise to be chosen (`choose_rule`).
BOOTSTRAP_DRAWS = 40


@dataclass
class Candidate:
    rule: ExitPolicy  # unthresholded
    thresholds: np.ndarray  # [K] from the fit part, most conservative first
    fit_saved: float  # FLOPs saved on the fit part at the loss the test part will likely accept
    source: str = "fit"  # "fit": learned on the fit part; "prior": learned elsewhere (see `calibrate`)
    item_saved: np.ndarray | None = None  # [m, K] each fit item's FLOPs saved at every threshold
    item_full: np.ndarray | None = None  # [m] each fit item's full-depth FLOPs
    item_losses: np.ndarray | None = None  # [m, K] each fit item's loss (0 for items the promise ignores)
    scored: np.ndarray | None = None  # [m] the fit items the promise is about

    @property
    def complexity(self) -> int:
        """What a rule learned on the fit part adds to top/gap/depth: history, an RBF SVM. A prior
        was learned elsewhere, so the fit part cannot have flattered its form."""
        if self.source == "prior":
            return 0
        return int(self.rule.history) + int(self.rule.kernel == "rbf")

    def value(self, draw: np.ndarray, tolerates) -> float:
        """fit_saved on a resample of the fit part (draw: item positions, with repeats)."""
        scored = self.scored[draw]
        ok = tolerates(self.item_losses[draw][scored])
        saved = self.item_saved[draw].sum(0) / self.item_full[draw].sum()
        return float(saved[ok].max()) if ok.any() else 0.0


def fit_value(rule, features, ctx, fit_idx, scored_fit, num_thresholds, source="fit") -> Candidate:
    """One rule on the fit part: its thresholds (fit-part quantiles) and the FLOPs it saves at the
    loss the test part will likely accept. features: (labels, top, gap) [n, L] as this rule reads them."""
    labels, top, gap = features
    used, full_reuse = ctx["costs"](rule.features, rule.first_read_layer)
    dec = rule_decisions(rule, fit_idx, labels, top, gap)
    thresholds = candidate_thresholds(dec, rule.min_layer, num_thresholds)
    exits, answers = rule_outcomes(rule, thresholds, fit_idx, labels, top, gap, ctx["final"], dec)
    item_saved = item_flops_saved(exits, used[fit_idx], full_reuse[fit_idx])
    saved = item_saved.sum(0) / full_reuse[fit_idx].sum()
    losses = np.zeros(answers.shape)
    sub = fit_idx[scored_fit]
    losses[scored_fit] = item_losses(answers[scored_fit], ctx["final"][sub], ctx["gold"][sub], ctx["promise"])
    ok = ctx["tolerates"](losses[scored_fit])
    return Candidate(rule, thresholds, float(saved[ok].max()) if ok.any() else -np.inf, source,
                     item_saved, full_reuse[fit_idx], losses, scored_fit)


def simplest_within_noise(candidates: list[Candidate], tolerates, seed: int = 0) -> Candidate:
    """The least complex candidate whose fit-part saving is within one bootstrap standard error of
    the best one's (the "one standard error" rule), the larger saving among equals.

    Why: a few hundred fit items measure each rule's saving at the loss the test part will accept
    from a handful of disagreements, so the largest of many candidates' savings is mostly luck, and
    rules with more freedom (history, an RBF SVM) win that lottery more often. Measured on 12 draws
    of 1,000 SST-2 phrases (eps 2%), choosing the plain maximum among all candidates skipped 29.7%
    of layers outside the sample, the linear rules without history alone 32.3%. A richer rule is
    chosen when it beats the simpler ones by more than the fit part's noise, as with more fit data."""
    top = max(candidates, key=lambda c: c.fit_saved)
    draws = np.random.default_rng(seed).integers(0, len(top.scored), (BOOTSTRAP_DRAWS, len(top.scored)))
    top_values = np.array([top.value(d, tolerates) for d in draws])

    def close_enough(c):
        if c is top:
            return True
        if not np.isfinite(c.fit_saved):
            return False
        gaps = top_values - np.array([c.value(d, tolerates) for d in draws])
        return top.fit_saved - c.fit_saved <= gaps.std()

    return min((c for c in candidates if close_enough(c)), key=lambda c: (c.complexity, -c.fit_saved))


def choose_rule(modes, history_options, score, ctx, fit_idx, scored_fit, num_thresholds, svm, log,
                prior=None, seed=0):
    """The candidate (mode x history x rule family, or the prior rule) chosen on the fit part: the
    simplest whose saving at the loss the test part will tolerate is within noise of the best
    (`simplest_within_noise`). ctx: per-mode features and per-exit costs (see `calibrate`).
    Returns (the chosen Candidate, one summary row per mode x history x family for the report)."""
    finalists, table = [], []

    def keep(candidate, mode, history):
        finalists.append(candidate)
        table.append({"mode": mode, "history": history, "rule": candidate.rule.rule_,
                      "min_layer": candidate.rule.min_layer,
                      "fit_flops_saved": candidate.fit_saved if np.isfinite(candidate.fit_saved) else None})
        log(f"  fit part: {mode:5s}{' + history' if history else '          '} best {candidate.rule.rule_}, "
            f"min_layer {candidate.rule.min_layer}: saves {max(candidate.fit_saved, 0):.1%} of FLOPs")

    for mode in modes:
        labels, top, gap = ctx["features"][mode]
        agrees = labels == ctx["final"][:, None]  # [n, L]: this layer already answers as the model does
        for history in history_options:
            family_best = {}
            for rule in candidate_rules(mode, score, ctx["L"], ctx["min_layers"], history, top[fit_idx],
                                        gap[fit_idx], agrees[fit_idx], labels[fit_idx], svm):
                candidate = fit_value(rule, ctx["features"][mode], ctx, fit_idx, scored_fit, num_thresholds)
                family = rule.kernel
                if family not in family_best or candidate.fit_saved > family_best[family].fit_saved:
                    family_best[family] = candidate
            for candidate in family_best.values():
                keep(candidate, mode, history)
    if prior is not None:
        keep(fit_value(prior, ctx["features"]["prior"], ctx, fit_idx, scored_fit, num_thresholds, "prior"),
             "prior", prior.history)
    best = simplest_within_noise(finalists, ctx["tolerates"], seed)
    for row, candidate in zip(table, finalists):
        row["chosen"] = candidate is best
    return best, table
