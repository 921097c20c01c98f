"""Candidate exit rules: the score an exit policy compares with its threshold, and its thresholds.

A rule is an unthresholded `ExitPolicy`: which feature mode it reads, whether it reads history
(streak, dtop), the score, and the first layer where it is asked (min_layer). Calibration learns
the candidates here on the fit part, chooses one on the fit part, and tests its thresholds on
the test part (calibrate.py). Nothing here sees the test part.

Two families. `linear`: score = top + w_gap*gap + w_depth*depth [+ w_streak*streak/L + w_dtop*dtop]
from a small grid of weights (no fitting: the fit part chooses among them); it has the form of a
linear-kernel SVM, so the policy artifact and the engine need nothing new. `svm`: the paper's SVM
trained on "this layer already agrees with the full model". Measured on SST-2, a hinge-loss SVM
ranks the high-confidence tail poorly (its decision saturates near +1 for early and late layers
alike), and the promise lives in that tail, so `linear` usually wins.
"""

from __future__ import annotations

import itertools

import numpy as np

from adainfer_ray.policy import ExitPolicy, exit_inputs, history_features

SCORES = ("linear", "svm")
# The linear rules' weights: gap and depth as before, streak (layers the answer has held, over L)
# and dtop (top's change over the last dtop_lag layers) for rules with history.
LINEAR_GAP_WEIGHTS = (0.0, 1.0)
LINEAR_DEPTH_WEIGHTS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
LINEAR_STREAK_WEIGHTS = (0.05, 0.1, 0.2, 0.4)  # 0 is the rule without history, already a candidate
LINEAR_DTOP_WEIGHTS = (0.0, 0.5)


def decision_values(policy: ExitPolicy, top: np.ndarray, gap: np.ndarray, layer_labels=None) -> np.ndarray:
    """The rule's score after every layer: top, gap [n, L] (and, with history, each layer's answer
    layer_labels [n, L]) -> [n, L] (layers run = column + 1)."""
    L = top.shape[1]
    hist = history_features(layer_labels, top, policy.dtop_lag) if policy.history else (None, None)
    return policy.decision_function(exit_inputs(top, gap, np.arange(1, L + 1), L, *hist))


def linear_rule(mode: str, num_layers: int, min_layer: int = 1, w_gap: float = 0.0, w_depth: float = 0.0,
                w_streak: float | None = None, w_dtop: float = 0.0) -> ExitPolicy:
    """Exit when top + w_gap*gap + w_depth*depth (+ w_streak*streak/L + w_dtop*dtop, when w_streak
    is given: a rule with history) >= threshold, as a linear-kernel ExitPolicy."""
    history = w_streak is not None
    policy = ExitPolicy(features=mode, kernel="linear", min_layer=min_layer, history=history)
    policy.kernel_, policy.gamma_, policy.num_layers_ = "linear", None, num_layers
    weights = [1.0, w_gap, w_depth] + ([w_streak, w_dtop] if history else [])
    policy.vectors_, policy.dual_, policy.intercept_ = np.array([weights]), np.ones(1), np.zeros(1)
    policy.rule_ = f"top + {w_gap:g}*gap + {w_depth:g}*depth" + (
        f" + {w_streak:g}*streak + {w_dtop:g}*dtop" if history else "")
    return policy


def candidate_rules(mode: str, score: str, num_layers: int, min_layers, history: bool, top_fit, gap_fit,
                    agrees_fit, labels_fit, svm: dict | None = None) -> list[ExitPolicy]:
    """Unthresholded exit rules for one mode, with or without history, learned from the fit part
    (top_fit, gap_fit, agrees_fit, labels_fit [n_fit, L])."""
    rules = []
    for min_layer in min_layers:
        if score in ("svm", "auto"):
            policy = ExitPolicy(features=mode, min_layer=min_layer, history=history, **(svm or {}))
            policy.fit(top_fit, gap_fit, agrees_fit, labels_fit)
            policy.rule_ = f"svm ({policy.kernel}{', history' if history else ''})"
            rules.append(policy)
        if score in ("linear", "auto"):
            if history:
                grid = itertools.product(LINEAR_GAP_WEIGHTS, LINEAR_DEPTH_WEIGHTS, LINEAR_STREAK_WEIGHTS,
                                         LINEAR_DTOP_WEIGHTS)
            else:
                grid = ((g, d, None, 0.0) for g in LINEAR_GAP_WEIGHTS for d in LINEAR_DEPTH_WEIGHTS)
            rules += [linear_rule(mode, num_layers, min_layer, g, d, s, t) for g, d, s, t in grid]
    return rules


def candidate_thresholds(decisions_fit: np.ndarray, min_layer: int, count: int = 200) -> np.ndarray:
    """`count` candidate thresholds, most conservative (highest) first: quantiles of the decision
    values the fit part produces at the layers where the policy is asked. Taken from the fit part,
    not the test part, so that the tested hypotheses do not depend on the data that tests them.
    The grid is finest at the top, where the promise is kept: levels 1 - (j/count)^2. The 1.0
    quantile (the largest value: hardly any exit) is left out."""
    values = decisions_fit[:, min_layer - 1: -1].ravel()
    levels = 1.0 - (np.arange(1, count + 1) / count) ** 2
    return np.unique(np.quantile(values, levels))[::-1]
