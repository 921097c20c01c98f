"""Exits simulated from a full-depth trace: where the engine would stop each item for a rule and
threshold, what it would answer there, and what every possible exit costs in FLOPs.

Calibration (calibrate.py, choice.py) reads exits from here instead of running the model once per
candidate; `tests/test_calibrate.py` checks that the engine stops where these functions say.
"""

from __future__ import annotations

import numpy as np

from adainfer_ray.flops import ModelDims, item_flops
from adainfer_ray.rules import decision_values



def simulate_exits(decisions: np.ndarray, thresholds, min_layer: int) -> np.ndarray:
    """Exit layer (1-based) of every item at every threshold, as the engine would stop.

    decisions [n, L]; thresholds [K]. The engine asks after layers min_layer .. L-1 and stops at
    the first with decision >= t; items never stopped run all L layers. Returns [n, K].

    Vectorised: the running maximum of the decisions is non-decreasing along the layers, so the
    first layer where it reaches t is min_layer + (how many asked layers have it below t).
    """
    n, L = decisions.shape
    thresholds = np.asarray(thresholds, dtype=np.float64)
    asked = decisions[:, min_layer - 1: L - 1]  # [n, A]: layers min_layer .. L-1
    running = np.maximum.accumulate(asked, axis=1) if asked.shape[1] else asked
    below = np.zeros((n, len(thresholds)), dtype=np.int32)
    for col in range(running.shape[1]):  # one [n, K] comparison per layer keeps memory small
        below += running[:, col, None] < thresholds[None, :]
    return min_layer + below  # == L when no asked layer reached t


def exit_answers(exit_layer: np.ndarray, layer_labels: np.ndarray, final_label: np.ndarray) -> np.ndarray:
    """The label each item answers at its exit: exit_layer [n, K], layer_labels [n, L] -> [n, K].
    An item that runs every layer answers with the model's own label."""
    labels = layer_labels.copy()
    labels[:, -1] = final_label
    return np.take_along_axis(labels, exit_layer - 1, axis=1)


def exit_costs(dims: ModelDims, prefix_tokens: int, item_tokens, mode: str, num_labels: int,
               min_layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FLOPs of every item for every possible exit layer, prefix reused (as the classify job runs).
    min_layer: the first layer where the exit head runs (the policy's `first_read_layer`).

    Returns used [n, L] (column e-1: the item stopped after layer e), full [n] (whole prompt, no
    reuse) and full_reuse [n] (every layer, prefix reused: the baseline early exit competes with).
    """
    L = dims.layers
    item_tokens = np.asarray(item_tokens)
    lengths, inverse = np.unique(item_tokens, return_inverse=True)
    used = np.zeros((len(lengths), L))
    full, full_reuse = np.zeros(len(lengths)), np.zeros(len(lengths))
    for u, length in enumerate(lengths):  # item_flops depends on the item only through its length
        for e in range(1, L + 1):
            f = item_flops(dims, prefix_tokens, int(length), e, mode, num_labels, min_layer, reuse_prefix=True)
            used[u, e - 1] = f["used"]
        full[u], full_reuse[u] = f["full"], f["full_reuse"]
    return used[inverse], full[inverse], full_reuse[inverse]


# ----------------------------------------------------------------------------------------------
# One rule over a trace: its scores, exits, answers and FLOPs saved (calibration's fit and test parts)


def rule_decisions(policy, idx, labels, top, gap):
    """The rule's scores [m, L] of items idx, in chunks (bounded memory for RBF SVMs)."""
    chunks = np.array_split(idx, max(1, len(idx) // 1000))
    return np.concatenate([decision_values(policy, top[c], gap[c], labels[c]) for c in chunks])


def rule_outcomes(policy, thresholds, idx, labels, top, gap, final, dec=None):
    """Exit layers [m, K] and exit answers [m, K] of items idx at every threshold."""
    dec = rule_decisions(policy, idx, labels, top, gap) if dec is None else dec
    exits = simulate_exits(dec, thresholds, policy.min_layer)
    return exits, exit_answers(exits, labels[idx], final[idx])


def item_flops_saved(exits, used, full_reuse):
    """FLOPs each item saves [m, K] at its exits [m, K], with per-exit cost used [m, L] and baseline [m]."""
    return full_reuse[:, None] - np.take_along_axis(used, exits - 1, 1)


def flops_saved_share(exits, used, full_reuse):
    """FLOPs saved [K] by the exits [m, K] of items with per-exit cost used [m, L] and baseline [m]."""
    return item_flops_saved(exits, used, full_reuse).sum(0) / full_reuse.sum()
