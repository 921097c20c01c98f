"""Per-layer linear probes for the probe feature mode, fitted on calibration's fit part.

A probe reads one layer's hidden state and predicts the label the full model will give; its
top-1 probability and top-1 - top-2 gap are the probe mode's exit features (features.py holds
the `LinearProbes` model the engine applies; this module fits it). Two things make the features
honest on a few hundred items: the L2 strength is chosen by cross-fitted log-loss, and items of
the fit part are scored by probes that never saw them.
"""

from __future__ import annotations

import numpy as np

from adainfer_ray.features import LinearProbes


def fit_probes(hidden: np.ndarray, y: np.ndarray, num_labels: int, C: float = 0.1) -> LinearProbes:
    """Per-layer probes fitted on standardised hidden states, the scaling folded back into the
    weights so the engine applies them to raw states. Standardising makes lbfgs converge in a
    few dozen iterations instead of hundreds and lets one C suit every layer (their scales differ)."""
    x = hidden.astype(np.float32)  # [n, L, D]
    mu, sd = x.mean(0), x.std(0) + 1e-3  # [L, D]
    probes = LinearProbes(C=C).fit((x - mu) / sd, y, num_labels)
    probes.coef_ = (probes.coef_ / sd[:, None, :]).astype(np.float32)  # w.(x - mu)/sd = (w/sd).x - (w/sd).mu
    probes.intercept_ = (probes.intercept_ - np.einsum("lcd,ld->lc", probes.coef_, mu)).astype(np.float32)
    return probes


# The probes' L2 strengths tried on the fit part. Measured on SST-2 phrases (SmolLM2-135M, 300 to
# 4,000 fit items): 0.01 beat the earlier fixed 0.1 at every size, and the cross-fitted log-loss
# picks it, so the fit part chooses (a fixed number could not suit every model and corpus).
PROBE_C_GRID = (0.003, 0.01, 0.03, 0.1)


def probe_features(hidden: np.ndarray, final_label: np.ndarray, fit_idx: np.ndarray, num_labels: int,
                   C="auto", folds: int = 2, seed: int = 0) -> tuple[LinearProbes, np.ndarray, float]:
    """Per-layer probes fitted on the fit part, and honest probe probabilities for every item.

    Items outside the fit part get the probes fitted on the whole fit part (the probes the policy
    ships). Items inside it get cross-fitted probabilities (each fold scored by probes that never
    saw it): in-sample probe outputs are over-confident, and the rule trained on them would trust
    them more than it should at test time. C: the L2 strength, or "auto": the one of PROBE_C_GRID
    whose cross-fitted probabilities give the final label the lowest log-loss (mean over layers),
    on the fit part only. Returns (probes, proba [n, L, C], the C used).
    """
    grid = PROBE_C_GRID if C == "auto" else (float(C),)
    fold_of = np.random.default_rng(seed).permutation(len(fit_idx)) % folds
    best = None
    for c in grid:
        crossed = np.zeros((len(fit_idx), hidden.shape[1], num_labels))  # [m, L, C]
        for f in range(folds):
            inner, outer = fit_idx[fold_of != f], fit_idx[fold_of == f]
            crossed[fold_of == f] = fit_probes(hidden[inner], final_label[inner], num_labels, c).predict_proba(hidden[outer])
        right = np.take_along_axis(crossed, final_label[fit_idx][:, None, None], axis=2)  # [m, L, 1]
        log_loss = float(-np.log(np.clip(right, 1e-9, 1.0)).mean())
        if best is None or log_loss < best[0]:
            best = (log_loss, c, crossed)
    _, c, crossed = best
    probes = fit_probes(hidden[fit_idx], final_label[fit_idx], num_labels, c)
    proba = probes.predict_proba(hidden)
    proba[fit_idx] = crossed
    return probes, proba, c

