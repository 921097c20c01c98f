"""The early-exit engine: feature modes, fitted policies, depth regrouping, batch independence."""

import numpy as np
import pytest
import torch

from adainfer_ray.engine import EarlyExitEngine
from adainfer_ray.features import LinearProbes
from adainfer_ray.policy import ExitPolicy
from conftest import build_tiny, random_items

LABEL_IDS = [5, 9, 17]


def fitted_policy(lm, items, mode="label", quantile=0.5):
    """Fit an SVM policy on a trace, then set its threshold so that about `quantile` of the items
    run to full depth and the rest stop early."""
    tr = EarlyExitEngine(lm, LABEL_IDS).trace(items)
    agrees = None
    policy = ExitPolicy(features=mode, kernel="rbf")
    if mode == "probe":
        policy.probes_ = LinearProbes(C=1e-3).fit(tr["hidden"].astype(np.float32), tr["final_label"], len(LABEL_IDS))
        p = policy.probes_.predict_proba(tr["hidden"])
        srt = np.sort(p, -1)
        top, gap, lab = srt[..., -1], srt[..., -1] - srt[..., -2], p.argmax(-1)
    else:
        top, gap, lab = tr[f"{mode}_top"], tr[f"{mode}_gap"], tr[f"{mode}_label"]
    agrees = lab == tr["final_label"][:, None]
    policy.fit(top, gap, agrees)
    from adainfer_ray.policy import exit_inputs
    L = lm.num_layers
    d = policy.decision_function(exit_inputs(top, gap, np.arange(1, L + 1), L))[:, : L - 1]
    # Halfway between two items' best scores: an item sitting exactly at the threshold would let
    # float noise (a batch's matmul blocking, ~1e-7) flip its exit.
    best = np.sort(d.max(1))
    n = int(quantile * (len(best) - 1))
    policy.threshold = float(best[n] + best[n + 1]) / 2
    return policy, tr


def test_full_depth_answer_is_the_models_own(tiny_llama):
    items = random_items(12, seed=4)
    out = EarlyExitEngine(tiny_llama, LABEL_IDS).classify(items)
    assert (out["exit_layer"] == tiny_llama.num_layers).all()
    with torch.no_grad():
        for i, x in enumerate(items):
            logits = tiny_llama.model(torch.tensor([x])).logits[0, -1, LABEL_IDS]
            assert out["label"][i] == int(logits.argmax())
            assert out["label_score"][i] == pytest.approx(float(torch.softmax(logits, -1).max()), abs=1e-5)


@pytest.mark.parametrize("mode", ["vocab", "label", "probe"])
def test_each_feature_mode_matches_a_direct_computation(tiny_llama, mode):
    """The engine's per-layer features equal what the HF model's own hidden states give."""
    items = random_items(30, seed=5)
    policy, tr = fitted_policy(tiny_llama, items, mode)
    eng = EarlyExitEngine(tiny_llama, LABEL_IDS, policy)
    L = tiny_llama.num_layers
    x = items[0]
    with torch.no_grad():
        hs = tiny_llama.model(torch.tensor([x]), output_hidden_states=True).hidden_states
        for k in range(L - 1):  # hidden_states[k+1] is layer k's raw output (before the final norm)
            label, top, gap, _, _ = eng.features(k, hs[k + 1][:, -1])
            normed = tiny_llama.final_norm(hs[k + 1][0, -1])
            if mode == "vocab":
                p = torch.softmax(tiny_llama.head(normed), -1)
                expect_label = int(tiny_llama.head(normed)[LABEL_IDS].argmax())
            elif mode == "label":
                p = torch.softmax(tiny_llama.head(normed)[LABEL_IDS], -1)
                expect_label = int(p.argmax())
            else:
                inputs = torch.cat([normed, tiny_llama.head(normed)[LABEL_IDS]]).numpy()  # state, then label logits
                p = torch.tensor(policy.probes_.predict_proba(inputs[None, None].repeat(L, 1))[0, k])
                expect_label = int(p.argmax())
            s = p.sort(descending=True).values
            assert int(label) == expect_label
            assert float(top) == pytest.approx(float(s[0]), abs=1e-5)
            assert float(gap) == pytest.approx(float(s[0] - s[1]), abs=1e-5)
            if mode != "probe":  # the trace records the same numbers for calibration
                assert float(top) == pytest.approx(float(tr[f"{mode}_top"][0, k]), abs=1e-4)


@pytest.mark.parametrize("mode", ["label", "probe", "vocab"])
def test_fitted_policy_exits_early_and_keeps_the_layers_answer(tiny_llama, mode):
    items = random_items(40, seed=6)
    policy, tr = fitted_policy(tiny_llama, items, mode)
    out = EarlyExitEngine(tiny_llama, LABEL_IDS, policy).classify(items)
    L = tiny_llama.num_layers
    early = out["exit_layer"] < L
    assert early.any() and (~early).any()
    if mode != "probe":  # an early item's label is its exit layer's answer, a late one's the full answer
        layer_answer = tr[f"{mode}_label"][np.arange(len(items)), out["exit_layer"] - 1]
        assert (out["label"] == layer_answer).all()
    assert (out["label"][~early] == tr["final_label"][~early]).all()
    assert (out["flops_used"][early] < out["flops_full"][early]).all()


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "qwen3"])
def test_results_do_not_depend_on_batch_composition(family):
    lm = build_tiny(family)
    items = random_items(37, seed=7, hi=30)
    policy, _ = fitted_policy(lm, items, "label")
    prefix = random_items(1, seed=8, lo=12, hi=13)[0]
    runs = []
    for budget in (1, 8 * 32, 10**6):  # batch sizes 1, ~8, everything at once
        eng = EarlyExitEngine(lm, LABEL_IDS, policy, prefix_ids=prefix, max_batch_tokens=budget)
        runs.append(eng.classify(items))
    order = np.random.default_rng(0).permutation(len(items))
    shuffled = EarlyExitEngine(lm, LABEL_IDS, policy, prefix_ids=prefix).classify([items[i] for i in order])
    inverse = np.argsort(order)
    runs.append({k: v[inverse] for k, v in shuffled.items()})
    assert len(set(runs[0]["exit_layer"].tolist())) > 1  # the check means something only if exits differ
    for other in runs[1:]:
        assert (other["label"] == runs[0]["label"]).all()
        assert (other["exit_layer"] == runs[0]["exit_layer"]).all()
        np.testing.assert_allclose(other["label_score"], runs[0]["label_score"], atol=1e-5)


def count_layer_rows(lm):
    """Wrap lm.layer to count (layer, item) computations, padding rows included."""
    calls = []
    orig = lm.layer

    def counting(i, h, pos, prefix_kv=None, return_kv=False, packed=None):
        calls.append((i, packed.B if packed is not None else h.shape[0]))
        return orig(i, h, pos, prefix_kv, return_kv, packed)
    lm.layer = counting
    return calls


def test_regrouping_never_carries_exited_items_and_fixed_batches_do():
    lm = build_tiny("llama")
    items = random_items(64, seed=9)
    policy, _ = fitted_policy(lm, items, "label", quantile=0.3)
    calls = count_layer_rows(lm)
    regrouped = EarlyExitEngine(lm, LABEL_IDS, policy, max_batch_tokens=10**6).classify(items)
    rows_regrouped = sum(b for _, b in calls)
    assert rows_regrouped == regrouped["exit_layer"].sum()  # exactly the layers each item needed
    assert max(b for _, b in calls) == len(items)  # and layer 0 ran as one full batch
    calls.clear()
    fixed = EarlyExitEngine(lm, LABEL_IDS, policy, regroup=False, max_batch_tokens=16 * 20).classify(items)
    assert (fixed["label"] == regrouped["label"]).all() and (fixed["exit_layer"] == regrouped["exit_layer"]).all()
    assert sum(b for _, b in calls) > rows_regrouped  # exited items ride along until the batch is done


def test_inflight_cap_admits_new_items_as_others_exit():
    lm = build_tiny("llama")
    items = random_items(50, seed=10)
    policy, _ = fitted_policy(lm, items, "label", quantile=0.3)
    full = EarlyExitEngine(lm, LABEL_IDS, policy).classify(items)
    calls = count_layer_rows(lm)
    capped = EarlyExitEngine(lm, LABEL_IDS, policy, max_inflight=8).classify(items)
    assert max(b for _, b in calls) <= 8
    assert (capped["label"] == full["label"]).all() and (capped["exit_layer"] == full["exit_layer"]).all()


def test_audit_runs_to_full_depth_without_changing_the_answer(tiny_llama):
    items = random_items(30, seed=11)
    policy, tr = fitted_policy(tiny_llama, items, "label")
    plain = EarlyExitEngine(tiny_llama, LABEL_IDS, policy).classify(items)
    audit = np.arange(30) % 2 == 0
    audited = EarlyExitEngine(tiny_llama, LABEL_IDS, policy).classify(items, audit=audit)
    assert (audited["label"] == plain["label"]).all() and (audited["exit_layer"] == plain["exit_layer"]).all()
    assert (audited["full_label"][audit] == tr["final_label"][audit]).all()
    assert (audited["full_label"][~audit] == -1).all()


def test_prefix_reuse_gives_the_same_answers_and_costs_less(tiny_llama):
    items = random_items(20, seed=12)
    prefix = random_items(1, seed=13, lo=40, hi=41)[0]
    policy, _ = fitted_policy(tiny_llama, [prefix + x for x in items], "label")
    a = EarlyExitEngine(tiny_llama, LABEL_IDS, policy, prefix_ids=prefix, reuse_prefix=True).classify(items)
    b = EarlyExitEngine(tiny_llama, LABEL_IDS, policy, prefix_ids=prefix, reuse_prefix=False).classify(items)
    assert (a["label"] == b["label"]).all() and (a["exit_layer"] == b["exit_layer"]).all()
    np.testing.assert_allclose(a["label_score"], b["label_score"], atol=1e-4)
    assert (a["flops_used"] < b["flops_used"]).all()
    assert (a["flops_full"] == b["flops_full"]).all()  # the reference is the same whole-prompt cost


def test_length_batches_is_the_engines_step_rule():
    """One batch rule for the engine's layer steps and the benchmark's baselines: shortest first,
    padded size (count x longest) within the budget, at least one item per batch."""
    from adainfer_ray.engine import length_batches

    lengths = [5, 40, 3, 12, 12, 7, 100, 9]
    batches = length_batches(lengths, 36)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 36
    assert [len(b) for b in batches] == [4, 2, 1, 1]  # 3,5,7,9 | 12,12 | 40 | 100 (alone, over budget)
    lm = build_tiny("llama")
    items = [random_items(1, seed=20 + n, lo=n, hi=n + 1)[0] for n in lengths]
    calls = count_layer_rows(lm)
    EarlyExitEngine(lm, LABEL_IDS, max_batch_tokens=36, regroup=False).classify(items)
    assert [b for layer, b in calls if layer == 0] == [len(b) for b in batches]


def test_trace_keeps_float32_hidden_states_and_label_logits_the_probes_read(tiny_llama):
    tr = EarlyExitEngine(tiny_llama, LABEL_IDS).trace(random_items(5, seed=21))
    assert tr["hidden"].dtype == np.float32
    x = random_items(5, seed=21)[0]
    with torch.no_grad():
        hs = tiny_llama.model(torch.tensor([x]), output_hidden_states=True).hidden_states
        expect = tiny_llama.final_norm(hs[1][0, -1]).numpy()
        label_logits = tiny_llama.head(tiny_llama.final_norm(hs[1][0, -1]))[LABEL_IDS].numpy()
    D = expect.shape[-1]
    assert tr["hidden"].shape[-1] == D + len(LABEL_IDS)  # features.probe_input: the state, then the label logits
    np.testing.assert_allclose(tr["hidden"][0, 0, :D], expect, atol=1e-5)
    np.testing.assert_allclose(tr["hidden"][0, 0, D:], label_logits, atol=1e-4)


def test_probes_fitted_on_the_state_alone_still_run(tiny_llama):
    """A policy calibrated before the label logits joined the probes' input reads x alone."""
    items = random_items(20, seed=22)
    tr = EarlyExitEngine(tiny_llama, LABEL_IDS).trace(items)
    D = tr["hidden"].shape[-1] - len(LABEL_IDS)
    policy = ExitPolicy(features="probe", kernel="rbf")
    policy.probes_ = LinearProbes(C=1e-2).fit(tr["hidden"][..., :D], tr["final_label"], len(LABEL_IDS))
    eng = EarlyExitEngine(tiny_llama, LABEL_IDS, policy)
    with torch.no_grad():
        hs = tiny_llama.model(torch.tensor([items[0]]), output_hidden_states=True).hidden_states
        _, top, _, _, _ = eng.features(2, hs[3][:, -1])
    expect = policy.probes_.predict_proba(tr["hidden"][:1])[0, 2].max()  # reads the state columns only
    assert float(top) == pytest.approx(float(expect), abs=1e-5)


def test_trace_computes_only_the_modes_asked(tiny_llama):
    items = random_items(7, seed=5)
    full = EarlyExitEngine(tiny_llama, LABEL_IDS).trace(items)
    slim = EarlyExitEngine(tiny_llama, LABEL_IDS).trace(items, modes=("label",))
    assert set(slim) == {"final_label", "final_probs", "label_label", "label_top", "label_gap"}  # no vocab head, no hidden states
    for key in slim:
        np.testing.assert_array_equal(slim[key], full[key])
    assert "hidden" in EarlyExitEngine(tiny_llama, LABEL_IDS).trace(items, modes=("label", "probe"))
    with pytest.raises(ValueError, match="unknown feature modes"):
        EarlyExitEngine(tiny_llama, LABEL_IDS).trace(items, modes=("logits",))


def test_history_state_travels_with_items_under_regrouping(tiny_llama):
    """A history policy exits the same items at the same layers whatever the batching: each item's
    streak and recent tops live on the item, not on a batch slot."""
    from adainfer_ray.policy import history_features
    from adainfer_ray.rules import decision_values, linear_rule

    items = random_items(40, seed=8)
    tr = EarlyExitEngine(tiny_llama, LABEL_IDS).trace(items)
    L = tiny_llama.num_layers
    policy = linear_rule("label", L, 2, 0.0, 0.0, w_streak=0.3, w_dtop=0.5)
    d = decision_values(policy, tr["label_top"], tr["label_gap"], tr["label_label"])[:, 1: L - 1]
    best = np.sort(d.max(1))
    policy.threshold = float(best[20] + best[21]) / 2  # about half exit early
    runs = [EarlyExitEngine(tiny_llama, LABEL_IDS, policy=policy, regroup=r, max_batch_tokens=b).classify(items)
            for r, b in ((True, 64), (True, 10_000), (False, 64))]
    for out in runs[1:]:
        np.testing.assert_array_equal(out["exit_layer"], runs[0]["exit_layer"])
        np.testing.assert_array_equal(out["label"], runs[0]["label"])
    assert 0 < (runs[0]["exit_layer"] < L).sum() < len(items)
    streak, _ = history_features(tr["label_label"], tr["label_top"])
    assert streak.max() > 1  # the streak did vary, so the test exercised it


@pytest.mark.parametrize("mode", ["vocab", "label"])
def test_label_probs_are_the_exit_layers_distribution(tiny_llama, mode):
    """label_probs [N, K]: every label's probability at the exit layer, summing to 1, whose largest is
    label_score at index label; an audited item keeps its exit layer's, not full depth's."""
    items = random_items(30, seed=11)
    policy, tr = fitted_policy(tiny_llama, items, mode)
    audit = np.arange(len(items)) % 2 == 0
    out = EarlyExitEngine(tiny_llama, LABEL_IDS, policy).classify(items, audit)
    probs = out["label_probs"]
    assert probs.shape == (len(items), len(LABEL_IDS)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == out["label"]).all()
    np.testing.assert_allclose(probs.max(1), out["label_score"], atol=1e-6)
    early = out["exit_layer"] < tiny_llama.num_layers
    assert early.any() and (early & audit).any()
    # Full depth's distribution differs from an early exit's: audited early items keep the early one.
    full = EarlyExitEngine(tiny_llama, LABEL_IDS).classify(items)["label_probs"]
    np.testing.assert_allclose(probs[~early], full[~early], atol=1e-5)
    assert not np.allclose(probs[early & audit], full[early & audit], atol=1e-4)
    np.testing.assert_allclose(tr["final_probs"], full, atol=1e-5)
