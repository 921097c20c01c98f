"""--plan (job/dryrun.py): its figures are those of a real run over the same rows, and it fails like the job."""

import os
import subprocess
import sys

import pytest

from adainfer_ray.job import JobConfig, run_classify
from adainfer_ray.job.dryrun import plan_run, plan_text
from conftest import review_texts
from test_pipeline import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_predicts_what_a_real_run_of_the_same_rows_measures(ray_connected, tiny_model_dir, tiny_policy_dir,
                                                                 tmp_path):
    """On a sample that is the whole input, the plan's row count, tokens, truncation and layers
    skipped are the run's: the same rows through the same actor class and engine. Margin: 3 points
    of layers skipped (the tiny policy's threshold sits among its items, so float noise between two
    processes may move a row or two by a layer: 1 row of 59 by 2 of 4 layers is 0.8 points), half a
    token. Timings are never asserted."""
    rows = [{"text": t} for t in review_texts(60, seed=3)]
    rows[7]["text"] = "word " * 5000  # truncated, in both
    rows[11]["text"] = None  # an error row: counted, not labeled
    write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = JobConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"), model=str(tiny_model_dir),
                    policy=str(tiny_policy_dir), audit_fraction=0, progress_s=0)
    plan = plan_run(cfg, sample_size=100, price="A100", log=lambda *_: None)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # the plan writes nothing
    run = run_classify(cfg, log=lambda *_: None)["summary"]
    assert plan["rows"] == run["rows"] == 60 and plan["sample_rows"] == 60 and plan["error_rows_in_sample"] == 1
    assert plan["layers_skipped_share"] == pytest.approx(run["layers_skipped_share"], abs=0.03)
    assert 0 < plan["layers_skipped_share"] < 0.75  # the policy stops some rows early, not all at layer 1
    assert plan["mean_tokens"] == pytest.approx(run["mean_tokens"], abs=0.5)
    assert plan["truncated_share"] == pytest.approx(run["truncated_rows"] / 60)
    assert plan["audit_rows"] == 0 and plan["audit_s"] == 0
    # On a named device the hours come from FLOPs, not from this machine's clock: early exit costs less.
    assert plan["price"]["total_cost"] < plan["price"]["full_depth_cost"]
    text = plan_text(plan)
    assert "rows: 60 (a streaming count of every row (exact))" in text
    assert "Review: " in text and text.count("---") == 2  # the prompt, as the model sees it
    assert "whole corpus on A100:" in text and "assumed utilization" in text


def test_plan_fails_like_the_job_on_bad_input(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "classify.py"), "--plan", "--input",
                           str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ")
