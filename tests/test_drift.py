"""The audit acts while the run goes (issue 19): a tiny policy whose promise is false on this corpus
is caught as blocks finish, and the run does what --on-drift says; a promise that holds makes it do
nothing. The job runs in this process on the test cluster."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adainfer_ray.job import JobConfig, run_classify
from adainfer_ray.job.run import DriftStopped
from adainfer_ray.report import job_summary
from adainfer_ray.schema import SIDECAR_NAME
from conftest import review_texts

pytestmark = pytest.mark.slow


def promised_policy(tiny_policy_dir, folder, epsilon, exit_after):
    """The tiny test policy, set to stop every item after layer `exit_after` of 4, with a calibrated
    1% promise written into it. On the tiny random model layer 1's label is the final one (the
    promise holds) and layer 3's is not (it is broken for nearly every row)."""
    shutil.copytree(tiny_policy_dir, folder)
    meta_file = folder / "policy.json"
    doc = json.loads(meta_file.read_text())
    doc.update(min_layer=exit_after, threshold=-1e9)
    doc["metadata"].update(guaranteed=True, epsilon=epsilon, delta=0.05, calibration_size=1000)
    meta_file.write_text(json.dumps(doc))
    return str(folder)


def corpus(folder, n=600):
    folder.mkdir()
    with open(folder / "part.jsonl", "w") as f:
        for i, t in enumerate(review_texts(n, seed=11)):
            f.write(json.dumps({"id": f"r{i}", "text": t}) + "\n")
    return n


def run(tiny_model_dir, input, out, policy, **kw):
    cfg = JobConfig(input=str(input), output=str(out), model=str(tiny_model_dir), policy=policy, batch_size=20,
                    audit_fraction=1.0, **kw)
    return run_classify(cfg, log=lambda *a: None)


def table(out) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("*.parquet"))])


def test_a_broken_promise_makes_the_run_label_the_rest_at_full_depth(ray_connected, tiny_model_dir,
                                                                     tiny_policy_dir, tmp_path):
    n = corpus(tmp_path / "in")
    policy = promised_policy(tiny_policy_dir, tmp_path / "policy", 0.01, exit_after=3)
    record = run(tiny_model_dir, tmp_path / "in", tmp_path / "out", policy)  # --on-drift full, the default
    drift = record["drift"]
    assert drift and drift["action"] == "full" and drift["lower_bound"] > 0.01 and drift["audited"] < n
    t = table(tmp_path / "out").to_pydict()
    assert sorted(t["id"]) == sorted(f"r{i}" for i in range(n)) and not any(t["error"])
    after = np.array(t["after_drift"])
    assert 0 < after.sum() < n  # rows before and after the decision, told apart
    assert all(e == 4 for e, a in zip(t["exit_layer"], after) if a)  # after it: the full model's labels
    assert all(e == 3 for e, a in zip(t["exit_layer"], after) if not a)
    assert (~after).sum() >= drift["rows_labeled_before"]
    side = json.loads((tmp_path / "out" / SIDECAR_NAME).read_text())
    assert side["drift"]["at_s"] > 0 and side["runs"][-1]["drift"] == side["drift"]
    assert "the online audit showed the promise broken" in job_summary(record)


def test_on_drift_stop_ends_the_run_with_one_line_and_the_same_command_resumes(ray_connected, tiny_model_dir,
                                                                               tiny_policy_dir, tmp_path):
    n = corpus(tmp_path / "in", n=1200)
    policy = promised_policy(tiny_policy_dir, tmp_path / "policy", 0.01, exit_after=3)
    with pytest.raises(DriftStopped) as stopped:
        run(tiny_model_dir, tmp_path / "in", tmp_path / "out", policy, on_drift="stop")
    line = str(stopped.value)
    assert "\n" not in line and "--calibrate" in line and "--on-drift full" in line
    side = json.loads((tmp_path / "out" / SIDECAR_NAME).read_text())
    assert side["drift"]["action"] == "stop"
    written = table(tmp_path / "out").num_rows if list((tmp_path / "out").glob("*.parquet")) else 0
    assert written < n
    run(tiny_model_dir, tmp_path / "in", tmp_path / "out", policy, on_drift="full")  # resumes, finishes
    ids = table(tmp_path / "out").column("id").to_pylist()
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))


def test_a_promise_that_holds_never_makes_the_run_act(ray_connected, tiny_model_dir, tiny_policy_dir, tmp_path):
    n = corpus(tmp_path / "in")
    policy = promised_policy(tiny_policy_dir, tmp_path / "policy", 0.01, exit_after=1)
    record = run(tiny_model_dir, tmp_path / "in", tmp_path / "out", policy, on_drift="stop")
    assert record["drift"] is None and record["online_audit"]["audited"] == n
    assert not any(table(tmp_path / "out").column("after_drift").to_pylist())
