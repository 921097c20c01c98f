"""Calibrating an exit policy with a stated guarantee (Learn then Test).

The promise. On an item the policy stops after layer e and answers ŷ; the full model answers y.
Its disagreement risk is R = P(ŷ != y) over items like the calibration sample. Calibration picks
the exit threshold so that, with probability at least 1 - delta over the draw of the sample,

    R <= epsilon.

Only full-depth runs are needed (y is the model's own answer), so gold labels are optional.

How, in five steps (Angelopoulos, Bates et al., "Learn then Test", 2021):

1. Trace. Run every calibration item once at full depth and keep what each layer would answer
   and how sure it is, for every feature mode (the job's actors run the engine's `trace`;
   `job.calibration.calibrate_policy` gathers the rows).
2. Split the items at random into a fit part and a test part.
3. Learn, on the fit part only, per feature mode: the per-layer probes (probe mode), the exit
   rule (which score is compared with the threshold, and the first layer where it is asked), and
   the list of candidate thresholds (quantiles of the rule's scores on the fit part). Nothing
   here looks at the test part, so the hypotheses tested in step 4 are fixed before it is seen.
4. Test, on the test part only (n items). For candidate threshold t, count the items whose exit
   answer disagrees with the full model: k(t). The null hypothesis H_t is "R(t) > epsilon"; its
   exact binomial p-value is P(Binom(n, epsilon) <= k(t)) (few disagreements are unlikely when
   the risk is above epsilon). Candidates are tested in a fixed order from the most conservative
   (highest threshold: fewest exits) to the least; each is accepted while p <= delta', and
   testing stops at the first failure (fixed-sequence testing controls the family-wise error at
   delta' with no correction for the number of candidates). The last accepted threshold is the
   result; if the first one already fails, nothing is accepted.
5. Choose the mode. Each of the m feature modes tried has its own fixed sequence, tested at
   delta' = delta / m (Bonferroni), so with probability >= 1 - delta every mode's accepted
   threshold keeps its promise at once, and picking the mode that saves the most FLOPs on the
   test part cannot break it. If no mode accepts anything, the policy is full depth.

The exit rule. The paper's SVM on [top, gap, depth] fits the bulk of (item, layer) pairs; the
promise lives in the high-confidence tail, which a hinge-loss SVM ranks poorly (its decision
saturates near +1 for early and late layers alike). By default the rule is therefore a linear
score, top + w_gap * gap + w_depth * depth (the form of a linear-kernel SVM, so the policy
artifact and the engine are unchanged), with weights and min_layer picked from a small grid on
the fit part; `score="svm"` calibrates only the paper's SVM, and `score="auto"` (the default) puts
both families among the candidates, so the fit part chooses the family too.

Reading order: statistics (`stats.binomial_pvalue`, `learn_then_test`), exits (`simulate_exits`,
`exit_costs`), features (`probe_features`, `mode_features`), rules (`candidate_rules`,
`candidate_thresholds`), the whole thing (`calibrate`). Nothing here runs the model: everything
works on plain arrays, so tests feed it synthetic traces.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np

from adainfer_ray.features import FEATURE_MODES, LinearProbes
from adainfer_ray.flops import ModelDims, item_flops
from adainfer_ray.policy import ExitPolicy, exit_inputs
from adainfer_ray.stats import binomial_pvalue

DEFAULT_EPSILON, DEFAULT_DELTA = 0.01, 0.05


# ----------------------------------------------------------------------------------------------
# Statistics


def learn_then_test(losses, n: int, epsilon: float, delta: float) -> tuple[int | None, np.ndarray]:
    """Fixed-sequence testing over candidates already ordered from most to least conservative.

    losses[j]: disagreements at candidate j among n test items. Returns (index of the last
    accepted candidate, or None if the first one fails; p-values [K] of every candidate, for the
    report: those after the first failure are shown but never accepted).
    """
    pvalues = np.array([binomial_pvalue(k, n, epsilon) for k in losses])
    failed = np.flatnonzero(pvalues > delta)
    stop = failed[0] if len(failed) else len(pvalues)  # candidates [0, stop) are accepted
    return (int(stop) - 1 if stop > 0 else None), pvalues


# ----------------------------------------------------------------------------------------------
# Exits, simulated from a trace


def decision_values(policy: ExitPolicy, top: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """The exit rule's score after every layer: top, gap [n, L] -> [n, L] (layers run = column + 1)."""
    L = top.shape[1]
    return policy.decision_function(exit_inputs(top, gap, np.arange(1, L + 1), L))


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
# Features per mode, and fitting one family


def _top_gap_label(proba: np.ndarray):
    """proba [..., C] -> (label, top-1, top-1 minus top-2), each [...]."""
    srt = np.sort(proba, axis=-1)
    return proba.argmax(-1), srt[..., -1], srt[..., -1] - srt[..., -2]


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


def probe_features(hidden: np.ndarray, final_label: np.ndarray, fit_idx: np.ndarray, num_labels: int,
                   C: float = 0.1, folds: int = 2, seed: int = 0) -> tuple[LinearProbes, np.ndarray]:
    """Per-layer probes fitted on the fit part, and honest probe probabilities for every item.

    Items outside the fit part get the probes fitted on the whole fit part (the probes the policy
    ships). Items inside it get cross-fitted probabilities (each fold scored by probes that never
    saw it): in-sample probe outputs are over-confident, and the SVM trained on them would trust
    them more than it should at test time. Returns (probes, proba [n, L, C]).
    """
    probes = fit_probes(hidden[fit_idx], final_label[fit_idx], num_labels, C)
    proba = probes.predict_proba(hidden)
    fold_of = np.random.default_rng(seed).permutation(len(fit_idx)) % folds
    for f in range(folds):
        inner, outer = fit_idx[fold_of != f], fit_idx[fold_of == f]
        proba[outer] = fit_probes(hidden[inner], final_label[inner], num_labels, C).predict_proba(hidden[outer])
    return probes, proba


def mode_features(trace: dict, mode: str, probe_proba: np.ndarray | None = None):
    """(layer_labels, top, gap), each [n, L], for one feature mode."""
    if mode == "probe":
        return _top_gap_label(probe_proba)
    return trace[f"{mode}_label"], trace[f"{mode}_top"], trace[f"{mode}_gap"]


# ----------------------------------------------------------------------------------------------
# Exit rules: the score compared with the threshold


SCORES = ("linear", "svm")
# The linear rules tried per mode: score = top + w_gap * gap + w_depth * (layers run / L).
LINEAR_GAP_WEIGHTS = (0.0, 1.0)
LINEAR_DEPTH_WEIGHTS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)


def linear_rule(mode: str, num_layers: int, min_layer: int = 1, w_gap: float = 0.0, w_depth: float = 0.0) -> ExitPolicy:
    """Exit when top + w_gap * gap + w_depth * depth >= threshold, as an ExitPolicy with a linear
    kernel (the form a linear SVM has), so the engine and the artifact need nothing new."""
    policy = ExitPolicy(features=mode, kernel="linear", min_layer=min_layer)
    policy.kernel_, policy.gamma_, policy.num_layers_ = "linear", None, num_layers
    policy.vectors_, policy.dual_, policy.intercept_ = np.array([[1.0, w_gap, w_depth]]), np.ones(1), np.zeros(1)
    policy.rule_ = f"top + {w_gap:g}*gap + {w_depth:g}*depth"
    return policy


def candidate_rules(mode: str, score: str, num_layers: int, min_layers, top_fit, gap_fit, agrees_fit,
                    svm: dict | None = None) -> list[ExitPolicy]:
    """Unthresholded exit rules for one mode, learned from the fit part.

    linear: a small grid of linear scores (no fitting; the fit part chooses among them).
    svm:    the paper's SVM on [top, gap, depth] trained on "this layer already agrees". Measured on
            SST-2, a hinge-loss SVM ranks the high-confidence tail poorly: its decision saturates
            near +1 for early and late layers alike, so even its most conservative threshold lets
            wrong early exits through. The guarantee lives in that tail, hence `linear` by default.
    """
    rules = []
    for min_layer in min_layers:
        if score in ("svm", "auto"):
            policy = ExitPolicy(features=mode, min_layer=min_layer, **(svm or {})).fit(top_fit, gap_fit, agrees_fit)
            policy.rule_ = f"svm ({policy.kernel})"
            rules.append(policy)
        if score in ("linear", "auto"):
            rules += [linear_rule(mode, num_layers, min_layer, g, d)
                      for g in LINEAR_GAP_WEIGHTS for d in LINEAR_DEPTH_WEIGHTS]
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


def tolerated_rate(n: int, epsilon: float, delta: float) -> float:
    """The largest disagreement share among n items that the binomial test still accepts: where
    Learn-then-Test will land, so the fit part aims its choice of rule there."""
    k = int(n * epsilon)
    while k >= 0 and binomial_pvalue(k, n, epsilon) > delta:
        k -= 1
    return max(k, 0) / n


def _outcomes(policy, thresholds, idx, labels, top, gap, final):
    """Exit layers [m, K] and disagreement with the full model [m, K] of items idx at every threshold."""
    chunks = np.array_split(idx, max(1, len(idx) // 1000))  # bounded memory for RBF SVMs
    dec = np.concatenate([decision_values(policy, top[c], gap[c]) for c in chunks])
    exits = simulate_exits(dec, thresholds, policy.min_layer)
    return exits, exit_answers(exits, labels[idx], final[idx]) != final[idx, None]


# ----------------------------------------------------------------------------------------------
# Calibration


@dataclass
class CalibrationResult:
    policy: ExitPolicy  # the chosen policy (full depth if no mode kept the promise), metadata filled
    rows: list[dict]  # one per mode and candidate threshold: the calibration report's table
    summary: dict  # choices, guarantee, and what the policy is expected to do (also in policy.metadata)
    rules: dict = field(default_factory=dict)  # mode -> its chosen rule, unthresholded


def split_fit_test(n: int, fit_fraction: float, seed: int, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random fit/test split of n items. With `groups` (one key per item), every group
    lands whole on one side, so no test item shares its group (a sentence, a thread, an author)
    with a fit item: the binomial test assumes test items independent of what chose the rule."""
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(n)
        n_fit = int(round(n * fit_fraction))
        return np.sort(order[:n_fit]), np.sort(order[n_fit:])
    _, group_of = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    sizes = np.bincount(group_of)
    order = rng.permutation(len(sizes))
    fit_groups = order[np.cumsum(sizes[order]) <= round(n * fit_fraction)]
    in_fit = np.isin(group_of, fit_groups)
    return np.flatnonzero(in_fit), np.flatnonzero(~in_fit)


def calibrate(trace: dict, dims: ModelDims, prefix_tokens: int, num_labels: int,
              epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA, features: str = "auto",
              score: str = "auto", min_layers=(1, 4, 8), fit_fraction: float = 0.5, seed: int = 0,
              gold: np.ndarray | None = None, groups=None, num_thresholds: int = 200, probe_C: float = 0.1,
              svm: dict | None = None, provenance: dict | None = None, log=print) -> CalibrationResult:
    """Learn a rule per feature mode on the fit part, test its thresholds on the test part, and
    return the policy that saves the most FLOPs while keeping the promise, with the whole table.

    trace: the engine's `trace` plus item_tokens [n] (each item's own token count);
    gold: label indices [n] (-1 where unknown) or None; groups: a key per item kept on one side of
    the split, or None; score: "linear", "svm", or "auto" (both families, chosen on the fit part);
    provenance: model id/hash, task, template, ... copied into the policy's metadata. See the module
    docstring for the guarantee: the rule (weights, min_layer) of each mode is chosen on the fit part, so only the modes are chosen
    after testing, and delta is split over them.
    """
    t0 = time.perf_counter()  # a duration (summary["seconds"])
    modes = FEATURE_MODES if features in (None, "auto") else (features,)
    if score not in SCORES + ("auto",):
        raise ValueError(f"score must be one of {SCORES + ('auto',)}")
    delta_each = delta / len(modes)  # Bonferroni over the modes we choose among after testing
    n, L = trace["final_label"].shape[0], dims.layers
    min_layers = [int(m) for m in min_layers if 1 <= m < L] or [1]  # the last layer never asks
    fit_idx, test_idx = split_fit_test(n, fit_fraction, seed, groups)
    n_fit, n_test = len(fit_idx), len(test_idx)
    final = trace["final_label"]
    has_gold = gold is not None and (gold[test_idx] >= 0).any()
    graded = gold[test_idx] >= 0 if has_gold else np.zeros(n_test, bool)  # [n_test]
    full_accuracy = float((final[test_idx][graded] == gold[test_idx][graded]).mean()) if has_gold else None
    target = tolerated_rate(n_test, epsilon, delta_each)
    log(f"calibrating on {n} items: fit {n_fit}, test {n_test}; epsilon {epsilon}, delta {delta} "
        f"({len(modes)} modes, {delta_each:.4g} each: accepts up to {target:.2%} disagreement on the test part)")

    probes = probe_proba = None
    if "probe" in modes:
        log("fitting per-layer probes (cross-fitted on the fit part)...")
        probes, probe_proba = probe_features(trace["hidden"], final, fit_idx, num_labels, C=probe_C, seed=seed)

    rows, rules, best, costs = [], {}, None, {}
    for mode in modes:
        labels, top, gap = mode_features(trace, mode, probe_proba)
        agrees = labels == final[:, None]  # [n, L]: this layer already answers as the model does
        # Learn: the rule saving the most FLOPs on the fit part at the disagreement the test will tolerate.
        chosen = None
        for rule in candidate_rules(mode, score, L, min_layers, top[fit_idx], gap[fit_idx], agrees[fit_idx], svm):
            key = (mode, rule.min_layer)
            if key not in costs:
                costs[key] = exit_costs(dims, prefix_tokens, trace["item_tokens"], mode, num_labels, rule.min_layer)
            used, _, full_reuse = costs[key]
            dec_fit = np.concatenate([decision_values(rule, top[c], gap[c])
                                      for c in np.array_split(fit_idx, max(1, n_fit // 1000))])
            thresholds = candidate_thresholds(dec_fit, rule.min_layer, num_thresholds)
            exits, wrong = _outcomes(rule, thresholds, fit_idx, labels, top, gap, final)
            spent = np.take_along_axis(used[fit_idx], exits - 1, 1)  # [n_fit, K]
            saved = (full_reuse[fit_idx, None] - spent).sum(0) / full_reuse[fit_idx].sum()
            ok = wrong.mean(0) <= target
            value = saved[ok].max() if ok.any() else -np.inf
            if chosen is None or value > chosen[0]:
                chosen = (value, rule, thresholds)
        _, rule, thresholds = chosen
        rule.probes_ = probes if mode == "probe" else None
        rules[mode] = rule
        # Test: fixed-sequence testing of the rule's thresholds on the test part.
        used, _, full_reuse = costs[(mode, rule.min_layer)]
        exits, wrong = _outcomes(rule, thresholds, test_idx, labels, top, gap, final)
        accepted, pvalues = learn_then_test(wrong.sum(0), n_test, epsilon, delta_each)
        used_at = np.take_along_axis(used[test_idx], exits - 1, axis=1)  # [n_test, K]
        right = exit_answers(exits, labels[test_idx], final[test_idx]) == gold[test_idx, None] if has_gold else None
        reuse_total = full_reuse[test_idx].sum()
        for j, t in enumerate(thresholds):
            rows.append({
                "mode": mode, "rule": rule.rule_, "min_layer": rule.min_layer, "rank": j, "threshold": float(t),
                "exit_early_share": float((exits[:, j] < L).mean()),
                "layers_skipped": float((L - exits[:, j]).mean() / L),
                "flops_saved": float((full_reuse[test_idx] - used_at[:, j]).sum() / reuse_total),
                "agreement": float(1 - wrong[:, j].mean()), "disagreements": int(wrong[:, j].sum()),
                "accuracy": float(right[graded, j].mean()) if has_gold else None,
                "p_value": float(pvalues[j]), "accepted": accepted is not None and j <= accepted,
            })
        mode_rows = rows[-len(thresholds):]
        if accepted is None:
            log(f"  {mode:5s} {rule.rule_}, min_layer {rule.min_layer}: no threshold keeps the promise (most "
                f"conservative: {mode_rows[0]['disagreements']} disagreements in {n_test}, "
                f"p = {pvalues[0]:.3g} > {delta_each:.3g})")
            continue
        row = mode_rows[accepted]
        log(f"  {mode:5s} {rule.rule_}, min_layer {rule.min_layer}, threshold {row['threshold']:.4f}: "
            f"{row['layers_skipped']:.1%} layers skipped, {row['flops_saved']:.1%} FLOPs saved, "
            f"agreement {row['agreement']:.2%}")
        if best is None or row["flops_saved"] > best[1]["flops_saved"]:
            best = (rule, row, exits[:, accepted])

    summary = {
        "epsilon": epsilon, "delta": delta, "delta_per_mode": delta_each, "modes": list(modes), "score": score,
        "calibration_size": n, "fit_size": int(n_fit), "test_size": int(n_test), "seed": seed,
        "grouped": groups is not None,
        "fit_fraction": fit_fraction, "num_layers": L, "full_depth_accuracy": full_accuracy,
        "gold_items": int(graded.sum()), "tolerated_disagreement": target,
        "paper_criterion": _paper_criterion(rows, full_accuracy) if has_gold else None,
    }
    if best is None:
        policy = ExitPolicy.full_depth(L)
        summary.update(
            guaranteed=False, features="none", rule=None, threshold=None, min_layer=None, layers_skipped=0.0,
            flops_saved=0.0, agreement=1.0, accuracy=full_accuracy, exit_histogram=[0] * (L - 1) + [n_test],
            message=(f"No exit threshold keeps disagreement with the full model <= {epsilon} with confidence "
                     f"{1 - delta} on {n_test} test items (even the most conservative one failed): "
                     f"wrote a full-depth policy. More calibration items or a looser --epsilon/--delta may help."))
    else:
        rule, row, exits = best
        policy = with_threshold(rule, row["threshold"])
        summary.update(
            guaranteed=True, features=policy.features, rule=rule.rule_, threshold=row["threshold"],
            min_layer=policy.min_layer, layers_skipped=row["layers_skipped"], flops_saved=row["flops_saved"],
            agreement=row["agreement"], accuracy=row["accuracy"], p_value=row["p_value"],
            exit_histogram=np.bincount(exits, minlength=L + 1)[1:].tolist(),
            message=(f"With probability >= {1 - delta}, this policy disagrees with the full model on at most "
                     f"{epsilon:.2%} of items like the calibration sample. Expected (test part, {n_test} items): "
                     f"{row['layers_skipped']:.1%} of layers skipped, {row['flops_saved']:.1%} of FLOPs saved, "
                     f"agreement {row['agreement']:.2%}."))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    policy.metadata = {**(provenance or {}), **summary}
    log(summary["message"])
    return CalibrationResult(policy, rows, summary, rules)


def _paper_criterion(rows: list[dict], full_accuracy: float, max_drop: float = 0.01) -> dict:
    """Per feature mode, the setting with the most layers skipped whose accuracy against gold on
    the test part is at most `max_drop` below full depth (the paper's criterion: empirical, chosen
    on the same items it is measured on, so optimistic, and with no guarantee)."""
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        ok = [r for r in rows if r["mode"] == mode and r["accuracy"] >= full_accuracy - max_drop - 1e-12]
        out[mode] = max(ok, key=lambda r: r["layers_skipped"]) if ok else None
    return out


def with_threshold(rule: ExitPolicy, threshold: float, metadata: dict | None = None) -> ExitPolicy:
    """A copy of an exit rule with its threshold set (learned arrays shared, not copied)."""
    policy = copy.copy(rule)
    policy.threshold, policy.metadata = float(threshold), dict(metadata or {})
    return policy
