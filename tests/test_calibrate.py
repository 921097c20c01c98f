"""Calibration: the binomial test, Learn-then-Test, simulated exits, and calibrate() end to end."""

import json
import math
import os

import numpy as np
import pytest

from adainfer_ray import calibrate as cal
from adainfer_ray import choice, probes, stats
from adainfer_ray.engine import EarlyExitEngine
from adainfer_ray.exits import exit_answers, exit_costs, simulate_exits
from adainfer_ray.features import LinearProbes
from adainfer_ray.flops import ModelDims, item_flops
from adainfer_ray.policy import ExitPolicy, PolicyError
from adainfer_ray.rules import decision_values
from conftest import build_tiny, random_items

LABEL_IDS = [5, 9, 17]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- statistics -----------------------------------------------------------------------------------


def brute_cdf(k, n, p):
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, k + 1))


@pytest.mark.parametrize("n", [1, 2, 7, 30, 120])
def test_binomial_pvalue_is_the_exact_lower_tail(n):
    for eps in (0.001, 0.01, 0.1, 0.5):
        for k in sorted({0, 1, n // 3, n - 1, n}):
            want = brute_cdf(k, n, eps)
            assert stats.binomial_pvalue(k, n, eps) == pytest.approx(want, rel=1e-9, abs=1e-300)
            assert stats._binom_cdf_logspace(k, n, eps) == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_binomial_pvalue_fallback_is_stable_for_large_n():
    # Terms like 0.99**5000 underflow naive products; the log-space sum must still be right.
    assert stats._binom_cdf_logspace(30, 5000, 0.01) == pytest.approx(stats.binomial_pvalue(30, 5000, 0.01), rel=1e-9)
    assert stats._binom_cdf_logspace(0, 100000, 0.01) == pytest.approx(0.99**100000, rel=1e-6)


def test_ltt_accepts_the_last_threshold_before_the_first_failure():
    n, eps, delta = 2000, 0.01, 0.05
    # P(Binom(2000, 0.01) <= k) <= 0.05 holds for k <= 12 and fails from 13 on.
    assert stats.binomial_pvalue(12, n, eps) <= delta < stats.binomial_pvalue(13, n, eps)
    losses = [0, 3, 8, 12, 13, 5, 2]  # the later, passing counts must not be accepted: testing stopped
    accepted, p = cal.learn_then_test(losses, n, eps, delta)
    assert accepted == 3
    assert p[4] > delta and p[5] <= delta


def test_ltt_accepts_every_candidate_when_all_pass():
    accepted, _ = cal.learn_then_test([0, 0, 1, 2], 5000, 0.01, 0.05)
    assert accepted == 3


def test_ltt_rejects_everything_when_n_is_too_small():
    # With zero disagreements the p-value is (1 - eps)^n: below 0.05 only from n = 299 on.
    assert cal.learn_then_test([0, 0, 0], 298, 0.01, 0.05)[0] is None
    assert cal.learn_then_test([0, 0, 0], 299, 0.01, 0.05)[0] == 2


def test_ltt_keeps_its_promise_on_synthetic_risks():
    """Known true risks per threshold; the chosen threshold's true risk exceeds epsilon in at most
    a delta share of repetitions (up to sampling noise of the check itself)."""
    rng = np.random.default_rng(0)
    n, eps, delta, reps = 500, 0.05, 0.1, 600
    risks = np.linspace(0.0, 0.15, 31)  # candidates from most conservative (risk 0) to least
    bad = 0
    for _ in range(reps):
        accepted, _ = cal.learn_then_test(rng.binomial(n, risks), n, eps, delta)
        bad += accepted is not None and risks[accepted] > eps
    assert bad / reps <= delta + 3 * math.sqrt(delta * (1 - delta) / reps)
    # and it is not vacuous: it usually accepts something close to the boundary
    accepted, _ = cal.learn_then_test(np.round(n * risks).astype(int), n, eps, delta)
    assert accepted is not None and 0.02 <= risks[accepted] <= eps


# -- simulated exits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("min_layer", [1, 3, 6])
def test_simulate_exits_equals_a_per_item_loop(min_layer):
    rng = np.random.default_rng(min_layer)
    n, L = 50, 6
    decisions = rng.normal(size=(n, L))
    thresholds = np.sort(rng.normal(size=20))[::-1]
    got = simulate_exits(decisions, thresholds, min_layer)
    for i in range(n):
        for j, t in enumerate(thresholds):
            want = next((layer for layer in range(min_layer, L) if decisions[i, layer - 1] >= t), L)
            assert got[i, j] == want
    assert (np.diff(got, axis=1) <= 0).all()  # a lower threshold never stops later


def test_exit_answers_use_the_models_own_label_at_full_depth():
    layer_labels = np.array([[0, 1, 2], [2, 2, 0]])
    exits = np.array([[1, 3], [2, 3]])
    got = exit_answers(exits, layer_labels, final_label=np.array([1, 1]))
    assert got.tolist() == [[0, 1], [2, 1]]


def test_exit_costs_equal_item_flops(tiny_llama):
    dims = ModelDims.from_config(tiny_llama.config)
    used, full, reuse = exit_costs(dims, 11, [5, 9, 5], "label", 3, min_layer=2)
    for i, length in enumerate([5, 9, 5]):
        for e in range(1, dims.layers + 1):
            f = item_flops(dims, 11, length, e, "label", 3, 2, reuse_prefix=True)
            assert used[i, e - 1] == f["used"] and full[i] == f["full"] and reuse[i] == f["full_reuse"]


# -- calibrate() on a tiny random model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_trace():
    lm = build_tiny("llama")
    items = random_items(600, seed=3)
    prefix = random_items(1, seed=99, lo=12, hi=13)[0]
    trace = EarlyExitEngine(lm, LABEL_IDS, prefix_ids=prefix).trace(items)  # what the job's trace actors run
    trace["item_tokens"] = np.array([len(x) for x in items])
    return lm, trace, items, prefix


PROVENANCE = {"model_id": "tiny-llama", "model_hash": "llama", "task_fingerprint": "tpl-a", "task": "toy"}


def run_calibrate(tiny_trace, **kw):
    lm, trace, _, prefix = tiny_trace
    kw = {"epsilon": 0.1, "delta": 0.05, "provenance": PROVENANCE, "log": lambda *_: None, **kw}
    return cal.calibrate(trace, ModelDims.from_config(lm.config), len(prefix), len(LABEL_IDS), **kw)


def test_calibrate_keeps_its_promise_and_saves(tiny_trace, tmp_path):
    lm, trace, items, prefix = tiny_trace
    gold = np.random.default_rng(0).integers(0, 3, len(items))
    result = run_calibrate(tiny_trace, gold=gold)
    s = result.summary
    assert s["guaranteed"] and s["layers_skipped"] > 0 and s["agreement"] >= 1 - 0.1
    assert s["promise"] == "agreement" and s["modes"] == ["label", "probe"]  # vocab is opt-in
    # one finalist per mode x (without, with history) x family (RBF SVM, linear); the tested rule is
    # the one marked chosen, and no finalist as simple saves more on the fit part
    assert [(c["mode"], c["history"], c["rule"].startswith("svm")) for c in s["candidates"]] == [
        (m, h, f) for m in ("label", "probe") for h in (False, True) for f in (True, False)]
    (chosen,) = [c for c in s["candidates"] if c["chosen"]]
    assert (s["features"], s["history"], s["rule"]) == (chosen["mode"], chosen["history"], chosen["rule"])
    plain = [c["fit_flops_saved"] or -1 for c in s["candidates"] if not c["history"] and not c["rule"].startswith("svm")]
    assert chosen["history"] or chosen["rule"].startswith("svm") or chosen["fit_flops_saved"] == max(plain)
    assert sum(s["exit_histogram"]) == s["test_size"] == 600 - round(600 * cal.DEFAULT_FIT_FRACTION)
    meta = result.policy.metadata
    assert meta["model_hash"] == "llama" and meta["epsilon"] == 0.1 and meta["calibration_size"] == 600
    # only the chosen rule's thresholds were tested, at the whole delta: accepted rows form a prefix
    assert {r["rule"] for r in result.rows} == {s["rule"]}
    acc = [r["accepted"] for r in result.rows]
    assert acc == sorted(acc, reverse=True)
    last = max(r["rank"] for r in result.rows if r["accepted"])
    assert result.rows[last]["p_value"] <= 0.05 and (last + 1 == len(result.rows) or result.rows[last + 1]["p_value"] > 0.05)
    assert s["flops_saved"] == result.rows[last]["flops_saved"] and result.policy.threshold == result.rows[last]["threshold"]

    # artifact round trip: same decisions, same metadata
    result.policy.save(tmp_path / "pol")
    loaded = ExitPolicy.load(tmp_path / "pol")
    X = np.random.default_rng(1).random((40, len(result.policy.inputs)))
    np.testing.assert_allclose(loaded.decision_function(X), result.policy.decision_function(X))
    assert loaded.threshold == result.policy.threshold and loaded.metadata["model_hash"] == "llama"
    assert json.loads((tmp_path / "pol" / "policy.json").read_text())["metadata"]["delta"] == 0.05

    # the report renders
    from adainfer_ray.calibration_report import write_report

    folder = write_report(result, str(tmp_path / "report"))
    assert {"report.md", "calibration.json", "savings_vs_agreement.png"} <= set(os.listdir(folder))


@pytest.mark.parametrize("mode,score,history", [("label", "linear", False), ("probe", "linear", False),
                                                  ("label", "svm", False), ("label", "linear", True),
                                                  ("probe", "linear", True)])
def test_engine_exits_where_the_simulation_says(tiny_trace, mode, score, history):
    """The calibrated numbers are only true if the engine stops where the simulation assumed."""
    lm, trace, items, prefix = tiny_trace
    result = run_calibrate(tiny_trace, features=mode, score=score, epsilon=0.2, history=history)
    policy = result.policy
    assert policy.features == mode and policy.history == history and result.summary["guaranteed"]
    proba = policy.probes_.predict_proba(trace["hidden"]) if mode == "probe" else None
    labels, top, gap = cal.mode_features(trace, mode, proba)
    sim = simulate_exits(decision_values(policy, top, gap, labels), [policy.threshold], policy.min_layer)[:, 0]
    for regroup in (True, False):  # regrouping moves items between steps: their history moves with them
        out = EarlyExitEngine(lm, LABEL_IDS, policy=policy, prefix_ids=prefix, regroup=regroup).classify(items)
        # float16 hidden states in the trace vs float32 in the engine can flip a decision at the threshold
        assert (out["exit_layer"] == sim).mean() >= 0.97
        assert (out["label"] == exit_answers(sim[:, None], labels, trace["final_label"])[:, 0]).mean() >= 0.97


def test_no_threshold_passes_gives_a_full_depth_policy(tiny_trace, tmp_path):
    lm, trace, _, prefix = tiny_trace
    small = {k: v[:60] for k, v in trace.items()}  # 42 test items can never show risk <= 1% at 95%
    result = cal.calibrate(small, ModelDims.from_config(lm.config), len(prefix), len(LABEL_IDS),
                           epsilon=0.01, delta=0.05, provenance=PROVENANCE, log=lambda *_: None)
    assert result.policy.never_exits and not result.summary["guaranteed"]
    assert "even the most conservative one failed" in result.summary["message"]
    assert "full-depth policy" in result.summary["message"]
    assert not any(r["accepted"] for r in result.rows)
    result.policy.save(tmp_path / "full")
    loaded = ExitPolicy.load(tmp_path / "full")
    assert loaded.never_exits and loaded.metadata["guaranteed"] is False
    out = EarlyExitEngine(lm, LABEL_IDS, policy=loaded, prefix_ids=prefix).classify(random_items(5))
    assert (out["exit_layer"] == lm.num_layers).all()


def test_a_calibrated_policy_refuses_another_model_or_template(tiny_trace):
    # calibration copies the provenance that check_compatible reads (its cases: test_policy.py)
    policy = run_calibrate(tiny_trace, features="label").policy
    policy.check_compatible("llama", "tpl-a", 6)  # its own model and template: fine
    with pytest.raises(PolicyError, match="calibrated for model"):
        policy.check_compatible("another-hash", "tpl-a", 6)
    with pytest.raises(PolicyError, match="template"):
        policy.check_compatible("llama", "tpl-b", 6)


def test_groups_stay_on_one_side_of_the_split():
    groups = np.repeat(np.arange(50), np.random.default_rng(0).integers(1, 9, 50))  # dependent rows in groups
    fit, test = cal.split_fit_test(len(groups), 0.5, seed=1, groups=groups)
    assert not set(groups[fit]) & set(groups[test])
    assert sorted(np.concatenate([fit, test]).tolist()) == list(range(len(groups)))
    assert 0.3 < len(fit) / len(groups) < 0.7
    fit2, _ = cal.split_fit_test(len(groups), 0.5, seed=2, groups=groups)
    assert fit.tolist() != fit2.tolist()  # the seed draws the split


def test_calibration_with_groups_records_it(tiny_trace):
    lm, trace, items, _ = tiny_trace
    groups = np.arange(len(items)) // 3
    result = run_calibrate(tiny_trace, groups=groups, epsilon=0.2)
    assert result.summary["grouped"] and result.summary["fit_size"] % 3 == 0


def test_accuracy_promise_needs_gold_and_says_so(tiny_trace):
    lm, trace, items, _ = tiny_trace
    with pytest.raises(ValueError, match="gold labels"):
        run_calibrate(tiny_trace, promise="accuracy")
    gold = trace["final_label"].copy()
    gold[::7] = (gold[::7] + 1) % 3  # full depth is right on about 6 items in 7
    result = run_calibrate(tiny_trace, promise="accuracy", gold=gold, epsilon=0.1)
    s = result.summary
    assert s["promise"] == "accuracy" and s["guaranteed"] and "accuracy at most 10.00% below" in s["message"]
    assert s["accuracy"] >= s["full_depth_accuracy"] - 0.1
    row = next(r for r in result.rows if r["accepted"] and r["threshold"] == s["threshold"])
    assert row["loss"] == pytest.approx(s["full_depth_accuracy"] - s["accuracy"])  # loss = accuracy lost
    assert result.policy.promise["promise"] == "accuracy"


def test_trace_without_vocab_calibrates_and_asks_for_missing_modes(tiny_trace):
    lm, trace, items, prefix = tiny_trace
    slim = {k: v for k, v in trace.items() if not k.startswith("vocab_")}
    result = run_calibrate((lm, slim, items, prefix), epsilon=0.2)
    assert result.summary["guaranteed"]
    with pytest.raises(ValueError, match="modes=.*vocab"):
        run_calibrate((lm, slim, items, prefix), features="all")
    assert cal.trace_modes() == ("label", "probe") and cal.trace_modes("all") == ("vocab", "label", "probe")


def test_score_auto_lets_the_fit_part_choose_the_family(tiny_trace):
    result = run_calibrate(tiny_trace, features="label", epsilon=0.2)
    assert result.summary["score"] == "auto"
    linear = run_calibrate(tiny_trace, features="label", epsilon=0.2, score="linear")
    svm = run_calibrate(tiny_trace, features="label", epsilon=0.2, score="svm")
    # both families were candidates: auto's rule is one of theirs
    assert result.rules["label"].rule_ in (linear.rules["label"].rule_, svm.rules["label"].rule_)


def test_probe_strength_is_chosen_on_the_fit_part_by_cross_fitted_log_loss():
    rng = np.random.default_rng(0)

    def chosen_C(n, dims, noise):  # labels from one direction of [n, 2 layers, dims] states, plus noise
        x = rng.normal(size=(n, 2, dims)).astype(np.float32)
        y = ((x[:, :, 0].mean(1) + noise * rng.normal(size=n)) > 0).astype(int)
        fitted, proba, C = probes.probe_features(x, y, np.arange(n), 2)
        assert proba.shape == (n, 2, 2) and fitted.coef_.shape == (2, 2, dims)
        return C

    # Many items, few clean dimensions: the weakest penalty; few items in many dimensions: strong.
    assert chosen_C(2000, 4, 0.0) == max(probes.PROBE_C_GRID)
    assert chosen_C(60, 400, 1.0) < max(probes.PROBE_C_GRID)
    x = rng.normal(size=(40, 2, 8)).astype(np.float32)
    assert probes.probe_features(x, (x[:, 0, 0] > 0).astype(int), np.arange(40), 2, C=0.5)[2] == 0.5  # as given


def test_the_label_logits_cost_the_probes_less_than_the_state_columns():
    """probe_input ends with the label head's logits: a probe may lean on the model's own answer
    direction at a fraction of the penalty, so few items in many dimensions find it anyway."""
    rng = np.random.default_rng(2)
    n, dims = 80, 300
    x = rng.normal(size=(2 * n, 1, dims + 1)).astype(np.float32)  # [n, L, D + 1]: the last column is the "logit"
    y = (x[:, 0, -1] + 0.3 * rng.normal(size=2 * n) > 0).astype(int)
    fit, held = np.arange(n), np.arange(n, 2 * n)

    def held_out_log_loss(lens_columns):
        p = probes.fit_probes(x[fit], y[fit], 2, C=0.003, lens_columns=lens_columns).predict_proba(x[held])[:, 0]
        return -np.log(p[np.arange(n), y[held]]).mean()

    assert held_out_log_loss(1) < 0.8 * held_out_log_loss(0)
    # the scaling is folded back: the probes apply to raw inputs, as the engine feeds them
    fitted = probes.fit_probes(x[fit], y[fit], 2, C=0.003, lens_columns=1)
    assert abs(fitted.coef_[0, 1, -1] - fitted.coef_[0, 0, -1]) > 10 * np.abs(fitted.coef_[0, :, :-1]).max()


def test_probes_that_stop_at_max_iter_say_so_once_instead_of_warning(recwarn):
    """A normal run prints no warnings: lbfgs stopping early on a layer is recorded on the probes
    (calibrate logs it in one line), not raised as a ConvergenceWarning per layer."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 3, 20)).astype(np.float32)
    y = rng.integers(0, 4, 120)  # noise in 20 dimensions at C = 100: far from converged after 2 steps
    short = LinearProbes(C=100.0, max_iter=2).fit(x, y, 4)
    assert short.unconverged_layers_ == [0, 1, 2]
    assert LinearProbes(C=0.01).fit(x, y, 4).unconverged_layers_ == []
    assert not [w for w in recwarn if "converge" in str(w.message)]


def _candidate(saved_per_item, history):
    """A fit-part candidate whose items save saved_per_item [m] at one threshold, with no loss."""
    rule = ExitPolicy(features="probe", kernel="linear", history=history)
    m = len(saved_per_item)
    return choice.Candidate(rule, np.array([0.5]), float(saved_per_item.mean()), "fit", saved_per_item[:, None],
                         np.ones(m), np.zeros((m, 1)), np.ones(m, bool))


def test_a_richer_rule_must_beat_a_simpler_one_by_more_than_the_fit_parts_noise():
    rng = np.random.default_rng(1)
    tolerates = lambda losses: losses.mean(0) <= 0.01  # noqa: E731
    simple = _candidate(rng.choice([0.0, 0.6], 300), history=False)  # saves about 30%, noisily
    noise = rng.normal(0, 0.3, 300)
    noise -= noise.mean()
    lucky = _candidate(simple.item_saved[:, 0] + noise + 0.01, history=True)  # 1 point more: within noise
    better = _candidate(simple.item_saved[:, 0] + noise + 0.15, history=True)  # 15 points more
    assert lucky.fit_saved > simple.fit_saved and lucky.complexity > simple.complexity
    assert choice.simplest_within_noise([lucky, simple], tolerates) is simple
    assert choice.simplest_within_noise([better, simple], tolerates) is better
    # a prior was not learned on this fit part: it is not penalised for its form
    prior = _candidate(lucky.item_saved[:, 0], history=True)
    prior.source = "prior"
    assert choice.simplest_within_noise([prior, simple], tolerates) is prior


def test_audit_upper_bound_is_exact_clopper_pearson():
    # with k events in n, the bound b is where P(Binom(n, b) <= k) = 5%
    for k, n in [(0, 300), (3, 300), (1, 40), (10, 1000)]:
        b = stats.upper_bound(k, n)
        assert stats.binomial_cdf(k, n, b) == pytest.approx(0.05, rel=1e-6)
    assert stats.upper_bound(0, 300) < 0.01 < stats.upper_bound(0, 298)
    assert stats.rows_to_confirm(0.01) == 299 and stats.upper_bound(0, 0) is None
    lo = stats.lower_bound(16, 600)  # P(Binom(n, lo) >= k) = 5%
    assert 1 - stats.binomial_cdf(15, 600, lo) == pytest.approx(0.05, rel=1e-6) and stats.lower_bound(0, 10) == 0


# -- a prior: a rule learned on other items for the same model and task ---------------------------


def test_a_prior_rule_joins_the_candidates_and_is_tested_like_any_other(tiny_trace, tmp_path):
    lm, trace, items, prefix = tiny_trace
    dims = ModelDims.from_config(lm.config)
    elsewhere, here = np.arange(300), np.arange(300, 600)  # the prior never sees the items it is tested on
    part = lambda idx: {k: v[idx] for k, v in trace.items()}  # noqa: E731
    prior = cal.calibrate(part(elsewhere), dims, len(prefix), len(LABEL_IDS), epsilon=0.2, features="probe",
                          log=lambda *_: None).policy
    prior.metadata["prior_name"] = "made-elsewhere"
    logged = []
    result = cal.calibrate(part(here), dims, len(prefix), len(LABEL_IDS), epsilon=0.2, prior=prior,
                           log=logged.append)
    s = result.summary
    assert [c["mode"] for c in s["candidates"]][-1] == "prior" and any("fit part: prior" in m for m in logged)
    assert s["prior"]["name"] == "made-elsewhere"
    best = max(s["candidates"], key=lambda c: c["fit_flops_saved"] or -1)
    assert s["prior"]["chosen"] == (best["mode"] == "prior")
    assert s["guaranteed"] and s["agreement"] >= 1 - 0.2  # whichever won, only its thresholds were tested
    assert {r["rule"] for r in result.rows} == {s["rule"]}

    # A trace from before the label logits joined the probes' input cannot feed this prior's probes
    old_trace = {**part(here), "hidden": trace["hidden"][here][..., : dims.hidden]}
    logged = []
    assert cal.prior_rule(prior, old_trace, logged.append) == (None, None) and "prior: skipped" in logged[0]

    # As the prior: its probes and weights, not the fit part's; round trip and engine agree
    forced = cal.calibrate(part(here), dims, len(prefix), len(LABEL_IDS), epsilon=0.2, prior=prior,
                           features="label", score="linear", history=False, min_layers=(29,),
                           log=lambda *_: None)  # fresh candidates that can hardly exit: the prior wins
    policy = forced.policy
    assert forced.summary["prior"]["chosen"] and policy.probes_ is prior.probes_
    np.testing.assert_array_equal(policy.vectors_, prior.vectors_)
    policy.save(tmp_path / "pol")
    labels, top, gap = cal.top2(ExitPolicy.load(tmp_path / "pol").probes_.predict_proba(trace["hidden"][here]))
    sim = simulate_exits(decision_values(policy, top, gap, labels), [policy.threshold], policy.min_layer)[:, 0]
    out = EarlyExitEngine(lm, LABEL_IDS, policy=policy, prefix_ids=prefix).classify([items[i] for i in here])
    assert (out["exit_layer"] == sim).mean() >= 0.97


def test_the_job_takes_a_prior_only_where_it_matches_and_never_from_the_same_input(tiny_trace, tmp_path):
    from adainfer_ray.job.plan import calibration_prior

    lm, trace, _, prefix = tiny_trace
    policy = run_calibrate(tiny_trace, epsilon=0.2).policy
    policy.metadata.update(num_layers=lm.config.num_hidden_layers, input="/data/a.parquet")
    policy.save(tmp_path / "pol")
    facts = {"model_id": "tiny-llama", "model_hash": "llama", "num_layers": lm.config.num_hidden_layers,
             "task": "toy", "task_fingerprint": "tpl-a", "input": "/data/b.parquet"}
    logged = []
    assert calibration_prior("none", facts, "agreement", logged.append) is None
    assert calibration_prior("default", facts, "agreement", logged.append) is None  # none ships for tiny-llama
    assert any("learned from the sample alone" in m for m in logged)
    prior = calibration_prior(str(tmp_path / "pol"), facts, "agreement", logged.append)
    assert prior is not None and prior.metadata["prior_name"] == str(tmp_path / "pol")
    assert calibration_prior(str(tmp_path / "pol"), {**facts, "input": "/data/a.parquet"}, "agreement",
                             logged.append) is None and "same input" in logged[-1]
    with pytest.raises(PolicyError, match="--prior .*another prompt"):
        calibration_prior(str(tmp_path / "pol"), {**facts, "task_fingerprint": "tpl-b"}, "agreement")
