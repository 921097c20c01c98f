"""Tests of the cost report (issue 5).

Each figure is computed a second time here, in plain Python over the very rows written to the
Parquet files, and compared with summary.json. The rows include error rows, null labels, null
full_label / gold_label, rows with unset FLOP columns, several files and several row groups.
"""

import json
import math
import os
import random
import subprocess
import sys
import textwrap

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from adainfer_ray import report
from adainfer_ray.schema import OUTPUT_SCHEMA, SIDECAR_NAME

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ["sports", "politics", "tech", "health"]
NUM_LAYERS = 12


# --- Making outputs ----------------------------------------------------------------------------

def make_rows(n, seed=0, id_prefix="doc", audit=0.3, gold=0.5):
    """Rows as jobs/classify.py would write them, with every kind of gap the contract allows."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = {"id": f"{id_prefix}-{i}", "num_layers": NUM_LAYERS,
               "num_tokens": rng.randint(20, 400) if rng.random() > 0.05 else None,
               "truncated": rng.random() < 0.1, "full_label": None,
               "gold_label": rng.choice(LABELS) if rng.random() < gold else None, "calibration": False,
               "error": None}
        if rng.random() < 0.1:  # error row: no label, no exit layer, FLOPs sometimes set anyway
            flops = rng.uniform(1e9, 5e9) if rng.random() < 0.5 else None
            row.update(label=None, label_score=None, exit_layer=None, flops_used=flops,
                       flops_full=flops, compute_saved=0.0 if flops else None,
                       exit_saved=0.0 if flops else None, prefix_saved=0.0 if flops else None,
                       error=rng.choice(["CUDA out of memory", "tokenizer failed"]))
        else:
            exit_layer = rng.randint(1, NUM_LAYERS)
            flops_full = rng.uniform(1e9, 5e9)
            prefix_saved = rng.uniform(0.0, 0.3)
            exit_saved = (NUM_LAYERS - exit_layer) / NUM_LAYERS * (1 - prefix_saved) * 0.95
            compute_saved = exit_saved + prefix_saved
            label = rng.choice(LABELS) if rng.random() > 0.03 else None  # a few unlabelled rows
            row.update(label=label, label_score=rng.random(), exit_layer=exit_layer,
                       flops_full=flops_full, flops_used=flops_full * (1 - compute_saved),
                       compute_saved=compute_saved, exit_saved=exit_saved,
                       prefix_saved=prefix_saved)
            if label is not None and rng.random() < audit:
                row["full_label"] = label if rng.random() < 0.8 else rng.choice(LABELS)
        rows.append(row)
    # One row without error whose FLOP columns are unset: left out of the FLOP figures only.
    rows[1].update(error=None, label="tech", exit_layer=3, flops_used=None, flops_full=None,
                   compute_saved=None, exit_saved=None, prefix_saved=None)
    return rows


def write_run(uri, rows, files=3, row_group_size=17, sidecar=None, junk=True):
    """Write rows as `files` Parquet files (several row groups each) plus a sidecar into uri."""
    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(root, exist_ok=True)
    per_file = math.ceil(len(rows) / files)
    for i in range(files):
        table = pa.Table.from_pylist(rows[i * per_file:(i + 1) * per_file], schema=OUTPUT_SCHEMA)
        with fs.open(f"{root}/part-{i:03d}.parquet", "wb") as f:
            pq.write_table(table, f, row_group_size=row_group_size)
    if junk:  # files a reader must skip: they would change every count if read
        extra = pa.Table.from_pylist(rows[:50], schema=OUTPUT_SCHEMA)
        fs.makedirs(f"{root}/_temporary", exist_ok=True)
        for path in (f"{root}/_temporary/part-000.parquet", f"{root}/.part-000.parquet"):
            with fs.open(path, "wb") as f:
                pq.write_table(extra, f)
    if sidecar is not None:
        with fs.open(f"{root}/{SIDECAR_NAME}", "w") as f:
            json.dump(sidecar, f)
    return uri


def sidecar_for(rows, wall_s=1800.0, device="cuda", num_gpus=2, policy="adainfer", engine_s=None):
    return {"model": "test-model", "policy": policy, "device": device,
            "gpu_name": "NVIDIA H100 80GB HBM3" if device == "cuda" else None, "num_gpus": num_gpus,
            "num_actors": 2, "wall_s": wall_s, "engine_s": engine_s, "rows": len(rows),
            "errors": sum(r["error"] is not None for r in rows), "rows_per_s": len(rows) / wall_s}


# --- The figures, computed independently --------------------------------------------------------

def wilson(successes, trials, z=1.959963984540054):
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return center - half, center + half


def expected_figures(rows):
    ok = [r for r in rows if r["error"] is None]
    labelled = [r for r in ok if r["label"] is not None]
    with_exit = [r for r in ok if r["exit_layer"] is not None]
    flop_keys = ["flops_used", "flops_full", "compute_saved", "exit_saved", "prefix_saved"]
    with_flops = [r for r in ok if all(r[k] is not None for k in flop_keys) and r["flops_full"] > 0]
    with_tokens = [r for r in ok if r["num_tokens"] is not None]

    def flop_shares(subset):
        full = sum(r["flops_full"] for r in subset)
        return {"flops_saved_share": 1 - sum(r["flops_used"] for r in subset) / full,
                "exit_saved_share": sum(r["exit_saved"] * r["flops_full"] for r in subset) / full,
                "prefix_saved_share": sum(r["prefix_saved"] * r["flops_full"] for r in subset) / full}

    def exit_means(subset):
        return {"mean_exit_layer": np.mean([r["exit_layer"] for r in subset]),
                "layers_skipped_share": np.mean([(r["num_layers"] - r["exit_layer"]) / r["num_layers"]
                                                 for r in subset])}

    counts = {label: sum(r["label"] == label for r in labelled) for label in LABELS}
    audited = [r for r in labelled if r["full_label"] is not None]
    graded = [r for r in labelled if r["gold_label"] is not None]

    def saved_bins(key):
        bins = [0] * 100
        for r in with_flops:
            bins[min(max(int(math.floor(r[key] * 100)), 0), 99)] += 1
        return bins

    return {
        "rows": len(rows),
        "error_rows": len(rows) - len(ok),
        "labelled_rows": len(labelled),
        "unlabelled_rows": len(ok) - len(labelled),
        "truncated_rows": sum(r["truncated"] for r in rows),
        "mean_tokens": np.mean([r["num_tokens"] for r in with_tokens]),
        "label_counts": {k: v for k, v in counts.items() if v},
        "label_shares": {k: v / len(labelled) for k, v in counts.items() if v},
        "num_layers": NUM_LAYERS,
        "exit_rows": len(with_exit),
        **exit_means(with_exit),
        "exit_layer_counts": [sum(r["exit_layer"] == k for r in with_exit)
                              for k in range(1, NUM_LAYERS + 1)],
        "flops_rows": len(with_flops),
        "flops_used": sum(r["flops_used"] for r in with_flops),
        "flops_full": sum(r["flops_full"] for r in with_flops),
        **flop_shares(with_flops),
        "mean_compute_saved": np.mean([r["compute_saved"] for r in with_flops]),
        "saved_bins": {key: saved_bins(key) for key in ("compute_saved", "exit_saved", "prefix_saved")},
        "savings_by_label": {
            label: {**exit_means([r for r in with_exit if r["label"] == label]),
                    **flop_shares([r for r in with_flops if r["label"] == label]),
                    "rows": counts[label]}
            for label in LABELS if counts[label]},
        "audit": (len(audited), sum(r["label"] == r["full_label"] for r in audited)),
        "gold": (len(graded), sum(r["label"] == r["gold_label"] for r in graded)),
        # Rows with a gold label but no prediction, error rows included.
        "gold_without_label": sum(r["gold_label"] is not None and r["label"] is None for r in rows),
    }


def assert_figures_match(summary, rows):
    expected = expected_figures(rows)
    for key in ["rows", "error_rows", "labelled_rows", "unlabelled_rows", "truncated_rows",
                "num_layers", "exit_rows", "exit_layer_counts", "flops_rows", "label_counts"]:
        assert summary[key] == expected[key], key
    for key in ["mean_tokens", "mean_exit_layer", "layers_skipped_share", "flops_used", "flops_full",
                "flops_saved_share", "exit_saved_share", "prefix_saved_share", "mean_compute_saved"]:
        assert summary[key] == pytest.approx(expected[key], rel=1e-9), key
    assert summary["label_shares"] == pytest.approx(expected["label_shares"])
    assert summary["error_share"] == pytest.approx(expected["error_rows"] / expected["rows"])
    assert summary["ok_rows"] == expected["rows"] - expected["error_rows"]
    # The split adds up: total FLOP savings = early exit + prefix reuse.
    assert summary["flops_saved_share"] == pytest.approx(
        summary["exit_saved_share"] + summary["prefix_saved_share"])
    for key, bins in expected["saved_bins"].items():
        assert summary["saved_share_histogram"][key] == bins, key
    assert set(summary["savings_by_label"]) == set(expected["savings_by_label"])
    # Most frequent label first, in the counts, the table and the plot alike.
    assert list(summary["label_counts"].values()) == sorted(summary["label_counts"].values(), reverse=True)
    assert list(summary["savings_by_label"]) == list(summary["label_counts"])
    for label, figures in expected["savings_by_label"].items():
        got = summary["savings_by_label"][label]
        for key, value in figures.items():
            assert got[key] == pytest.approx(value, rel=1e-9), (label, key)
    for key, name in (("audit", "audit_agreement"), ("gold", "gold_accuracy")):
        trials, successes = expected[key]
        got = summary[name]
        assert (got["rows"], got["successes"]) == (trials, successes), key
        assert got["share"] == pytest.approx(successes / trials)
        assert (got["ci95_low"], got["ci95_high"]) == pytest.approx(wilson(successes, trials))
    assert summary["gold_accuracy"]["rows_without_label"] == expected["gold_without_label"]


# --- Tests -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rows():
    return make_rows(400, seed=1)


def test_summary_json_matches_independent_computation(tmp_path, rows):
    run = write_run(str(tmp_path / "run"), rows, sidecar=sidecar_for(rows))
    report.write_report([run], str(tmp_path / "out"))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["run"]["files"] == 3  # _temporary/ and .part files skipped
    assert_figures_match(summary["run"], rows)
    assert summary["run"]["throughput"]["rows_per_s"] == pytest.approx(len(rows) / 1800.0)
    assert summary["compare"] is None


def test_small_batches_and_row_groups_give_the_same_figures(tmp_path, rows):
    # Totals must not depend on how the rows are cut: 1 file with 1 row group vs 7-row batches.
    one = report.summarize_run([write_run(str(tmp_path / "one"), rows, files=1,
                                          row_group_size=10_000, junk=False)])
    many = report.summarize_run([write_run(str(tmp_path / "many"), rows, files=5,
                                           row_group_size=3, junk=False)], batch_size=7)
    for key in ["exit_layer_counts", "label_counts", "flops_rows", "audit_agreement",
                "saved_share_histogram"]:
        assert one[key] == many[key]
    assert one["flops_saved_share"] == pytest.approx(many["flops_saved_share"], rel=1e-12)


def test_gpu_run_full_depth_is_estimated_from_model_compute_time(tmp_path, rows):
    # 2 actors, 2 GPUs: 1800 s of wall, of which each actor spent 1200 s in the engine.
    run = write_run(str(tmp_path / "run"), rows, sidecar=sidecar_for(rows, wall_s=1800, num_gpus=2, engine_s=2400))
    result = report.build_report([run], price_per_gpu_hour=3.0, gpu="Test GPU")
    cost, expected = result["cost"], expected_figures(rows)
    assert cost["cost_basis"] == "measured_gpu_time"
    assert cost["run_gpu_hours"] == pytest.approx(1.0)  # 1800 s x 2 GPUs
    assert cost["run_cost"] == pytest.approx(3.0)
    # Full depth with the run's own prefix handling: only model time grows, by the FLOP ratio.
    same_prefix = expected["flops_full"] * (1 - expected["prefix_saved_share"])
    extra_s = 2400 * (same_prefix / expected["flops_used"] - 1)  # 1200 s x 2 actors x 1 GPU each
    full_hours = 1.0 + extra_s / 3600
    assert cost["full_depth_source"] == "compute_time_x_flops"
    assert cost["full_depth_gpu_hours"] == pytest.approx(full_hours)
    assert cost["full_depth_cost"] == pytest.approx(3.0 * full_hours)
    assert cost["saved_cost"] == pytest.approx(3.0 * (full_hours - 1.0)) == cost["saved_cost_by_exit"]
    assert cost["saved_share"] < 1 - expected["flops_used"] / same_prefix  # start-up does not shrink
    assert cost["saved_cost_by_prefix"] > 0
    assert any("engine_s" in a for a in cost["assumptions"]) and any("Test GPU" in a for a in cost["assumptions"])
    run_figures = result["run"]
    assert run_figures["exit_saved_share_same_prefix"] == pytest.approx(1 - expected["flops_used"] / same_prefix)
    assert "same prefix handling" in report.headline(result)


def test_without_model_compute_time_full_depth_is_not_guessed_from_wall_time(tmp_path, rows):
    run = write_run(str(tmp_path / "run"), rows, sidecar=sidecar_for(rows))
    cost = report.build_report([run])["cost"]
    assert cost["run_gpu_hours"] == pytest.approx(1.0) and cost["full_depth_gpu_hours"] is None
    assert "engine_s" in cost["unavailable_reason"] and "--policy full" in cost["unavailable_reason"]


def test_pricing_follows_the_runs_device(tmp_path, rows):
    gpu_run = write_run(str(tmp_path / "gpu"), rows, sidecar=sidecar_for(rows, engine_s=100.0))
    cost = report.build_report([gpu_run])["cost"]  # the sidecar says H100
    assert cost["price_per_gpu_hour"] == report.DEVICE_PRICES["H100"][0] and "H100" in cost["gpu"]
    cpu_run = write_run(str(tmp_path / "cpu"), rows, sidecar=sidecar_for(rows, wall_s=7200, device="cpu",
                                                                          num_gpus=0, engine_s=3600.0))
    cost = report.build_report([cpu_run])["cost"]
    assert cost["cost_basis"] == "cpu_machine_time" and cost["run_gpu_hours"] == pytest.approx(2.0)
    assert cost["run_cost"] is None and cost["price_per_gpu_hour"] is None  # no GPU price for a CPU run
    assert cost["full_depth_gpu_hours"] > 2.0 and "CPU run has no default price" in cost["price_source"]
    as_a100 = report.build_report([cpu_run], price_per_gpu_hour="A100")["cost"]  # asked for
    assert as_a100["run_cost"] == pytest.approx(2.0 * report.DEVICE_PRICES["A100"][0])
    own = report.build_report([cpu_run], price_per_gpu_hour="0.25")["cost"]
    assert own["run_cost"] == pytest.approx(0.5) and own["gpu"] == "CPU machine"
    with pytest.raises(ValueError, match="no price for device"):
        report.build_report([cpu_run], price_per_gpu_hour="TPU9")


def test_missing_sidecar_gives_null_cost_with_reason(tmp_path, rows):
    run = write_run(str(tmp_path / "run"), rows, sidecar=None)
    result = report.write_report([run], str(tmp_path / "out"))
    assert_figures_match(result["run"], rows)  # the figures that need no sidecar are all there
    assert result["run"]["throughput"]["rows_per_s"] is None
    assert SIDECAR_NAME in result["run"]["throughput"]["unavailable_reason"]
    cost = result["cost"]
    assert cost["run_cost"] is None and cost["full_depth_cost"] is None and cost["saved_cost"] is None
    assert SIDECAR_NAME in cost["unavailable_reason"]
    assert "Not available" in (tmp_path / "out" / "report.md").read_text()


def test_memory_filesystem_matches_local(tmp_path, rows):
    fs = fsspec.filesystem("memory")
    try:
        remote = write_run("memory://report-test/run", rows, sidecar=sidecar_for(rows))
        local = write_run(str(tmp_path / "run"), rows, sidecar=sidecar_for(rows))
        remote_summary = report.summarize_run([remote])
        local_summary = report.summarize_run([local])
    finally:
        fs.rm("/report-test", recursive=True)
    assert_figures_match(remote_summary, rows)
    for key in ["exit_layer_counts", "savings_by_label", "audit_agreement", "throughput", "files"]:
        assert remote_summary[key] == local_summary[key]


def test_several_inputs_are_one_run(tmp_path, rows):
    first, second = rows[:150], rows[150:]
    a = write_run(str(tmp_path / "a"), first, sidecar=sidecar_for(first, wall_s=600, num_gpus=1))
    b = write_run(str(tmp_path / "b"), second, sidecar=sidecar_for(second, wall_s=900, num_gpus=2))
    result = report.build_report([a, b], price_per_gpu_hour=1.0)
    assert_figures_match(result["run"], rows)
    assert result["run"]["throughput"]["wall_s"] == 1500
    assert result["run"]["throughput"]["rows_per_s"] == pytest.approx(len(rows) / 1500)
    assert result["cost"]["run_gpu_hours"] == pytest.approx((600 * 1 + 900 * 2) / 3600)


def test_no_parquet_files_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        report.summarize_run([str(tmp_path / "empty")])


def test_wilson_interval_known_values():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 -> 0.2553 to 0.3662,
    # 15/148 -> 0.0624 to 0.1605, 0/20 -> 0 to 0.1611, 1/29 -> 0.0061 to 0.1718.
    for (successes, trials), (low, high) in {(81, 263): (0.2553, 0.3662),
                                             (15, 148): (0.0624, 0.1605),
                                             (0, 20): (0.0, 0.1611),
                                             (1, 29): (0.0061, 0.1718)}.items():
        got = report.wilson_interval(successes, trials)
        assert got == pytest.approx((low, high), abs=5e-5)
    assert report.wilson_interval(20, 20)[1] == 1.0
    assert report.wilson_interval(0, 0) is None


def test_rows_saving_at_least_reads_the_histogram_from_the_top():
    # 1 row in [0, 1%), none in [1%, 2%), 3 in [2%, 3%): all rows saved >= 0, 3/4 saved >= 1%.
    assert report.rows_saving_at_least([1, 0, 3]) == [1.0, 0.75, 0.75]
    assert report.rows_saving_at_least([0, 0]) == [0.0, 0.0]


def test_compare_mode_joins_by_id(tmp_path):
    early = make_rows(300, seed=2, gold=0.6)
    full = make_rows(280, seed=3, gold=0.0)  # gold only recorded by the early run
    for r in full:
        r["exit_layer"] = NUM_LAYERS if r["exit_layer"] is not None else None
    # ids 0-19 missing, 280-299 never made; ids 25-28 twice, the second copy with another label.
    duplicates = [dict(r, label="politics" if r["label"] != "politics" else "tech")
                  for r in full[25:29]]
    full = full[20:] + duplicates
    random.Random(4).shuffle(full)  # different order and file split than the early run
    early_dir = write_run(str(tmp_path / "early"), early,
                          sidecar=sidecar_for(early, wall_s=600, num_gpus=1))
    full_dir = write_run(str(tmp_path / "full"), full, files=4,
                         sidecar=sidecar_for(full, wall_s=1500, num_gpus=1, policy="full"))

    # Independently: first row per id in the full run, join on id.
    first_full = {}
    for r in full:
        first_full.setdefault(r["id"], r)
    early_by_id = {r["id"]: r for r in early}
    matched = [(early_by_id[i], first_full[i]) for i in early_by_id if i in first_full]
    labelled = [(a, b) for a, b in matched if a["label"] is not None and b["label"] is not None]
    graded = [(a, b) for a, b in labelled if a["gold_label"] is not None]

    result = report.build_report([early_dir], compare=[full_dir], rows_per_bucket=16)
    joined = result["compare"]["joined"]
    assert joined["join_buckets"] == math.ceil(300 / 16)
    assert joined["matched_rows"] == len(matched)
    assert joined["rows_only_in_run"] == len(set(early_by_id) - set(first_full)) == 40
    assert joined["rows_only_in_compare"] == len(set(first_full) - set(early_by_id)) == 0
    assert joined["duplicate_ids_compare"] == 4 and joined["duplicate_ids_run"] == 0
    agreement = joined["label_agreement"]
    assert agreement["rows"] == len(labelled)
    assert agreement["successes"] == sum(a["label"] == b["label"] for a, b in labelled)
    assert joined["gold_accuracy_run"]["rows"] == len(graded) > 0
    assert joined["gold_accuracy_run"]["successes"] == sum(a["label"] == a["gold_label"] for a, _ in graded)
    assert joined["gold_accuracy_compare"]["successes"] == sum(
        b["label"] == a["gold_label"] for a, b in graded)
    assert joined["throughput_ratio"] == pytest.approx((300 / 600) / (len(full) / 1500))
    # The compare run is --policy full, so full depth is measured from it, not estimated.
    cost = result["cost"]
    assert cost["full_depth_source"] == "measured_full_depth_run"
    assert cost["full_depth_gpu_hours"] == pytest.approx(300 * (1500 / len(full)) / 3600)
    # A --policy full run has the same prefix handling: its whole saving is early exit's.
    assert cost["saved_cost_by_exit"] == pytest.approx(cost["saved_cost"]) and cost["saved_cost_by_prefix"] is None
    # One bucket (all in memory) gives the same answer as many spilled buckets.
    one_bucket = report.build_report([early_dir], compare=[full_dir])["compare"]["joined"]
    assert one_bucket["join_buckets"] == 1
    assert {k: v for k, v in one_bucket.items() if k != "join_buckets"} == \
        {k: v for k, v in joined.items() if k != "join_buckets"}


def test_cli_writes_every_file_and_prints_a_summary(tmp_path, rows):
    run = write_run(str(tmp_path / "run"), rows, sidecar=sidecar_for(rows))
    full = write_run(str(tmp_path / "full"), rows, sidecar=sidecar_for(rows, policy="full"))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "jobs/report.py", "--input", run, "--out", str(out),
         "--price-per-hour", "2.5", "--compare", full],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "FLOPs" in completed.stdout and "USD 2.50/hour" in completed.stdout
    assert "compare: label agreement" in completed.stdout
    for name in ["report.md", "report.html", "summary.json", *report.PLOT_FILES.values()]:
        assert (out / name).stat().st_size > 0, name
    for name in report.PLOT_FILES.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    markdown = (out / "report.md").read_text()
    assert "USD 2.50 per hour" in markdown and "## Compare" in markdown
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cost"]["price_per_gpu_hour"] == 2.5
    assert summary["compare"]["joined"]["label_agreement"]["share"] == 1.0  # same rows


def test_cli_help_states_the_default_price():
    completed = subprocess.run([sys.executable, "jobs/report.py", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0
    help_text = " ".join(completed.stdout.split())
    assert "the run's own device" in help_text and "CPU run then has no price" in help_text
    assert "A100" in help_text and "H100" in help_text and "(default: report/)" in help_text


# --- Memory bound --------------------------------------------------------------------------------

BIG_ROWS = 3_000_000
BIG_FILES = 6
BIG_CHUNK = 250_000


def synthetic_chunk(start, n, rng):
    """n synthetic output rows, built column-wise so that writing 3 M rows stays fast and small."""
    error = rng.random(n) < 0.01
    exit_layer = rng.integers(1, NUM_LAYERS + 1, n)
    flops_full = rng.uniform(1e9, 5e9, n)
    prefix_saved = rng.uniform(0, 0.3, n)
    exit_saved = (NUM_LAYERS - exit_layer) / NUM_LAYERS * (1 - prefix_saved)
    compute_saved = exit_saved + prefix_saved
    labels = pc.take(pa.array(LABELS), pa.array(rng.integers(0, len(LABELS), n)))
    null_string = pa.scalar(None, pa.string())
    # Ids derived from source file + row position, as jobs/classify.py makes them.
    positions = pc.utf8_lpad(pc.cast(pa.array(np.arange(start, start + n)), pa.string()), 10, "0")
    ids = pc.binary_join_element_wise("s3://corpus-bucket/crawl/2024-06/shard-00017.jsonl.gz:",
                                      positions, "")
    columns = {
        "id": ids,
        "label": pc.if_else(pa.array(error), null_string, labels),
        "label_score": pa.array(rng.random(n).astype(np.float32)),
        "label_probs": pa.nulls(n, pa.list_(pa.float32())),  # the summary never reads it
        "exit_layer": pa.array(exit_layer.astype(np.int32), mask=error),
        "num_layers": pa.array(np.full(n, NUM_LAYERS, dtype=np.int32)),
        "flops_used": pa.array(flops_full * (1 - compute_saved)),
        "flops_full": pa.array(flops_full),
        "compute_saved": pa.array(compute_saved),
        "exit_saved": pa.array(exit_saved),
        "prefix_saved": pa.array(prefix_saved),
        "num_tokens": pa.array(rng.integers(20, 400, n).astype(np.int32)),
        "truncated": pa.array(rng.random(n) < 0.05),
        "full_label": pc.if_else(pa.array(rng.random(n) < 0.05), labels, null_string),
        "gold_label": pc.if_else(pa.array(rng.random(n) < 0.5), labels, null_string),
        "calibration": pa.array(np.zeros(n, bool)),
        "after_drift": pa.array(np.zeros(n, bool)),
        "error": pc.if_else(pa.array(error), pa.scalar("timeout"), null_string),
    }
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def write_big_run(folder):
    """Write BIG_ROWS rows in chunks; return the in-memory (Arrow) size of the whole table."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    table_bytes = 0
    rows_per_file = BIG_ROWS // BIG_FILES
    for i in range(BIG_FILES):
        with pq.ParquetWriter(os.path.join(folder, f"part-{i:03d}.parquet"), OUTPUT_SCHEMA) as writer:
            for start in range(i * rows_per_file, (i + 1) * rows_per_file, BIG_CHUNK):
                chunk = synthetic_chunk(start, BIG_CHUNK, rng)
                table_bytes += chunk.nbytes
                writer.write_table(chunk)
    with open(os.path.join(folder, SIDECAR_NAME), "w") as f:
        json.dump({"policy": "adainfer", "device": "cuda", "num_gpus": 1, "wall_s": 3000.0,
                   "rows": BIG_ROWS, "rows_per_s": BIG_ROWS / 3000.0}, f)
    return table_bytes


# The child measures its peak RSS (VmHWM; not ru_maxrss, which on Linux survives exec and would
# report the pytest parent's peak) at four points: after a warm-up report with compare mode on a
# tiny run (so the baseline holds the one-time costs: code pages, thread pools, fonts), after
# summarising the first file of the big run, after the whole report on all of it, and after
# comparing the big run with its first file (a join of 3 M ids with 0.5 M ids).
CHILD = textwrap.dedent("""
    import json, sys
    from adainfer_ray import report

    def peak_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    tiny, first_file, big, out = sys.argv[1:]
    report.write_report([tiny], out + "-tiny", compare=[tiny])
    baseline = peak_kib()
    first_file_summary = report.summarize_run([first_file])
    after_first_file = peak_kib()
    result = report.write_report([big], out)
    after_report = peak_kib()
    joined = report.compare_runs([big], [first_file], result["run"], first_file_summary)
    print(json.dumps({"baseline_kib": baseline, "first_file_kib": after_first_file,
                      "report_kib": after_report, "compare_kib": peak_kib(),
                      "rows": result["run"]["rows"], "error_rows": result["run"]["error_rows"],
                      "exit_rows": result["run"]["exit_rows"],
                      "matched_rows": joined["matched_rows"],
                      "agreement": joined["label_agreement"]["share"]}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM (Linux)")
def test_multi_million_row_output_is_summarised_in_bounded_memory(tmp_path):
    table_bytes = write_big_run(str(tmp_path / "big"))
    write_run(str(tmp_path / "tiny"), make_rows(200), sidecar=None, junk=False)
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "tiny"),
         str(tmp_path / "big" / "part-000.parquet"), str(tmp_path / "big"), str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    assert measured["rows"] == BIG_ROWS
    assert measured["exit_rows"] == BIG_ROWS - measured["error_rows"]
    assert measured["matched_rows"] == BIG_ROWS // BIG_FILES and measured["agreement"] == 1.0
    kib = 1024
    growth = (measured["report_kib"] - measured["baseline_kib"]) * kib
    growth_after_first_file = (measured["report_kib"] - measured["first_file_kib"]) * kib
    compare_growth = (measured["compare_kib"] - measured["baseline_kib"]) * kib
    print(f"\nmemory test: {BIG_ROWS:,} rows, {table_bytes / 2**20:.0f} MiB in Arrow; warm "
          f"baseline {measured['baseline_kib'] / kib:.0f} MiB; report peak "
          f"{measured['report_kib'] / kib:.0f} MiB (+{growth / 2**20:.0f} MiB, of which "
          f"+{growth_after_first_file / 2**20:.0f} MiB after the first {BIG_ROWS // BIG_FILES:,} "
          f"rows); compare peak {measured['compare_kib'] / kib:.0f} MiB "
          f"(+{compare_growth / 2**20:.0f} MiB)")
    # Loading the table would add at least table_bytes (pandas: several times more). The report
    # adds a small fraction of it ...
    assert growth < table_bytes / 4
    # ... which does not follow the row count: the other 5/6 of the rows add next to nothing ...
    assert growth_after_first_file < (table_bytes * 5 / 6) / 10
    # ... and the whole process, interpreter and libraries included, is smaller than the table.
    assert measured["report_kib"] * kib < table_bytes
    # Joining the 3 M-row run with another by id holds one bucket at a time, not all the ids.
    assert compare_growth < table_bytes / 3


def test_the_report_says_when_and_why_the_run_acted_on_its_audit(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "report"
    run_dir.mkdir()
    # Six rows exited early and disagree with full depth; the four after the drift ran at full depth.
    rows = [dict(id=f"r{i}", label="negative" if i >= 6 else "positive", label_score=0.9, exit_layer=4 if i >= 6 else 3,
                 num_layers=4, flops_used=1.0, flops_full=2.0, compute_saved=0.5, exit_saved=0.4, prefix_saved=0.1,
                 num_tokens=10, truncated=False, full_label="negative", gold_label=None, calibration=False,
                 after_drift=i >= 6, error=None)
            for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), run_dir / "a.parquet")
    drift = {"at_s": 12.3, "at": "2026-12-02T00:00:00+00:00", "audited": 6, "lower_bound": 0.4, "alpha": 0.05,
             "epsilon": 0.01, "rows_labeled_before": 6, "action": "full", "checks": "agreement", "kind": "accuracy"}
    (run_dir / SIDECAR_NAME).write_text(json.dumps({"rows": 10, "drift": drift, "runs": [
        {"start_time": "2026-12-02T00:00:00+00:00", "wall_s": 20, "rows_this_run": 10}]}))
    report.write_report([str(run_dir)], str(out))
    md = (out / "report.md").read_text()
    assert "## The run acted on its audit" in md and "12 s into the run" in md and "at least 40.0%" in md
    assert "labeled every later row at full depth" in md and "6 rows were labeled before" in md
    assert "checked agreement, not accuracy" in md  # an accuracy promise without gold labels
    # The audit measures the policy: rows after the drift (full depth, so agreeing) are not counted.
    audit = json.loads((out / "summary.json").read_text())["run"]["audit_agreement"]
    assert (audit["successes"], audit["rows"]) == (0, 6)


# --- Label health ------------------------------------------------------------------------------

def label_health_run(tmp_path, labels_written, full_labels=(), gold=None, labels=("negative", "neutral", "positive")):
    rows = [{"id": f"r{i}", "label": label, "label_score": 0.9, "exit_layer": 4, "num_layers": 4, "error": None,
             "full_label": full_labels[i] if i < len(full_labels) else None,
             "gold_label": gold[i] if gold else None}
            for i, label in enumerate(labels_written)]
    return report.summarize_run([write_run(str(tmp_path / "run"), rows, files=1, junk=False,
                                           sidecar={**sidecar_for(rows), "labels": list(labels)})])


def test_label_health_flags_a_label_never_predicted_and_gold_accuracy_at_the_majority_baseline(tmp_path):
    """The issue's case: a 3-label task where the model never answers `neutral` (60% of the gold labels)."""
    written = ["negative"] * 50 + ["positive"] * 50
    gold = ["neutral"] * 60 + ["negative"] * 20 + ["positive"] * 20
    summary = label_health_run(tmp_path, written, full_labels=written[:30], gold=gold)
    health = summary["label_health"]
    assert health["written"]["shares"] == {"negative": 0.5, "neutral": 0.0, "positive": 0.5}
    assert health["full_depth_audit"]["rows"] == 30 and health["full_depth_audit"]["shares"]["neutral"] == 0.0
    assert health["majority_gold_label"] == "neutral" and health["majority_gold_share"] == pytest.approx(0.6)
    never, baseline = health["warnings"]
    assert "neutral was (almost) never predicted" in never and "--demos" in never
    assert "accuracy on gold labels (20.0%) is below that of always answering the most common gold label, " \
           "neutral (60.0%)" in baseline
    text = report.job_summary({"summary": summary, "resumed_rows": 0, "num_layers": 4, "output": "out"})
    assert "labels written: negative 50.0%, neutral 0.0%, positive 50.0% (full depth on 30 audited rows:" in text
    assert text.count("WARNING: label health:") == 2
    assert "Label health" in report.render_markdown({**report.build_report([str(tmp_path / "run")]),
                                                      "plots": {k: k for k in report.PLOT_FILES}})


def test_label_health_flags_one_label_taking_nearly_every_row_and_is_quiet_on_a_healthy_run(tmp_path):
    one_sided = label_health_run(tmp_path / "a", ["positive"] * 98 + ["negative"] * 2, labels=("negative", "positive"))
    (warning,) = one_sided["label_health"]["warnings"]
    assert "positive takes 98.0% of 100 rows" in warning
    healthy = label_health_run(tmp_path / "b", ["positive"] * 55 + ["negative"] * 45, gold=["positive"] * 50 +
                               ["negative"] * 50, labels=("negative", "positive"))
    assert healthy["label_health"]["warnings"] == []


def test_audit_gold_counts_the_accuracy_promises_paired_losses(tmp_path, rows):
    """Audited rows with gold: wrong only at the exit (+1) and wrong only at full depth (-1), as
    counted independently here; rows without gold or audit, error rows and the sample stay out."""
    rows = [dict(r) for r in rows]
    rows[5].update(calibration=True)
    summary = report.summarize_run([write_run(str(tmp_path / "run"), rows, sidecar=sidecar_for(rows))])
    audited = [r for r in rows if r["error"] is None and r["label"] is not None and not r["calibration"]
               and r["full_label"] is not None and r["gold_label"] is not None]
    assert summary["audit_gold"] == {
        "rows": len(audited),
        "exit_only_wrong": sum(r["label"] != r["gold_label"] and r["full_label"] == r["gold_label"] for r in audited),
        "full_only_wrong": sum(r["label"] == r["gold_label"] and r["full_label"] != r["gold_label"] for r in audited)}
    assert summary["audit_gold"]["exit_only_wrong"] > 0 and summary["audit_gold"]["full_only_wrong"] > 0
