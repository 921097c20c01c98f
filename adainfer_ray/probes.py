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


# How much less the probes' L2 penalty weighs on the label head's logits (the last K columns of
# features.probe_input) than on the D state columns: their standardised columns are scaled by it
# before the fit, so a weight on them costs 1/LENS_WEIGHT**2 as much. The model's own answer
# direction is a prior the fit items need not learn from scratch. Measured on SmolLM2 and the
# 6,885 SST-2 train phrases, against the probes on the state alone: refit on all of them (fit
# fraction 0.5, eps 1%) 38.9% of layers skipped on the test part (was 38.1%), 39.3% on SST-2 dev
# (was 38.6%); on 12 draws of 1,000 (eps 2%, no prior, calibration_draws.py) the same mean, 33.9%
# on the other rows, with a narrower spread (31.3-35.9%, was 29.9-37.3%) and fewer labels changed.
LENS_WEIGHT = 30.0


def fit_probes(hidden: np.ndarray, y: np.ndarray, num_labels: int, C: float = 0.1, lens_columns: int = 0) -> LinearProbes:
    """Per-layer probes fitted on standardised inputs, the scaling folded back into the weights so
    the engine applies them to raw inputs. Standardising makes lbfgs converge in a few dozen
    iterations instead of hundreds and lets one C suit every layer (their scales differ).
    lens_columns: how many trailing columns are the label head's logits (penalised less, LENS_WEIGHT)."""
    x = hidden.astype(np.float32)  # [n, L, D + lens_columns]
    mu, sd = x.mean(0), x.std(0) + 1e-3  # [L, D + lens_columns]
    scale = np.ones(x.shape[-1], np.float32)
    scale[x.shape[-1] - lens_columns:] = LENS_WEIGHT  # an empty slice when lens_columns is 0
    probes = LinearProbes(C=C).fit((x - mu) / sd * scale, y, num_labels)
    probes.coef_ = (probes.coef_ * scale / sd[:, None, :]).astype(np.float32)  # w.s(x - mu)/sd = (ws/sd).x - (ws/sd).mu
    probes.intercept_ = (probes.intercept_ - np.einsum("lcd,ld->lc", probes.coef_, mu)).astype(np.float32)
    return probes


# The probes' L2 strengths tried on the fit part. Measured on SST-2 phrases (SmolLM2-135M, 300 to
# 4,000 fit items): 0.01 beat the earlier fixed 0.1 at every size, and the cross-fitted log-loss
# picks it, so the fit part chooses (a fixed number could not suit every model and corpus).
PROBE_C_GRID = (0.003, 0.01, 0.03, 0.1)


def probe_features(hidden: np.ndarray, final_label: np.ndarray, fit_idx: np.ndarray, num_labels: int,
                   C="auto", folds: int = 2, seed: int = 0, lens_columns: int = 0) -> tuple[LinearProbes, np.ndarray, float]:
    """Per-layer probes fitted on the fit part, and honest probe probabilities for every item.

    Items outside the fit part get the probes fitted on the whole fit part (the probes the policy
    ships). Items inside it get cross-fitted probabilities (each fold scored by probes that never
    saw it): in-sample probe outputs are over-confident, and the rule trained on them would trust
    them more than it should at test time. C: the L2 strength, or "auto": the one of PROBE_C_GRID
    whose cross-fitted probabilities give the final label the lowest log-loss (mean over layers),
    on the fit part only. hidden: features.probe_input per item and layer [n, L, D + lens_columns]
    (lens_columns = 0 for a trace from before the label logits joined it). Returns (probes,
    proba [n, L, C], the C used).
    """
    grid = PROBE_C_GRID if C == "auto" else (float(C),)
    fold_of = np.random.default_rng(seed).permutation(len(fit_idx)) % folds
    best = None
    for c in grid:
        crossed = np.zeros((len(fit_idx), hidden.shape[1], num_labels))  # [m, L, C]
        for f in range(folds):
            inner, outer = fit_idx[fold_of != f], fit_idx[fold_of == f]
            crossed[fold_of == f] = fit_probes(hidden[inner], final_label[inner], num_labels, c, lens_columns).predict_proba(hidden[outer])
        right = np.take_along_axis(crossed, final_label[fit_idx][:, None, None], axis=2)  # [m, L, 1]
        log_loss = float(-np.log(np.clip(right, 1e-9, 1.0)).mean())
        if best is None or log_loss < best[0]:
            best = (log_loss, c, crossed)
    _, c, crossed = best
    probes = fit_probes(hidden[fit_idx], final_label[fit_idx], num_labels, c, lens_columns)
    proba = probes.predict_proba(hidden)
    proba[fit_idx] = crossed
    return probes, proba, c

