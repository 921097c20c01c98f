"""Calibrating an exit policy with a stated guarantee (Learn then Test).

Two promises, the user's choice of currency. On an item the policy stops after layer e and
answers ŷ; the full model answers y; where gold labels exist, g is the right answer.

    agreement (the default; no gold labels needed): the loss is 1[ŷ != y], and with probability
        at least 1 - delta over the draw of the sample, R = E[loss] <= epsilon.
    accuracy (gold labels on the calibration sample): the loss is 1[ŷ != g] - 1[y != g] in
        {-1, 0, 1}, and with probability at least 1 - delta, early exit's accuracy is at most
        epsilon below full depth's on items like the sample.

How (Angelopoulos, Bates et al., "Learn then Test", 2021):

1. Trace. Run every calibration item once at full depth and keep what each layer would answer
   and how sure it is, for the feature modes the candidates need (`trace_modes`: the job's actors
   run the engine's `trace(item_ids, modes)`; `job.calibration.calibrate_policy` gathers the rows).
2. Split the items at random into a fit part and a test part.
3. Learn and choose, on the fit part only: the per-layer probes (probe mode; their L2 strength
   by cross-fitted log-loss), then for every candidate (feature mode x with or without history x
   rule family, weights and min_layer) the thresholds (quantiles of its scores on the fit part) and
   the FLOPs it saves at the loss the test part will tolerate. The simplest candidate within one
   bootstrap standard error of the best saving is chosen (`simplest_within_noise`: on a few hundred
   fit items, the largest of many savings is mostly luck). Nothing here looks at the test
   part, so the one sequence of hypotheses tested in step 4 is fixed before it is seen, and the
   whole delta goes to it: no Bonferroni split over modes (an earlier version tested every mode
   at delta / 3 and chose among them on the test part).
4. Test, on the test part only, the chosen rule's thresholds from the most conservative to the
   least, with a valid p-value per threshold for H_t "the promise fails at t": the exact binomial
   test for agreement, the exact test of discordant pairs for accuracy's signed loss (see
   stats.paired_pvalue).
   Each threshold is accepted while p <= delta, and testing stops at the first failure
   (fixed-sequence testing controls the family-wise error at delta with no correction for the
   number of thresholds). The last accepted threshold is the result; if the first one already
   fails, the policy is full depth.

Exit features with history (`streak`, `dtop`, see policy.py) are candidates like any other: the
fit part decides whether they help.

Where each step lives: the probes in probes.py, the choice on the fit part (step 3) in choice.py,
the rules in rules.py, the statistics in stats.py, exits simulated from the trace in exits.py.
This module holds the steps' order and the test (step 4): `mode_features`, `split_fit_test`,
`calibrate`. Nothing here runs the model: everything works on plain arrays, so tests feed it
synthetic traces.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field

import numpy as np

from adainfer_ray.choice import choose_rule, fit_tolerates, item_losses, tolerated_rate
from adainfer_ray.exits import exit_costs, flops_saved_share, rule_outcomes
from adainfer_ray.features import DEFAULT_CANDIDATE_MODES, FEATURE_MODES, top2
from adainfer_ray.flops import ModelDims
from adainfer_ray.policy import ExitPolicy
from adainfer_ray.probes import probe_features
from adainfer_ray.rules import SCORES
from adainfer_ray.stats import NUISANCE_SHARE, binomial_pvalue, fixed_sequence, paired_pvalue

DEFAULT_EPSILON, DEFAULT_DELTA = 0.01, 0.05
PROMISES = ("agreement", "accuracy")
# With the mode, rule and thresholds all chosen on the fit part and one sequence tested, a smaller
# fit part leaves more test power. Measured on 2,000 SST-2 train sentences (calibrate on 1,000,
# measure on the other 1,000, eps 0.02, 3 seeds): 0.5 -> 28.6% of layers skipped outside the
# sample, 0.3 -> 32.6% (the old code, delta split over 3 modes at 0.5: 27.4%). With the probes' C and
# the rule chosen as in round 2 of issue 18, the fit part can use more: 12 draws of 1,000 of the
# 6,885 SST-2 train phrases, eps 0.02, no prior (docs/results/scripts/calibration_draws.py): 0.3 ->
# 32.1% skipped on the other rows, 0.4 -> 33.9% (labels changed 0.80% and 0.99% on average).
DEFAULT_FIT_FRACTION = 0.4


# ----------------------------------------------------------------------------------------------
# What to trace, and the statistics of the test part


def candidate_modes(features="auto") -> tuple[str, ...]:
    """The feature modes calibration tries: "auto" -> label and probe (`vocab`, the paper's logit
    lens, is opt-in: it costs a full-vocabulary head per layer to trace and rarely wins), "all" ->
    every mode, or one mode / a list of modes."""
    if features in (None, "auto"):
        return DEFAULT_CANDIDATE_MODES
    if features == "all":
        return FEATURE_MODES
    modes = (features,) if isinstance(features, str) else tuple(features)
    unknown = [m for m in modes if m not in FEATURE_MODES]
    if unknown or not modes:
        raise ValueError(f"unknown feature modes {unknown}: choose from {FEATURE_MODES}, 'auto' or 'all'")
    return modes


def trace_modes(features="auto") -> tuple[str, ...]:
    """What the tracing actors must compute for these candidates: engine.trace(item_ids, modes=...)."""
    return candidate_modes(features)


def learn_then_test(losses, n: int, epsilon: float, delta: float) -> tuple[int | None, np.ndarray]:
    """Agreement's test: fixed-sequence testing of candidates ordered most to least conservative,
    losses[j] = disagreements at candidate j among n test items. Returns (index of the last
    accepted candidate or None; the exact binomial p-values [K] of every candidate)."""
    pvalues = np.array([binomial_pvalue(k, n, epsilon) for k in losses])
    return fixed_sequence(pvalues, delta), pvalues


def test_pvalues(losses: np.ndarray, promise: str, epsilon: float, delta: float) -> np.ndarray:
    """p-values [K] of "the promise fails at threshold j" from the test part's losses [m, K]."""
    m = len(losses)
    if promise == "agreement":
        return np.array([binomial_pvalue(int(k), m, epsilon) for k in losses.sum(0)])
    worse, better = (losses > 0).sum(0), (losses < 0).sum(0)
    return np.array([paired_pvalue(int(w), int(b), m, epsilon, NUISANCE_SHARE * delta) for w, b in zip(worse, better)])


# ----------------------------------------------------------------------------------------------
# Features per mode (the probes are fitted in probes.py), and the prior as a candidate


def mode_features(trace: dict, mode: str, probe_proba: np.ndarray | None = None):
    """(layer_labels, top, gap), each [n, L], for one feature mode."""
    if mode == "probe":
        return top2(probe_proba)
    return trace[f"{mode}_label"], trace[f"{mode}_top"], trace[f"{mode}_gap"]


def prior_rule(prior: ExitPolicy | None, trace: dict, log):
    """The prior as a candidate: an unthresholded copy of a policy calibrated elsewhere for this
    model and task (its rule and, in probe mode, its probes, kept as they are), and its features on
    this trace. None when there is no prior, it never exits, or the trace lacks what it reads."""
    if prior is None or prior.never_exits:
        return None, None
    if prior.features == "probe":  # probes on the label logits too need a trace that holds them
        readable = (prior.probes_ is not None and trace.get("hidden") is not None
                    and trace["hidden"].shape[-1] >= prior.probes_.coef_.shape[-1])
    else:
        readable = f"{prior.features}_label" in trace
    if not readable:
        log(f"  prior: skipped (the trace lacks its {prior.features} features)")
        return None, None
    rule = with_threshold(prior, 0.0, {"prior_name": (prior.metadata or {}).get("prior_name")})
    rule.rule_ = f"prior: {(prior.metadata or {}).get('rule') or prior.kernel_}"
    if prior.features == "probe":
        return rule, top2(prior.probes_.predict_proba(trace["hidden"]))
    return rule, mode_features(trace, prior.features)


# ----------------------------------------------------------------------------------------------
# Calibration


@dataclass
class CalibrationResult:
    policy: ExitPolicy  # the chosen policy (full depth if no threshold kept the promise), metadata filled
    rows: list[dict]  # one per candidate threshold of the chosen rule: the calibration report's table
    summary: dict  # choices, guarantee, and what the policy is expected to do (also in policy.metadata)
    rules: dict = field(default_factory=dict)  # mode -> the chosen rule, unthresholded


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
              epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA, features="auto",
              score: str = "auto", min_layers=(1, 4, 8), fit_fraction: float = DEFAULT_FIT_FRACTION, seed: int = 0,
              gold: np.ndarray | None = None, groups=None, num_thresholds: int = 200, probe_C="auto",
              svm: dict | None = None, provenance: dict | None = None, log=print,
              promise: str = "agreement", history="auto", prior: ExitPolicy | None = None) -> CalibrationResult:
    """Choose one exit rule on the fit part, test its thresholds on the test part at the full
    delta, and return the policy that keeps the promise with the most FLOPs saved, with the table.

    trace: the engine's `trace(item_ids, trace_modes(features))` plus item_tokens [n] (each item's
    own token count); gold: label indices [n] (-1 where unknown) or None; groups: a key per item
    kept on one side of the split, or None; features: "auto" (label, probe), "all", a mode or a
    list (see `candidate_modes`); score: "linear", "svm", or "auto" (both families);
    promise: "agreement" or "accuracy" (needs gold); history: "auto" (rules with and without
    streak/dtop compete), True or False; provenance: model id/hash, task, template, ... copied
    into the policy's metadata; prior: a policy calibrated on other items for the same model and
    task (e.g. the shipped one), whose rule joins the candidates as it is, re-thresholded here: the
    fit part alone cannot learn as good a rule from a few hundred items. It must not have been
    calibrated on these items, or the test part would not be independent of what chose the rule.
    See the module docstring for the guarantee.
    """
    t0 = time.perf_counter()  # a duration (summary["seconds"])
    modes = candidate_modes(features)
    if score not in SCORES + ("auto",):
        raise ValueError(f"score must be one of {SCORES + ('auto',)}")
    if promise not in PROMISES:
        raise ValueError(f"promise must be one of {PROMISES}")
    missing = [m for m in modes if m != "probe" and f"{m}_label" not in trace] + (
        ["probe"] if "probe" in modes and trace.get("hidden") is None else [])
    if missing:
        raise ValueError(f"the trace lacks the features of modes {missing}: trace with modes={trace_modes(features)}")
    history_options = {"auto": (False, True), True: (True,), False: (False,)}[history]
    n, L = trace["final_label"].shape[0], dims.layers
    min_layers = [int(m) for m in min_layers if 1 <= m < L] or [1]  # the last layer never asks
    fit_idx, test_idx = split_fit_test(n, fit_fraction, seed, groups)
    final = trace["final_label"]
    gold = np.full(n, -1) if gold is None else np.asarray(gold)
    graded = gold >= 0
    has_gold = bool(graded[test_idx].any())
    if promise == "accuracy" and not (graded[fit_idx].any() and has_gold):
        raise ValueError("the accuracy promise needs gold labels on the calibration sample (--label-column)")
    # The items whose loss the promise is about: all (agreement) or those with a gold label (accuracy).
    scored = graded if promise == "accuracy" else np.ones(n, bool)
    scored_fit, scored_test = scored[fit_idx], scored[test_idx]
    n_test = int(scored_test.sum())
    full_accuracy = float((final[test_idx][graded[test_idx]] == gold[test_idx][graded[test_idx]]).mean()) if has_gold else None
    target = tolerated_rate(n_test, epsilon, delta) if promise == "agreement" else None
    log(f"calibrating on {n} items: fit {len(fit_idx)}, test {len(test_idx)}; promise {promise}, epsilon {epsilon}, "
        f"delta {delta} for one rule chosen on the fit part among modes {', '.join(modes)}"
        + (f" (the test part accepts up to {target:.2%} disagreement)" if target is not None else ""))

    probes = probe_proba = None
    fixed_C = None if probe_C == "auto" else probe_C
    if "probe" in modes:
        log("fitting per-layer probes (cross-fitted on the fit part)...")
        lens_columns = trace["hidden"].shape[-1] - dims.hidden  # the label head's logits (features.probe_input)
        probes, probe_proba, probe_C = probe_features(trace["hidden"], final, fit_idx, num_labels, C=probe_C,
                                                      seed=seed, lens_columns=lens_columns)
        log(f"  probes: L2 strength C = {probe_C:g}"
            + (" (of the grid, the lowest cross-fitted log-loss on the fit part)" if fixed_C is None else " (as given)"))
        if probes.unconverged_layers_:
            log(f"  probes: lbfgs stopped at {probes.max_iter} iterations on {len(probes.unconverged_layers_)} of "
                f"{dims.layers} layers; those probes are used as they are (the test part checks the rule they feed)")
    cost_cache = {}

    def costs(mode, first_read_layer):  # per-exit FLOPs [n, L] and the full-depth baseline [n]
        if (mode, first_read_layer) not in cost_cache:
            used, _, full_reuse = exit_costs(dims, prefix_tokens, trace["item_tokens"], mode, num_labels, first_read_layer)
            cost_cache[mode, first_read_layer] = used, full_reuse
        return cost_cache[mode, first_read_layer]

    ctx = {"features": {m: mode_features(trace, m, probe_proba) for m in modes}, "final": final, "gold": gold,
           "L": L, "min_layers": min_layers, "costs": costs, "promise": promise}
    ctx["tolerates"] = functools.partial(fit_tolerates, promise=promise, n_test=n_test, epsilon=epsilon, delta=delta)
    prior, ctx["features"]["prior"] = prior_rule(prior, trace, log)
    chosen, candidates = choose_rule(modes, history_options, score, ctx, fit_idx, scored_fit,
                                     num_thresholds, svm, log, prior, seed)
    rule, thresholds, mode = chosen.rule, chosen.thresholds, chosen.rule.features
    if chosen.source == "fit":  # a prior keeps the probes it came with
        rule.probes_ = probes if mode == "probe" else None

    # Test: fixed-sequence testing of the one chosen rule's thresholds on the test part, at delta.
    labels, top, gap = ctx["features"]["prior" if chosen.source == "prior" else mode]
    used, full_reuse = costs(mode, rule.first_read_layer)
    exits, answers = rule_outcomes(rule, thresholds, test_idx, labels, top, gap, final)
    sub = test_idx[scored_test]
    losses = item_losses(answers[scored_test], final[sub], gold[sub], promise)  # [n_test, K]
    pvalues = test_pvalues(losses, promise, epsilon, delta)
    accepted = fixed_sequence(pvalues, delta)
    rows = _rows(rule, thresholds, exits, answers, final[test_idx], gold[test_idx], graded[test_idx],
                 used[test_idx], full_reuse[test_idx], losses, pvalues, accepted, L)
    if accepted is None:
        log(f"  {mode} {rule.rule_}, min_layer {rule.min_layer}: no threshold keeps the promise (most conservative: "
            f"mean loss {rows[0]['loss']:.4f} on {n_test} items, p = {pvalues[0]:.3g} > {delta:.3g})")

    summary = {
        "promise": promise, "epsilon": epsilon, "delta": delta, "modes": list(modes), "score": score,
        "history_candidates": list(history_options), "candidates": candidates,
        "calibration_size": n, "fit_size": int(len(fit_idx)), "test_size": int(len(test_idx)),
        "scored_test_size": n_test, "seed": seed, "grouped": groups is not None,
        "fit_fraction": fit_fraction, "num_layers": L, "probe_C": probe_C if "probe" in modes else None, "full_depth_accuracy": full_accuracy,
        "gold_items": int(graded[test_idx].sum()), "tolerated_disagreement": target,
        "paper_criterion": _paper_criterion(rows, full_accuracy) if has_gold else None,
        "prior": None if prior is None else {"name": (prior.metadata or {}).get("prior_name"),
                                             "chosen": chosen.source == "prior"},
    }
    if accepted is None:
        policy = ExitPolicy.full_depth(L)
        summary.update(
            guaranteed=False, features="none", rule=None, threshold=None, min_layer=None, history=False,
            layers_skipped=0.0, flops_saved=0.0, agreement=1.0, accuracy=full_accuracy,
            exit_histogram=[0] * (L - 1) + [len(test_idx)],
            message=(f"No exit threshold keeps {_promise_words(promise, epsilon)} with confidence {1 - delta} "
                     f"on {n_test} test items (even the most conservative one failed): wrote a full-depth policy. "
                     "More calibration items or a looser --epsilon/--delta may help."))
    else:
        row = rows[accepted]
        policy = with_threshold(rule, row["threshold"])
        summary.update(
            guaranteed=True, features=policy.features, rule=rule.rule_, threshold=row["threshold"],
            min_layer=policy.min_layer, history=policy.history, layers_skipped=row["layers_skipped"],
            flops_saved=row["flops_saved"], agreement=row["agreement"], accuracy=row["accuracy"],
            p_value=row["p_value"], exit_histogram=np.bincount(exits[:, accepted], minlength=L + 1)[1:].tolist(),
            message=(f"With probability >= {1 - delta}, this policy keeps {_promise_words(promise, epsilon)} "
                     f"on items like the calibration sample. Expected (test part, {len(test_idx)} items): "
                     f"{row['layers_skipped']:.1%} of layers skipped, {row['flops_saved']:.1%} of FLOPs saved, "
                     f"agreement {row['agreement']:.2%}"
                     + (f", accuracy {row['accuracy']:.2%} (full depth {full_accuracy:.2%})." if has_gold else ".")))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    policy.metadata = {**(provenance or {}), **summary}
    log(summary["message"])
    return CalibrationResult(policy, rows, summary, {mode: rule})


def _promise_words(promise: str, epsilon: float) -> str:
    if promise == "accuracy":
        return f"its accuracy at most {epsilon:.2%} below the full model's"
    return f"disagreement with the full model at most {epsilon:.2%}"


def _rows(rule, thresholds, exits, answers, final, gold, graded, used, full_reuse, losses, pvalues, accepted, L):
    """The report's table: one row per candidate threshold of the chosen rule, on the test part."""
    wrong = answers != final[:, None]
    right = answers[graded] == gold[graded, None]
    saved = flops_saved_share(exits, used, full_reuse)
    return [{
        "mode": rule.features, "history": rule.history, "rule": rule.rule_, "min_layer": rule.min_layer, "rank": j,
        "threshold": float(t), "exit_early_share": float((exits[:, j] < L).mean()),
        "layers_skipped": float((L - exits[:, j]).mean() / L), "flops_saved": float(saved[j]),
        "agreement": float(1 - wrong[:, j].mean()), "disagreements": int(wrong[:, j].sum()),
        "accuracy": float(right[:, j].mean()) if graded.any() else None, "loss": float(losses[:, j].mean()),
        "p_value": float(pvalues[j]), "accepted": accepted is not None and j <= accepted,
    } for j, t in enumerate(thresholds)]


def _paper_criterion(rows: list[dict], full_accuracy: float, max_drop: float = 0.01) -> dict:
    """For the chosen rule, the setting with the most layers skipped whose accuracy against gold on
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
