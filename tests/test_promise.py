"""Issue 18's job half: --promise through the flags, the kept trace and --refit, the shipped
policy per promise, the trace columns following the candidates' modes, and the end verdict under
each promise."""

import os
import subprocess
import sys

import numpy as np
import pytest

from adainfer_ray import cli
from adainfer_ray.calibrate import DEFAULT_FIT_FRACTION
from adainfer_ray.engine import EarlyExitEngine
from adainfer_ray.flops import ModelDims
from adainfer_ray.job.actor import trace_features
from adainfer_ray.job.trace_file import SavedTrace, load_trace, save_trace
from adainfer_ray.policy import ExitPolicy, PolicyError, find_policy
from adainfer_ray.report.verdict import run_verdict
from adainfer_ray.stats import paired_loss_bound
from conftest import build_tiny, random_items

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABEL_IDS = [5, 17, 42]


def run_job(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})


# -- the flag -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("job", [["jobs/calibrate.py"], ["jobs/classify.py", "--calibrate", "100"]])
def test_an_accuracy_promise_without_gold_labels_is_refused_in_one_line(job, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "fine"}\n')
    r = run_job(*job, "--input", str(data), "--promise", "accuracy", "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "--promise accuracy" in r.stderr and "--label-column" in r.stderr
    assert "Ray" not in r.stderr + r.stdout  # refused before any cluster started


def test_the_promise_flag_reaches_the_config():
    p = cli.parser("x", "x")
    cli.add_calibration_args(p), cli.add_scale_args(p)
    assert cli.config_from_args(p.parse_args([])).promise == "agreement"
    assert cli.config_from_args(p.parse_args(["--promise", "accuracy"])).promise == "accuracy"
    assert "accuracy" in p.format_help() and "gold" in p.format_help()


# -- what the tracing actors emit ------------------------------------------------------------------------


def test_trace_columns_follow_the_modes_and_match_the_engine():
    lm = build_tiny("llama")
    engine = EarlyExitEngine(lm, LABEL_IDS, prefix_ids=[1, 2, 3])
    items = random_items(5, seed=1)
    for modes in [("label", "probe"), ("label",), ("vocab", "label", "probe")]:
        got = engine.trace(items, modes=modes)
        # final_label and final_probs are the row's own answer, which the output row already carries
        assert set(trace_features(modes)) == set(got) - {"final_label", "final_probs"}
    assert "hidden" not in trace_features(("label",)) and "vocab_top" not in trace_features(("label", "probe"))


# -- the kept trace and --refit --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_trace():
    lm = build_tiny("llama")
    items = random_items(600, seed=3)
    prefix = random_items(1, seed=99, lo=12, hi=13)[0]
    trace = EarlyExitEngine(lm, LABEL_IDS, prefix_ids=prefix).trace(items, modes=("label", "probe"))
    trace["item_tokens"] = np.array([len(x) for x in items])
    trace["label_label"] = trace["label_label"].astype(np.int64)
    gold = trace["final_label"].astype(np.int64).copy()
    gold[::7] = (gold[::7] + 1) % 3  # full depth right on about 6 items in 7
    provenance = {"model_id": "tiny-llama", "model_hash": "llama", "task_fingerprint": "tpl-a", "task": "toy"}
    return SavedTrace(trace, gold, np.arange(600) // 2, ModelDims.from_config(lm.config), len(prefix), 3, provenance)


def test_the_trace_file_round_trips_as_plain_arrays(saved_trace, tmp_path):
    save_trace(str(tmp_path), saved_trace)
    back = load_trace(str(tmp_path))
    assert set(back.trace) == set(saved_trace.trace)
    for k, v in saved_trace.trace.items():
        np.testing.assert_array_equal(back.trace[k], v)
    np.testing.assert_array_equal(back.gold, saved_trace.gold)
    same_group = lambda g: np.asarray(g)[:, None] == np.asarray(g)[None, :]  # codes: who is with whom
    np.testing.assert_array_equal(same_group(back.groups), same_group(saved_trace.groups))
    assert back.dims == saved_trace.dims and back.prefix_tokens == saved_trace.prefix_tokens
    assert back.num_labels == 3 and back.provenance == saved_trace.provenance


def test_refit_makes_a_policy_per_promise_from_the_trace_without_the_model(saved_trace, tmp_path):
    save_trace(str(tmp_path / "first"), saved_trace)
    r = run_job("jobs/calibrate.py", "--refit", str(tmp_path / "first"), "--promise", "accuracy",
                "--epsilon", "0.1", "--output", str(tmp_path / "acc"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "accuracy at most 10.00% below" in r.stdout
    policy = ExitPolicy.load(tmp_path / "acc")
    assert policy.promise["promise"] == "accuracy" and policy.promise["epsilon"] == 0.1
    assert policy.metadata["refit_from"] == str(tmp_path / "first")
    r = run_job("jobs/calibrate.py", "--refit", str(tmp_path / "first"), "--epsilon", "0.2", "--fit-fraction", "0.5",
                "--output", str(tmp_path / "agr"))
    assert r.returncode == 0, r.stderr[-2000:]
    agreement = ExitPolicy.load(tmp_path / "agr")
    assert agreement.promise["promise"] == "agreement" and policy.metadata["fit_fraction"] == DEFAULT_FIT_FRACTION
    assert agreement.metadata["fit_fraction"] == 0.5 and agreement.metadata["fit_size"] == 300  # of the 600 rows
    r = run_job("jobs/calibrate.py", "--refit", str(tmp_path / "first"), "--fit-fraction", "1")
    assert r.returncode == 2 and "--fit-fraction must be between 0 and 1" in r.stderr


def test_refit_without_a_trace_or_without_gold_says_so_in_one_line(saved_trace, tmp_path):
    r = run_job("jobs/calibrate.py", "--refit", str(tmp_path), "--output", str(tmp_path / "x"))
    assert r.returncode == 2 and "trace.safetensors" in r.stderr and r.stderr.strip().count("\n") == 0
    no_gold = SavedTrace(**{**vars(saved_trace), "gold": np.full(600, -1)})
    save_trace(str(tmp_path / "nogold"), no_gold)
    r = run_job("jobs/calibrate.py", "--refit", str(tmp_path / "nogold"), "--promise", "accuracy")
    assert r.returncode == 2 and "gold labels" in r.stderr


# -- the shipped policies ---------------------------------------------------------------------------------


def test_default_policy_follows_the_promise():
    agreement = find_policy("default", "smollm2-135m", "sentiment")
    accuracy = find_policy("default", "smollm2-135m", "sentiment", "accuracy")
    assert agreement.promise["promise"] == "agreement" and accuracy.promise["promise"] == "accuracy"
    with pytest.raises(PolicyError, match="accuracy-promise"):
        find_policy("default", "smollm2-135m", "topic", "accuracy")


def test_the_package_ships_every_policy_but_not_traces():
    import fnmatch
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["adainfer_ray"]
    shipped = lambda path: any(fnmatch.fnmatch(path, g) and g.count("/") == path.count("/") for g in globs)
    for name in ("smollm2-135m-sentiment", "smollm2-135m-sentiment-accuracy", "smollm2-135m-topic"):
        assert shipped(f"data/policies/{name}/policy.json") and shipped(f"data/policies/{name}/arrays.safetensors")
        assert not shipped(f"data/policies/{name}/trace.safetensors")


# -- the end verdict under each promise ----------------------------------------------------------------


def summary_with(audited, disagreed, gold=None):
    from adainfer_ray.stats import upper_bound

    return {"audit_agreement": {"rows": audited, "successes": audited - disagreed},
            "audit_disagreement_bound95": upper_bound(disagreed, audited), "audit_gold": gold}


ACCURACY = {"promise": "accuracy", "epsilon": 0.01, "delta": 0.05, "layers_skipped": 0.5, "calibration_size": 7000}


def test_an_accuracy_promise_is_checked_on_gold_labels():
    ok = run_verdict(summary_with(2000, 60, {"rows": 2000, "exit_only_wrong": 10, "full_only_wrong": 10}), ACCURACY)
    assert ok["ok"] and "Accuracy promise confirmed" in ok["message"] and ok["accuracy_lost"] == 0
    assert "loses at most 1.0% accuracy" in ok["promise"]
    bad = run_verdict(summary_with(2000, 60, {"rows": 2000, "exit_only_wrong": 60, "full_only_wrong": 0}), ACCURACY)
    assert bad["ok"] is False and "cannot confirm the accuracy promise" in bad["message"]
    assert bad["accuracy_lost_bound95"] > 0.03  # 3 points lost is no noise on 2,000 rows


def test_an_accuracy_promise_without_gold_reports_agreement_and_says_it_cannot_check():
    v = run_verdict(summary_with(300, 0, {"rows": 0, "exit_only_wrong": 0, "full_only_wrong": 0}), ACCURACY)
    assert v["ok"] is None and "cannot check the accuracy promise" in v["message"] and "agreement" in v["message"]


def test_the_agreement_verdict_is_unchanged():
    v = run_verdict(summary_with(300, 0), {**ACCURACY, "promise": "agreement"})
    assert v["ok"] and "Promise confirmed" in v["message"] and "changes at most 1.0% of the labels" in v["promise"]


def test_the_accuracy_bound_covers_the_loss():
    rng = np.random.default_rng(0)
    worse, better, _ = rng.multinomial(3000, [0.05, 0.03, 0.92])  # true loss 0.02
    assert (worse - better) / 3000 <= paired_loss_bound(worse, better, 3000) < 0.05
    assert paired_loss_bound(10, 0, 10) > 0.5
    assert paired_loss_bound(0, 30, 3000) == 0.0  # early exit fixed labels and broke none
