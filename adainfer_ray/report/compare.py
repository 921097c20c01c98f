"""Two runs side by side: `compare_runs` joins them by `id` in bounded memory.

Both runs are hash-partitioned by id into buckets spilled to temporary Arrow files, then joined one
bucket at a time, so memory holds about ROWS_PER_BUCKET rows of each run whatever their size.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa

from adainfer_ray.report.outputs import column, is_valid, iter_batches
from adainfer_ray.schema import OUTPUT_SCHEMA
from adainfer_ray.stats import proportion, ratio

ROWS_PER_BUCKET = 100_000  # compare mode: rows of one run held in memory at once while joining
MAX_BUCKETS = 512          # ... and open files per run while spilling (past 51 M rows, buckets grow)

COMPARE_COLUMNS = ["id", "label", "gold_label"]


def _bucket_of(ids: pa.Array, buckets: int) -> np.ndarray:
    """A stable bucket number per id (pandas' hash is seeded with a fixed key, so both runs agree)."""
    hashes = pd.util.hash_array(ids.to_numpy(zero_copy_only=False))
    return (hashes % np.uint64(buckets)).astype(np.int64)


def _spill_buckets(inputs: list[str], buckets: int, folder: str) -> tuple[list[str], int]:
    """Write the (id, label, gold_label) rows of a run into `buckets` Arrow files by id hash.

    Returns the bucket file paths and the number of rows without id (which cannot be joined).
    """
    schema = pa.schema([OUTPUT_SCHEMA.field(name) for name in COMPARE_COLUMNS])
    paths = [os.path.join(folder, f"bucket-{k:05d}.arrow") for k in range(buckets)]
    writers = [pa.ipc.new_file(path, schema) for path in paths]
    rows_without_id = 0
    try:
        for batch in iter_batches(inputs, COMPARE_COLUMNS):
            batch = pa.record_batch([column(batch, name).cast(schema.field(name).type)
                                     for name in COMPARE_COLUMNS], schema=schema)
            has_id = is_valid(batch.column(0))
            rows_without_id += int((~has_id).sum())
            batch = batch.filter(pa.array(has_id))
            bucket = _bucket_of(batch.column(0), buckets)
            order = np.argsort(bucket, kind="stable")
            bucket = bucket[order]
            batch = batch.take(pa.array(order))
            starts = np.searchsorted(bucket, np.arange(buckets + 1))
            for k in range(buckets):
                if starts[k + 1] > starts[k]:
                    writers[k].write_batch(batch.slice(int(starts[k]), int(starts[k + 1] - starts[k])))
    finally:
        for writer in writers:
            writer.close()
    return paths, rows_without_id


def _read_bucket(path: str) -> pd.DataFrame:
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all().to_pandas()


def compare_runs(inputs: list[str], other_inputs: list[str], summary: dict, other_summary: dict,
                 rows_per_bucket: int = ROWS_PER_BUCKET, spill_dir: str | None = None) -> dict:
    """Join two runs by `id` and compare labels, gold accuracy and throughput.

    Bounded memory: both runs are hash-partitioned by id into buckets of about `rows_per_bucket`
    rows each, spilled to temporary Arrow files, and joined one bucket at a time. Duplicate ids
    within a run (e.g. a resumed run) keep their first row and are counted.
    """
    largest = max(summary["rows"], other_summary["rows"])
    buckets = min(MAX_BUCKETS, max(1, math.ceil(largest / rows_per_bucket)))
    counts = Counter()
    with tempfile.TemporaryDirectory(prefix="adainfer-compare-", dir=spill_dir) as folder:
        os.makedirs(os.path.join(folder, "run"))
        os.makedirs(os.path.join(folder, "compare"))
        run_paths, counts["rows_without_id_run"] = _spill_buckets(
            inputs, buckets, os.path.join(folder, "run"))
        other_paths, counts["rows_without_id_compare"] = _spill_buckets(
            other_inputs, buckets, os.path.join(folder, "compare"))
        for run_path, other_path in zip(run_paths, other_paths):
            counts.update(_compare_bucket(_read_bucket(run_path), _read_bucket(other_path)))
    return _comparison_figures(counts, buckets, summary, other_summary)


def _compare_bucket(run: pd.DataFrame, other: pd.DataFrame) -> Counter:
    counts = Counter()
    run_duplicates, other_duplicates = run["id"].duplicated(), other["id"].duplicated()
    counts["duplicate_ids_run"] = int(run_duplicates.sum())
    counts["duplicate_ids_compare"] = int(other_duplicates.sum())
    joined = run[~run_duplicates].merge(other[~other_duplicates], on="id", how="outer",
                                        suffixes=("_run", "_compare"), indicator=True)
    counts["matched_rows"] = int((joined["_merge"] == "both").sum())
    counts["rows_only_in_run"] = int((joined["_merge"] == "left_only").sum())
    counts["rows_only_in_compare"] = int((joined["_merge"] == "right_only").sum())
    both = joined[joined["_merge"] == "both"]
    labelled = both["label_run"].notna() & both["label_compare"].notna()
    counts["labelled_pairs"] = int(labelled.sum())
    counts["agreeing_pairs"] = int((labelled & (both["label_run"] == both["label_compare"])).sum())
    # Gold is the same input column in both runs; take whichever run recorded it.
    gold = both["gold_label_run"].fillna(both["gold_label_compare"])
    graded = labelled & gold.notna()
    counts["gold_pairs"] = int(graded.sum())
    counts["gold_correct_run"] = int((graded & (both["label_run"] == gold)).sum())
    counts["gold_correct_compare"] = int((graded & (both["label_compare"] == gold)).sum())
    return counts


def _comparison_figures(counts: Counter, buckets: int, summary: dict, other_summary: dict) -> dict:
    run_rate = summary["throughput"]["rows_per_s"]
    other_rate = other_summary["throughput"]["rows_per_s"]
    accuracy_run = proportion(counts["gold_correct_run"], counts["gold_pairs"])
    accuracy_compare = proportion(counts["gold_correct_compare"], counts["gold_pairs"])
    return {
        "join_buckets": buckets,
        "matched_rows": counts["matched_rows"],
        "rows_only_in_run": counts["rows_only_in_run"],
        "rows_only_in_compare": counts["rows_only_in_compare"],
        "duplicate_ids_run": counts["duplicate_ids_run"],
        "duplicate_ids_compare": counts["duplicate_ids_compare"],
        "rows_without_id_run": counts["rows_without_id_run"],
        "rows_without_id_compare": counts["rows_without_id_compare"],
        # Over matched rows where both runs have a label.
        "label_agreement": proportion(counts["agreeing_pairs"], counts["labelled_pairs"]),
        # Over matched rows where both runs have a label and a gold label exists: same rows for both.
        "gold_accuracy_run": accuracy_run,
        "gold_accuracy_compare": accuracy_compare,
        "gold_accuracy_difference": (None if accuracy_run["share"] is None
                                     else accuracy_run["share"] - accuracy_compare["share"]),
        # Rows/s of --input over rows/s of --compare; > 1 means --input is faster.
        "throughput_ratio": ratio(run_rate, other_rate),
        "throughput_ratio_reason": (None if run_rate and other_rate
                                    else "rows/s missing for one of the runs (no sidecar?)"),
    }

