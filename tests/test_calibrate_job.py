"""Calibration inside the job (`classify --calibrate N`), jobs/calibrate.py on the same path, the
audit's promise check, and the public `label` stage."""

import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401 - pa.csv below
import pyarrow.parquet as pq
import pytest

from adainfer_ray import cli, report
from adainfer_ray.job import JobConfig, run_classify
from adainfer_ray.job.actor import gold_names
from adainfer_ray.job.sampling import calibration_keys
from adainfer_ray.policy import ExitPolicy
from adainfer_ray.schema import OUTPUT_SCHEMA, SIDECAR_NAME
from conftest import ALL_ACTORS_UP, ray_job_submit, review_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2_DEV = os.path.join(os.path.dirname(ROOT), "shared", "data", "sst2", "dev.tsv")


def read_output(folder) -> pa.Table:
    return pa.concat_tables([pq.read_table(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                             if f.endswith(".parquet")])


# -- flags and small pieces ---------------------------------------------------------------------------


def test_template_escapes_keep_every_other_character():
    assert cli.unescape(r"Avis : {text}\nSentiment é ✓:") == "Avis : {text}\nSentiment é ✓:"
    assert cli.unescape(r"a\tb\\n") == "a\tb\\n"  # an escaped backslash stays one backslash
    assert cli.unescape(r"C:\path {text}") == r"C:\path {text}"


def test_classify_and_calibrate_take_the_same_flags_into_the_same_config():
    import importlib.util

    def job(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "jobs", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    flags = ["--input", "x.csv", "--columns", "label,title,body", "--text-column", "body", "--labels", "a,b",
             "--template", r"T: {text}\nL é:", "--model", "some/model", "--dtype", "bfloat16", "--seed", "3",
             "--epsilon", "0.02", "--group-column", "title", "--label-column", "label"]
    classify_cfg = job("classify").parse_args(flags + ["--calibrate", "500"])
    calibrate_cfg, folder = job("calibrate").parse_args(flags + ["--sample", "500", "--output", "p/"])
    assert classify_cfg == JobConfig(**{**calibrate_cfg.__dict__, "output": classify_cfg.output})
    assert calibrate_cfg.output == "p/"  # the policy folder is what calibrate writes
    assert classify_cfg.template == "T: {text}\nL é:" and classify_cfg.columns == ["label", "title", "body"]
    assert folder == "p/" and calibrate_cfg.calibrate == 500


def test_gold_labels_become_label_names():
    assert gold_names(["0", "1", None, "Positive"], ("negative", "positive"), False) == \
        ["negative", "positive", None, "positive"]
    assert gold_names(["3", "4", "1"], ("World", "Sports", "Business", "Sci/Tech"), True) == \
        ["Business", "Sci/Tech", "World"]
    assert gold_names(["meh"], ("a", "b"), False) == ["meh"]


def test_the_calibration_sample_is_uniform_and_seeded():
    ids = [f"row-{i}" for i in range(20000)]
    keys = calibration_keys(ids, seed=0)
    assert 0.45 < (keys < 0.5).mean() < 0.55
    assert (calibration_keys(ids[::-1], seed=0)[::-1] == keys).all()
    assert not (calibration_keys(ids, seed=1) == keys).all()


# -- the promise, checked by every run's audit ---------------------------------------------------------


def _summary(audited, disagreed):
    return {"audit_agreement": {"rows": audited, "successes": audited - disagreed},
            "audit_disagreement_bound95": report.upper_bound(disagreed, audited) if audited else None}


PROMISE = {"epsilon": 0.01, "delta": 0.05, "calibration_size": 2000, "layers_skipped": 0.4}


def test_the_audit_confirms_a_kept_promise():
    v = report.run_verdict(_summary(1000, 2), PROMISE)
    assert v["ok"] and "confirmed" in v["message"] and v["bound95"] < 0.01
    assert "40.0% of the model's layers" in v["promise"] and "at most 1.0%" in v["promise"]


def test_the_audit_says_plainly_when_the_promise_is_broken():
    v = report.run_verdict(_summary(600, 16), PROMISE)  # 2.7% observed, as on a shifted corpus
    assert v["ok"] is False and v["message"].startswith("WARNING") and "--calibrate" in v["message"]
    assert v["observed"] == pytest.approx(16 / 600) and v["bound95"] > v["observed"]
    v = report.run_verdict(_summary(872, 13), PROMISE)  # 1.5%: above 1%, but as likely sampling noise
    assert v["ok"] is False and "cannot confirm" in v["message"] and "--calibrate" in v["message"]


def test_a_small_audit_says_it_cannot_confirm_yet():
    v = report.run_verdict(_summary(6, 0), PROMISE)  # 1% of 600 rows: what the old default audited
    assert v["ok"] is False and "cannot confirm" in v["message"] and "299" in v["message"]
    assert report.run_verdict(_summary(6, 0), None)["message"] is None  # no promise, nothing to check


def test_a_small_corpus_is_audited_whole_and_the_summary_says_what_it_shows(ray_connected, tiny_model_dir,
                                                                           tiny_policy_dir, tmp_path):
    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate(review_texts(60, seed=4))]
    with open(tmp_path / "in.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    run = run_classify(JobConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"),
                                 model=str(tiny_model_dir), policy=str(tiny_policy_dir)), log=lambda *_: None)
    table = read_output(tmp_path / "out")
    assert run["audit_rate"] == 1.0 and table.column("full_label").null_count == 0  # 60 < --audit-rows 300
    side = json.loads((tmp_path / "out" / SIDECAR_NAME).read_text())
    assert side["verdict"]["audited_rows"] == 60 and side["summary"]["audit_disagreement_bound95"] is not None
    assert "audit" in report.job_summary(side)


# -- --calibrate inside the job -------------------------------------------------------------------------


def test_classify_calibrate_labels_every_row_once_and_keeps_the_sample_at_full_depth(ray_connected, tiny_model_dir,
                                                                                     tmp_path):
    texts = review_texts(90, seed=5)
    pq.write_table(pa.table({"text": texts, "label": ["positive", "negative"] * 45}), tmp_path / "in.parquet")
    logged = []
    cfg = JobConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=str(tiny_model_dir),
                    label_column="label", calibrate=40, epsilon=0.3, delta=0.3, batch_size=16)
    run = run_classify(cfg, log=logged.append)
    table = read_output(tmp_path / "out")
    assert table.schema == OUTPUT_SCHEMA and table.num_rows == 90
    assert sorted(table.column("id").to_pylist()) == sorted(f"in.parquet:{i}" for i in range(90))
    sample = table.filter(table.column("calibration"))
    assert sample.num_rows == 40  # exactly N rows, drawn by their seeded keys
    assert set(sample.column("exit_layer").to_pylist()) == {4}  # the sample ran at full depth
    assert sample.column("label").to_pylist() == sample.column("full_label").to_pylist()
    policy = ExitPolicy.load(tmp_path / "out" / "_policy")
    assert policy.metadata["calibration_size"] == 40 and policy.metadata["dtype"] == "float32"
    assert (tmp_path / "out" / "_policy" / "report" / "report.md").exists()
    assert run["policy"].endswith("_policy") and run["summary"]["calibration_rows"] == 40
    assert run["resumed_rows"] == 0 and run["rows_this_run"] == 90  # the sample is this run's work
    assert run["summary"]["outside_sample"]["rows"] == 50
    assert any(m.startswith("progress: 40 of 40 rows (100.0%)") for m in logged)  # the trace's own progress

    # rerun over the same output: the policy is reused, nothing is labeled again
    logged.clear()
    again = run_classify(cfg, log=logged.append)
    assert any("reusing the policy" in m for m in logged) and again["rows_this_run"] == 0
    assert read_output(tmp_path / "out").num_rows == 90


# -- the round trip the user takes, under `ray job submit` ---------------------------------------------


def submit(ray_cluster, *args) -> subprocess.CompletedProcess:
    r = ray_job_submit(*ALL_ACTORS_UP, "python", *args, address=ray_cluster["dashboard"], timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    return r


@pytest.mark.slow
def test_calibrate_once_then_classify_equals_classify_calibrate(ray_cluster, tmp_path):
    """A custom task whose template holds a newline and non-ASCII characters, on the real default
    model: jobs/calibrate.py's policy is accepted by classify, and equals the one `classify
    --calibrate` makes from the same sample and seed, so both label the other rows alike. (One actor
    each: traced on two, the same rows are batched otherwise, and the thresholds differ in their
    last bits.)"""
    task = ["--labels", "negative,positive", "--template", r"Critique client « {text} »\nAvis é:",
            "--epsilon", "0.2", "--delta", "0.2", "--seed", "7", "--limit", "120"]  # 120 of the demo's 300 rows
    policy = tmp_path / "policy"
    submit(ray_cluster, "jobs/calibrate.py", *task, "--sample", "60", "--output", str(policy))
    submit(ray_cluster, "jobs/classify.py", *task, "--policy", str(policy), "--output", str(tmp_path / "a"))
    submit(ray_cluster, "jobs/classify.py", *task, "--calibrate", "60", "--output", str(tmp_path / "b"))
    once, inside = ExitPolicy.load(policy), ExitPolicy.load(tmp_path / "b" / "_policy")
    assert once.metadata["guaranteed"], "a loose promise on 60 reviews should allow early exit"
    assert (once.features, once.min_layer, once.threshold) == (inside.features, inside.min_layer, inside.threshold)
    assert once.metadata["task_fingerprint"] == inside.metadata["task_fingerprint"]
    a, b = read_output(tmp_path / "a").to_pandas(), read_output(tmp_path / "b").to_pandas()
    assert len(a) == len(b) == 120 and b["calibration"].sum() == 60
    rest = b[~b["calibration"]].set_index("id")
    joined = rest.join(a.set_index("id").add_suffix("_a"))
    assert (joined["label"] == joined["label_a"]).all() and (joined["exit_layer"] == joined["exit_layer_a"]).all()
    assert rest["exit_layer"].mean() < 30  # the policy really exits early


# -- the public stage ---------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists(SST2_DEV), reason="needs ../shared/data")
def test_label_is_one_stage_of_a_users_ray_data_pipeline(ray_connected, tiny_model_dir):
    import ray

    import adainfer_ray

    ds = ray.data.read_csv(SST2_DEV, parse_options=pa.csv.ParseOptions(delimiter="\t", quote_char=False))
    ds = ds.limit(64).map_batches(lambda b: {**b, "rid": np.arange(len(b["sentence"])).astype(str)},
                                  batch_format="numpy")
    out = adainfer_ray.label(ds, text_column="sentence", id_column="rid", model=str(tiny_model_dir),
                             policy="full").take_all()
    assert len(out) == 64 and sorted(int(r["id"]) for r in out) == list(range(64))
    assert all(r["label"] in ("negative", "positive") and r["exit_layer"] == 4 for r in out)
    assert all("sentence" in r and "label" in r for r in out)  # the caller's columns ride along


def test_a_policy_used_at_another_precision_warns_on_the_driver():
    from adainfer_ray.job.plan import warn_on_precision

    policy = ExitPolicy.full_depth(4)
    policy.features = "label"  # a calibrated policy records its promise, dtype and device
    policy.metadata = {"guaranteed": True, "epsilon": 0.01, "delta": 0.05, "calibration_size": 100,
                       "layers_skipped": 0.3, "dtype": "float32", "device": "cpu"}
    said = []
    warn_on_precision(policy, "cpu", "auto", said.append)
    assert said == []
    warn_on_precision(policy, "cuda", "auto", said.append)  # a GPU run computes in bf16
    assert len(said) == 1 and "calibrated at float32" in said[0] and "bfloat16" in said[0]


def test_limit_counts_the_same_rows_with_calibrate(ray_connected, tiny_model_dir, tmp_path):
    """--limit N with --calibrate M labels N rows in all: the sample comes out of the first N, not on top."""
    pq.write_table(pa.table({"text": review_texts(100, seed=6)}), tmp_path / "in.parquet")
    run = run_classify(JobConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"),
                                 model=str(tiny_model_dir), limit=60, calibrate=20, epsilon=0.3, delta=0.3),
                       log=lambda *_: None)
    ids = read_output(tmp_path / "out").column("id").to_pylist()
    assert run["rows"] == 60 and sorted(ids) == sorted(f"in.parquet:{i}" for i in range(60))


def test_the_recorded_dtype_is_the_one_the_actors_load_on_a_gpu_without_bf16(monkeypatch):
    """run_precision (in _run.json and a policy's provenance) follows models.pick_device's fallback."""
    import torch

    from adainfer_ray.job.plan import run_precision
    from adainfer_ray.models import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_device("cuda", "auto")[1] == torch.float16
    assert run_precision("cuda", "auto") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert run_precision("cuda", "auto") == "bfloat16" and run_precision("cpu", "auto") == "float32"


def test_label_checks_remote_code_on_the_driver_before_any_actor(tiny_model_dir, tmp_path):
    """label() refuses a model that asks to run its own code unless trust_remote_code, as the job does:
    at the call, not later inside an actor."""
    import shutil

    import adainfer_ray
    from adainfer_ray.models import UnsupportedModelError

    remote = tmp_path / "remote-tokenizer-model"
    shutil.copytree(tiny_model_dir, remote)
    tok = json.loads((remote / "tokenizer_config.json").read_text())
    (remote / "tokenizer_config.json").write_text(json.dumps({**tok, "auto_map": {"AutoTokenizer": ["x.Tok", None]}}))
    with pytest.raises(UnsupportedModelError, match="trust-remote-code"):
        adainfer_ray.label(object(), model=str(remote), policy="full")  # never reaches the dataset
