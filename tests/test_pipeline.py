"""The Ray Data job: one output row per input row, schema, ids, fail-fast checks, fsspec in and out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adainfer_ray.job import JobConfig, run_classify
from adainfer_ray.job.actor import Classifier
from adainfer_ray.job.sampling import audit_mask
from adainfer_ray.report import job_summary
from adainfer_ray.schema import OUTPUT_SCHEMA, SIDECAR_NAME
from conftest import ray_job_submit, review_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_output(uri):
    fs, root = fsspec.core.url_to_fs(uri)
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_classifier_turns_every_bad_row_into_one_error_row(tiny_model_dir, tiny_policy_dir):
    cfg = JobConfig(model=str(tiny_model_dir), policy=str(tiny_policy_dir), audit_fraction=0.5)
    clf = Classifier.from_config(cfg, threads=2, audit_rate=cfg.audit_fraction)
    texts = ["a fine film", None, "", "   \n\t", "control \x00\x07 chars", "日本語のレビュー、とても良い",
             "x " * 500_000, "ok then"]
    batch = {"id": np.array([f"r{i}" for i in range(len(texts))], dtype=object),
             "text": np.array(texts, dtype=object),
             "gold_label": np.array(["positive"] * len(texts), dtype=object),
             "input_error": np.array([None] * 7 + ["text is int, not a string"], dtype=object)}
    out = clf(batch)
    assert out.schema == OUTPUT_SCHEMA and out.num_rows == len(texts)
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == list(batch["id"])
    errors = {r["id"]: r["error"] for r in rows}
    assert errors["r1"] == "text is null" and errors["r2"] == "text is empty" and errors["r3"] == "text is empty"
    assert errors["r7"] == "text is int, not a string"
    for r in rows:
        if r["error"]:
            assert r["label"] is None and r["exit_layer"] is None and r["label_probs"] is None
        else:
            assert r["label"] in ("negative", "positive") and 1 <= r["exit_layer"] <= 4
            # every label's probability, in the task's label order: the chosen one is the largest
            probs = r["label_probs"]
            assert len(probs) == 2 and sum(probs) == pytest.approx(1, abs=1e-5)
            assert probs[("negative", "positive").index(r["label"])] == pytest.approx(r["label_score"], abs=1e-6)
            assert 0 < r["flops_used"] <= r["flops_full"]
            assert r["compute_saved"] == pytest.approx(r["exit_saved"] + r["prefix_saved"])
    assert rows[6]["truncated"] and not rows[0]["truncated"]  # the 1 MB text was cut to fit, and says so
    assert rows[6]["num_tokens"] <= 2048


def test_audit_sample_is_seeded_and_stable():
    ids = [f"id{i}" for i in range(20000)]
    a = audit_mask(ids, 0.05, seed=3)
    assert 0.04 < a.mean() < 0.06
    assert (audit_mask(ids[::-1], 0.05, seed=3)[::-1] == a).all()  # order and batching do not matter
    assert not (audit_mask(ids, 0.05, seed=4) == a).all()


def test_job_labels_every_row_once_with_the_output_schema(ray_connected, tiny_model_dir, tiny_policy_dir, tmp_path):
    rows = [{"text": t, "label": "positive" if i % 2 else "negative"} for i, t in enumerate(review_texts(120, seed=1))]
    rows[5]["text"] = None
    rows[9]["text"] = 42
    write_jsonl(tmp_path / "part-a.jsonl", rows[:70])
    write_jsonl(tmp_path / "part-b.jsonl", rows[70:])
    out = tmp_path / "out"
    logged = []
    run = run_classify(JobConfig(input=str(tmp_path / "*.jsonl"), output=str(out), label_column="label",
                                 model=str(tiny_model_dir), policy=str(tiny_policy_dir), batch_size=32,
                                 audit_fraction=0.2, progress_s=0.5), log=logged.append)
    table = read_output(out)
    # Progress lines as a log without a terminal shows them: rows done of the (estimated) total, rate,
    # layers skipped and error rows so far; the last one counts every row of this run.
    progress = [x for x in logged if x.startswith("progress: ")]
    assert progress, logged
    done = [int(x.split()[1].replace(",", "")) for x in progress]
    assert done == sorted(done) and done[-1] == 120
    assert progress[-1].startswith("progress: 120 of about 120 rows (100.0%), ")
    assert " rows/s; layers skipped " in progress[-1] and progress[-1].endswith(", error rows 2")
    assert table.schema == OUTPUT_SCHEMA
    assert table.num_rows == 120 and run["rows"] == 120
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted([f"part-a.jsonl:{i}" for i in range(70)] + [f"part-b.jsonl:{i}" for i in range(50)])
    errs = {r["id"]: r["error"] for r in table.select(["id", "error"]).to_pylist() if r["error"]}
    assert errs == {"part-a.jsonl:5": "text is null", "part-a.jsonl:9": "text is int, not a string"}
    exits = [e for e in table.column("exit_layer").to_pylist() if e is not None]
    assert min(exits) < 4 and max(exits) == 4  # the policy stops some items early
    assert table.column("full_label").null_count < 120  # an audited sample carries the full-depth label
    side = json.loads((out / SIDECAR_NAME).read_text())
    for key in ("model", "policy", "task", "template", "flags", "ray_version", "start_time", "end_time",
                "rows", "rows_per_s", "errors"):
        assert key in side
    assert side["errors"] == 2 and side["summary"]["gold_accuracy"]["rows"] == 118
    # The start-up timeline is recorded, in order (its values are timings: only their plausibility is tested).
    timeline = side["runs"][-1]["timeline"]
    assert 0 < side["first_labels_s"] <= side["wall_s"] and side["runs"][-1]["first_labels_s"] == side["first_labels_s"]
    assert timeline["first_labels_s"] == side["first_labels_s"]
    assert 0 < timeline["preflight_done_s"] < timeline["actor_start_s"] <= timeline["actor_ready_s"] \
        <= timeline["first_labels_s"] <= timeline["last_labels_s"] <= side["wall_s"]
    assert f"first labeled batch {side['first_labels_s']:.1f} s after the start" in job_summary(side)


def test_memory_uris_in_and_out(ray_connected, tiny_model_dir):
    fs = fsspec.filesystem("memory")
    with fs.open("/corpus/reviews.parquet", "wb") as f:
        pq.write_table(pa.table({"id": [f"m{i}" for i in range(30)], "body": ["good stuff"] * 30}), f)
    run = run_classify(JobConfig(input="memory://corpus/", output="memory://labels/", text_column="body",
                                 model=str(tiny_model_dir), policy="full"), log=lambda *_: None)
    table = read_output("memory://labels/")
    assert run["rows"] == 30 and sorted(table.column("id").to_pylist()) == sorted(f"m{i}" for i in range(30))
    assert fs.exists("/labels/" + SIDECAR_NAME)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "jobs/classify.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_wrong_text_column_fails_before_any_actor_naming_the_columns(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"review": "hi", "stars": 5}])
    r = run_cli("--input", str(tmp_path / "in.jsonl"), "--text-column", "text", "--policy", "full",
                "--output", str(tmp_path / "out"), env={"RAY_ADDRESS": "127.0.0.1:1"})  # no Ray is ever reached
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "no column 'text'" in last and "review, stars" in last
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_help_explains_every_flag_with_its_default():
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--input", "--output", "--text-column", "--id-column", "--task", "--labels", "--template",
                 "--demos", "--policy", "--actors", "--gpus-per-actor", "--batch-size", "--audit-fraction"):
        assert flag in r.stdout
    assert "(default: text)" in r.stdout and "(default: 0.01)" in r.stdout


@pytest.mark.slow
def test_ray_job_submit_against_a_real_cluster(ray_cluster, tiny_model_dir, tmp_path):
    out = tmp_path / "submitted"
    r = ray_job_submit("python", "jobs/classify.py", "--model", tiny_model_dir, "--policy", "full", "--limit", "60",
                       "--output", out, address=ray_cluster["dashboard"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1500:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    # The job's own progress lines, not Ray Data's block of operator states that a log gets every 10 s
    assert "progress: 60 of 60 rows (100.0%)" in r.stdout and "logging_progress" not in r.stdout + r.stderr, r.stdout
    table = read_output(out)
    assert table.num_rows == 60 and table.schema == OUTPUT_SCHEMA
    assert set(table.column("label").to_pylist()) <= {"negative", "positive"}
    assert json.loads((out / SIDECAR_NAME).read_text())["rows"] == 60


def test_the_package_version_has_one_source():
    import tomllib

    import adainfer_ray

    project = tomllib.loads(Path(ROOT, "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "adainfer_ray.__version__"}
    assert adainfer_ray.__version__.count(".") == 2


def test_audit_fraction_zero_alone_turns_the_audit_off():
    from adainfer_ray.job.sampling import corpus_audit_rate

    assert corpus_audit_rate(JobConfig(audit_fraction=0), 3000) == 0.0  # no --audit-rows floor then
    assert corpus_audit_rate(JobConfig(), 3000) == pytest.approx(0.1)  # on: at least 300 rows
    assert corpus_audit_rate(JobConfig(), 100) == 1.0
    assert corpus_audit_rate(JobConfig(audit_fraction=0.5), 3000) == 0.5
    assert not audit_mask([f"r{i}" for i in range(1000)], corpus_audit_rate(JobConfig(audit_fraction=0), 1000), 0).any()


def test_quick_start_prints_no_warnings_but_rays_auth_notice(tmp_path):
    """The quick start's output (default model, demo corpus) holds our summary and no WARNING or
    core_worker line of ours or of Ray Data's; Ray's own token-auth notice is the one exception."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "classify.py"), "--limit", "40",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    # Excepted: Ray's token-auth notice, and core_worker.cc's line on actor constructor arguments in the
    # object store: Ray Data itself passes every actor pool its map transformer and DataContext as
    # ray.put handles (map_operator._map_transformer_ref), so no way of passing our arguments avoids it.
    noisy = [x for x in lines if ("WARNING" in x.upper() or "core_worker" in x or " E " in x[:40]
                                  or "it/s]" in x)  # a tqdm bar (transformers' "Loading weights")
             and "authentication_token_setup" not in x and "has constructor arguments in the object store" not in x]
    assert noisy == [], noisy
    assert "== adainfer-ray: done ==" in done.stdout and "labels written:" in done.stdout


def test_progress_line_says_rows_of_total_rate_time_left_skipped_and_errors():
    from adainfer_ray.job.progress import progress_line

    line = progress_line({"rows": 1000, "errors": 10, "layers_skipped": 396.0}, 4000, 100.0)
    assert line == "progress: 1,000 of 4,000 rows (25.0%), 10.0 rows/s, about 5 min 00 s left; " \
                   "layers skipped 40.0%, error rows 10"
    assert progress_line({"rows": 50, "errors": 0, "layers_skipped": 0.0}, None, 10.0) == \
        "progress: 50 rows, 5.0 rows/s; layers skipped 0.0%, error rows 0"
