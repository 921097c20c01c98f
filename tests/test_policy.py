"""The exit policy: SVM decisions computed without sklearn at run time, artifacts that are pure data."""

import json
from pathlib import Path

import numpy as np
import pytest

from adainfer_ray.features import LinearProbes
from adainfer_ray.policy import ExitPolicy, PolicyError, exit_inputs


def synthetic(n=300, L=8, seed=0):
    """Per-layer confidences that grow with depth; a layer agrees with the final answer when confident."""
    rng = np.random.default_rng(seed)
    top = np.clip(0.5 + 0.06 * np.arange(1, L + 1) + rng.normal(0, 0.12, (n, L)), 0.5, 1.0)
    gap = 2 * top - 1
    agrees = rng.random((n, L)) < top ** 3
    return top, gap, agrees


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_decision_function_matches_sklearn(kernel):
    from sklearn.svm import SVC

    top, gap, agrees = synthetic()
    policy = ExitPolicy(features="label", kernel=kernel, max_train=10**6).fit(top, gap, agrees)
    L = top.shape[1]
    X = exit_inputs(top, gap, np.arange(1, L + 1), L)[:, : L - 1].reshape(-1, 3)
    ref = SVC(kernel=kernel, gamma="scale").fit(X, agrees[:, : L - 1].reshape(-1).astype(int))
    np.testing.assert_allclose(policy.decision_function(X), ref.decision_function(X), atol=1e-6)
    # deeper and more confident means more willing to stop
    assert policy.decision_function(np.array([0.99, 0.98, 0.9])) > policy.decision_function(np.array([0.5, 0.0, 0.1]))


def test_save_load_roundtrip_is_pure_data(tmp_path):
    top, gap, agrees = synthetic()
    policy = ExitPolicy(features="probe", min_layer=2, threshold=0.3).fit(top, gap, agrees)
    rng = np.random.default_rng(1)
    policy.probes_ = LinearProbes().fit(rng.normal(size=(40, 8, 6)), rng.integers(0, 3, 40), 3)
    policy.metadata = {"model_hash": "abc", "task_fingerprint": "t1", "epsilon": 0.01}
    folder = Path(policy.save(tmp_path / "p"))
    assert sorted(p.name for p in folder.iterdir()) == ["arrays.safetensors", "policy.json"]
    json.loads((folder / "policy.json").read_text())  # plain JSON
    loaded = ExitPolicy.load(folder)
    X = exit_inputs(top, gap, np.arange(1, 9), 8)
    np.testing.assert_array_equal(loaded.decision_function(X), policy.decision_function(X))
    np.testing.assert_array_equal(loaded.probes_.coef_, policy.probes_.coef_)
    for layers_run in range(1, 9):
        np.testing.assert_array_equal(loaded.exit_mask(layers_run, top[:, 0], gap[:, 0]),
                                      policy.exit_mask(layers_run, top[:, 0], gap[:, 0]))
    assert not loaded.exit_mask(1, top[:, 0], gap[:, 0]).any()  # below min_layer
    assert not loaded.exit_mask(8, np.ones(3), np.ones(3)).any()  # the last layer is not the policy's call


def test_incompatible_or_broken_policies_are_refused(tmp_path):
    top, gap, agrees = synthetic()
    policy = ExitPolicy(features="label").fit(top, gap, agrees)
    policy.metadata = {"model_id": "m", "model_hash": "abc", "task": "sentiment", "task_fingerprint": "t1"}
    policy.save(tmp_path / "p")
    loaded = ExitPolicy.load(tmp_path / "p" / "policy.json")
    loaded.check_compatible("abc", "t1", 8)
    with pytest.raises(PolicyError, match="calibrated for model"):
        loaded.check_compatible("other", "t1", 8)
    with pytest.raises(PolicyError, match="template"):
        loaded.check_compatible("abc", "t2", 8)
    with pytest.raises(PolicyError, match="8-layer"):
        loaded.check_compatible("abc", "t1", 30)
    (tmp_path / "p" / "policy.json").write_text("{not json")
    with pytest.raises(PolicyError, match="cannot read exit policy"):
        ExitPolicy.load(tmp_path / "p")
    with pytest.raises(PolicyError, match="cannot read"):
        ExitPolicy.load(tmp_path / "missing")


def test_full_depth_policy_never_exits():
    policy = ExitPolicy.full_depth(8)
    assert not policy.exit_mask(4, np.ones(5), np.ones(5)).any()
    assert not policy.asks_at(4)


def test_shipped_policies_without_history_load_and_save_as_before(tmp_path):
    from adainfer_ray.policy import SHIPPED_POLICIES

    for folder in sorted(SHIPPED_POLICIES.iterdir()):
        policy = ExitPolicy.load(folder)
        assert not policy.history and policy.inputs == ("top", "gap", "depth")
        assert policy.first_read_layer == policy.min_layer
        policy.save(tmp_path / folder.name)
        before = json.loads((folder / "policy.json").read_text())
        after = json.loads((tmp_path / folder.name / "policy.json").read_text())
        assert "history" not in after and set(after) == set(before)


def test_history_policy_round_trip_and_features():
    from adainfer_ray.policy import history_features
    from adainfer_ray.rules import linear_rule

    labels = np.array([[0, 0, 1, 1, 1, 0]])
    top = np.array([[0.5, 0.6, 0.55, 0.7, 0.9, 0.8]])
    streak, dtop = history_features(labels, top, lag=2)
    assert streak.tolist() == [[1, 2, 1, 2, 3, 1]]
    np.testing.assert_allclose(dtop, [[0.0, 0.1, 0.05, 0.1, 0.35, 0.1]])
    policy = linear_rule("label", 6, 2, 0.0, 0.0, w_streak=0.5, w_dtop=0.0)
    assert policy.history and policy.first_read_layer == 1 and policy.reads_at(1) and not policy.asks_at(1)
    policy.threshold = 0.8
    # top 0.6 + 0.5 * 2/6 = 0.767 < 0.8 stays; top 0.7 + 0.5 * 2/6 = 0.867 exits
    assert policy.exit_mask(2, np.array([0.6, 0.7]), np.zeros(2), np.array([2, 2]), np.zeros(2)).tolist() == [False, True]
