"""Cost reports from the Parquet output of `jobs/classify.py`.

Users run early exit to save money; this module is how they see, and show, what was saved.

Reading order for a newcomer:

1. Finding the data: `find_parquet_files`, `read_sidecar`, `iter_batches`.
2. Summarising one run in bounded memory: `RunSummary` takes one pyarrow RecordBatch at a time and
   keeps only running totals (sums, counters keyed by label, fixed-size histograms), so a
   10-million-row output costs the same memory as a 10-row one, plus one row group in flight.
   `summarize_run` wires 1 and 2 together and adds the throughput from the run sidecar(s).
3. Money: `estimate_cost` turns the measured throughput into GPU-hours and currency.
4. Two runs side by side: `compare_runs` joins them by `id` in bounded memory (hash partitioning
   into buckets spilled to temporary Arrow files, then one bucket at a time).
5. Output: `plot_*` write PNGs, `report_sections` lays the report out once, `render_markdown` and
   `render_html` print that layout, `write_report` does everything and writes `summary.json`.

Conventions in `summary.json` (stable snake_case names; `null` means "not computable", and a
`*_reason` or `warnings` entry says why):

- `*_share` values are fractions in [0, 1] (printed as percentages in the report).
- FLOP shares (`flops_saved_share`, `exit_saved_share`, `prefix_saved_share`) are weighted by
  `flops_full`: they answer "what share of the full-depth compute did this run not spend".
  `mean_compute_saved` is the unweighted mean over rows.
- `exit_layer_counts[k - 1]` is the number of rows that stopped after layer k (k = 1..num_layers).
- Error rows (`error` not null) count in `rows`, `error_rows`, `truncated_rows` and
  `gold_accuracy.rows_without_label`, and in no other figure.

This module is a leaf of the package: it imports nothing from it but `schema` and `stats`, and
never torch or ray, so reports run anywhere pyarrow runs.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import posixpath
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Iterator

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from adainfer_ray.schema import OUTPUT_SCHEMA, SIDECAR_NAME
from adainfer_ray.stats import lower_bound, rows_to_confirm, upper_bound

# --- Prices ------------------------------------------------------------------------------------

# Prices per device-hour, stated wherever they are used: approximate 2024 public-cloud on-demand
# prices (the per-GPU share of the hyperscalers' 8-GPU instances). Check your provider's: pass
# --price-per-hour NUMBER. A run is priced as the device it ran on (the run sidecar's device and
# gpu_name); a CPU run has no default price (it is not priced as a GPU unless asked: pass a device
# name or your machine's price).
PRICE_CURRENCY = "USD"
DEVICE_PRICES = {
    "A100": (5.00, "about the per-GPU share of an 8 x A100-80GB on-demand instance in 2024 (AWS p4de.24xlarge "
                   "about USD 41/h, GCP a2-ultragpu-8g about USD 40/h)"),
    "H100": (12.00, "about the per-GPU share of an 8 x H100-80GB on-demand instance in 2024 (AWS p5.48xlarge "
                    "about USD 98/h)"),
}
DEFAULT_GPU = "A100"  # kept for callers; pricing follows the run's device
DEFAULT_PRICE_PER_GPU_HOUR = DEVICE_PRICES[DEFAULT_GPU][0]
DEFAULT_PRICE_SOURCE = DEVICE_PRICES[DEFAULT_GPU][1]


def resolve_price(spec, throughput: dict, device_name: str | None = None) -> dict:
    """The hourly price to use: `spec` is None (the run's own device from its sidecar), a number
    (this price for the run's device) or a device name of DEVICE_PRICES (price the run as that
    device, e.g. a CPU run as an A100). Returns price (None when there is none), device, source."""
    run_device = device_name or throughput.get("gpu_name") or (
        "CPU machine" if throughput.get("device") == "cpu" else throughput.get("device")) or "unknown device"
    if spec is not None and not isinstance(spec, str):
        return {"price": float(spec), "device": run_device, "source": "given on the command line"}
    if isinstance(spec, str):
        try:
            return {"price": float(spec), "device": run_device, "source": "given on the command line"}
        except ValueError:
            pass
        name = _price_key(spec)
        if name is None:
            raise ValueError(f"no price for device {spec!r}: pass a number, or one of {', '.join(DEVICE_PRICES)}")
        return {"price": DEVICE_PRICES[name][0], "device": name, "source": DEVICE_PRICES[name][1] + ", asked for"}
    if throughput.get("device") == "cuda":
        name = _price_key(str(throughput.get("gpu_name") or ""))
        if name is not None:
            return {"price": DEVICE_PRICES[name][0], "device": run_device, "source": DEVICE_PRICES[name][1]}
        return {"price": None, "device": run_device,
                "source": f"no price known for {run_device}: pass --price-per-hour NUMBER"}
    return {"price": None, "device": run_device,
            "source": "a CPU run has no default price: pass --price-per-hour NUMBER (your machine's hourly "
                      f"price) or a device name ({', '.join(DEVICE_PRICES)}) to price it as that device"}


def _price_key(name: str) -> str | None:
    """The DEVICE_PRICES key a device name such as 'NVIDIA A100-SXM4-80GB' belongs to."""
    hits = [k for k in DEVICE_PRICES if k.lower() in name.lower()]
    return hits[0] if len(hits) == 1 else None


REPORT_VERSION = 1
# Reading: column chunks are streamed through a small buffer (pre_buffer off) and handed over
# BATCH_ROWS rows at a time, so that memory in flight hardly grows with the row-group size the
# writer chose (measured on one 2M-row row group: about 25 MB of Arrow memory this way, about
# 105 MB with pyarrow's defaults).
BATCH_ROWS = 16_384
READ_BUFFER_BYTES = 1 << 20
SAVED_SHARE_BINS = 100     # fixed bins over [0, 1] for the per-row saved-share histograms
ROWS_PER_BUCKET = 100_000  # compare mode: rows of one run held in memory at once while joining
MAX_BUCKETS = 512          # ... and open files per run while spilling (past 51 M rows, buckets grow)
Z_95 = 1.959963984540054   # two-sided 95% normal quantile

# The columns a summary reads: everything but `id`, which is the widest column and not needed.
SUMMARY_COLUMNS = [name for name in OUTPUT_SCHEMA.names if name != "id"]
COMPARE_COLUMNS = ["id", "label", "gold_label"]
FLOP_COLUMNS = ["flops_used", "flops_full", "compute_saved", "exit_saved", "prefix_saved"]

PLOT_FILES = {
    "exit_depth": "exit_depth_histogram.png",
    "savings_by_label": "savings_by_label.png",
    "cumulative_savings": "cumulative_savings.png",
}
MAX_LABELS_PLOTTED = 25


# --- 1. Finding the data -----------------------------------------------------------------------

def _is_hidden(relative_path: str) -> bool:
    """Files or folders starting with `_` or `.` are metadata, temporary or partial files."""
    return any(part.startswith(("_", ".")) for part in relative_path.split("/") if part)


def find_parquet_files(uri: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem of `uri` and the Parquet files in it (or `uri` itself, if it is a file).

    Skips anything whose path below `uri` has a part starting with `_` or `.`. Sorted, so that
    reports are reproducible.
    """
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/") or "/"
    if fs.isfile(root):
        return fs, [root]
    files = []
    for path in fs.find(root):
        relative = path[len(root):] if path.startswith(root) else posixpath.basename(path)
        if path.endswith(".parquet") and not _is_hidden(relative):
            files.append(path)
    return fs, sorted(files)


def read_sidecar(uri: str) -> dict | None:
    """The run sidecar next to the output (`_run.json`), or None when there is none."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/") or "/"
    folder = posixpath.dirname(root) if fs.isfile(root) else root
    path = posixpath.join(folder, SIDECAR_NAME)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.load(f)


def iter_batches(uris: Iterable[str], columns: list[str],
                 batch_size: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Yield RecordBatches of `columns` from every Parquet file of every uri, one at a time.

    Columns a file lacks are absent from its batches; `_column` treats them as all-null.
    """
    for uri in uris:
        fs, files = find_parquet_files(uri)
        for path in files:
            with fs.open(path, "rb") as f:
                parquet_file = pq.ParquetFile(f, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
                present = [c for c in columns if c in parquet_file.schema_arrow.names]
                yield from parquet_file.iter_batches(batch_size=batch_size, columns=present)


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    """A column of the batch, or an all-null one of the contract's type if the file lacks it."""
    index = batch.schema.get_field_index(name)
    if index < 0:
        return pa.nulls(batch.num_rows, type=OUTPUT_SCHEMA.field(name).type)
    return batch.column(index)


def _numbers(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A numeric column as float64, with NaN for nulls."""
    return _column(batch, name).cast(pa.float64()).to_numpy(zero_copy_only=False)


def _is_valid(array: pa.Array) -> np.ndarray:
    return array.is_valid().to_numpy(zero_copy_only=False)


def _ratio(numerator, denominator) -> float | None:
    """numerator / denominator as a plain float, or None when the denominator is 0 or missing."""
    if numerator is None or not denominator:
        return None
    return float(numerator) / float(denominator)


# --- Confidence intervals ----------------------------------------------------------------------

def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion (95% by default); None when there are no trials.

    Chosen over the plain normal interval because audits are often small or near 100% agreement,
    where the normal interval leaves [0, 1] or collapses to a point.
    """
    if trials <= 0:
        return None
    p = successes / trials
    z2 = z * z
    center = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half_width = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, center - half_width), min(1.0, center + half_width)


def _proportion(successes: int, trials: int) -> dict:
    """A proportion with its 95% Wilson interval, as it appears in summary.json."""
    interval = wilson_interval(successes, trials)
    return {
        "rows": int(trials),
        "successes": int(successes),
        "share": _ratio(successes, trials),
        "ci95_low": interval[0] if interval else None,
        "ci95_high": interval[1] if interval else None,
        "interval": "wilson",
    }


# --- 2. Summarising one run --------------------------------------------------------------------

# Per-label running sums. The null label (rows without error but without a label) is a key too,
# so that run-wide totals are just the sum over all keys.
LABEL_SUMS = [
    "rows",               # rows without error
    "exit_rows",          # ... that also have a valid exit_layer and num_layers
    "exit_layer",         # sum of exit_layer over exit_rows
    "layers_skipped",     # sum of (num_layers - exit_layer) / num_layers over exit_rows
    "flops_rows",         # rows without error whose FLOP columns are all set, flops_full > 0
    "flops_used",         # sums over flops_rows ...
    "flops_full",
    "exit_saved_flops",   # exit_saved * flops_full: FLOPs not spent thanks to early exit
    "prefix_saved_flops", # prefix_saved * flops_full: FLOPs not spent thanks to prefix reuse
    "compute_saved",      # sum of the per-row share, for the unweighted mean
]


class RunSummary:
    """Running totals over the rows of one run: feed RecordBatches to `update`, then `finalize`.

    Memory is bounded by the number of distinct labels and `num_layers`, never by the row count.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.error_rows = 0
        self.truncated_rows = 0
        self.token_rows = 0
        self.tokens = 0.0
        self.num_layers = 0
        self.by_label: dict[str | None, Counter] = {}
        # exit_layer_counts[k] = rows that stopped after layer k; index 0 stays 0.
        self.exit_layer_counts = np.zeros(1, dtype=np.int64)
        self.saved_histograms = {name: np.zeros(SAVED_SHARE_BINS, dtype=np.int64)
                                 for name in ("compute_saved", "exit_saved", "prefix_saved")}
        self.audit_rows = 0
        self.audit_agreeing = 0
        self.calibration_rows = 0
        # Rows labeled by the policy (outside the --calibrate sample): what the promise is about.
        self.policy_rows = 0
        self.policy_layers_skipped = 0.0
        self.policy_gold_rows = 0
        self.policy_gold_correct = 0
        self.full_gold_rows = 0  # audited rows with a gold label: accuracy at full depth
        self.full_gold_correct = 0
        self.gold_rows = 0
        self.gold_correct = 0
        self.gold_rows_without_label = 0

    def update(self, batch: pa.RecordBatch) -> "RunSummary":
        ok = ~_is_valid(_column(batch, "error"))
        self.rows += batch.num_rows
        self.error_rows += int((~ok).sum())
        self._count_tokens(batch, ok)
        has_exit = self._count_exit_layers(batch, ok)
        has_flops = self._count_saved_shares(batch, ok)
        self._add_label_sums(batch, ok, has_exit, has_flops)
        self._count_agreement(batch, ok)
        return self

    def _count_tokens(self, batch: pa.RecordBatch, ok: np.ndarray) -> None:
        self.truncated_rows += int(_column(batch, "truncated").fill_null(False)
                                   .to_numpy(zero_copy_only=False).sum())
        tokens = _numbers(batch, "num_tokens")
        has_tokens = ok & ~np.isnan(tokens)
        self.token_rows += int(has_tokens.sum())
        self.tokens += float(tokens[has_tokens].sum())

    def _count_exit_layers(self, batch: pa.RecordBatch, ok: np.ndarray) -> np.ndarray:
        """Update the exit-depth histogram; return the mask of rows with a usable exit layer."""
        exit_layer = _numbers(batch, "exit_layer")
        num_layers = _numbers(batch, "num_layers")
        with np.errstate(invalid="ignore"):  # NaN comparisons are False, which is what we want
            has_exit = ok & (exit_layer >= 1) & (num_layers >= 1)
        if has_exit.any():
            self.num_layers = max(self.num_layers, int(num_layers[has_exit].max()))
            counts = np.bincount(exit_layer[has_exit].astype(np.int64))
            self._add_exit_counts(counts)
        return has_exit

    def _add_exit_counts(self, counts: np.ndarray) -> None:
        size = max(len(counts), len(self.exit_layer_counts))
        total = np.zeros(size, dtype=np.int64)
        total[:len(self.exit_layer_counts)] += self.exit_layer_counts
        total[:len(counts)] += counts
        self.exit_layer_counts = total

    def _count_saved_shares(self, batch: pa.RecordBatch, ok: np.ndarray) -> np.ndarray:
        """Update the per-row saved-share histograms; return the mask of rows with FLOP figures."""
        values = {name: _numbers(batch, name) for name in FLOP_COLUMNS}
        has_flops = ok & np.logical_and.reduce([~np.isnan(v) for v in values.values()])
        with np.errstate(invalid="ignore"):
            has_flops &= values["flops_full"] > 0
        for name, histogram in self.saved_histograms.items():
            share = values[name][has_flops]
            # Shares outside [0, 1] (a row whose exit heads cost more than they saved) are
            # clamped into the end bins, so every row is counted once.
            bins = np.clip(np.floor(share * SAVED_SHARE_BINS), 0, SAVED_SHARE_BINS - 1)
            histogram += np.bincount(bins.astype(np.int64), minlength=SAVED_SHARE_BINS)
        return has_flops

    def _add_label_sums(self, batch: pa.RecordBatch, ok: np.ndarray,
                        has_exit: np.ndarray, has_flops: np.ndarray) -> None:
        exit_layer = _numbers(batch, "exit_layer")
        num_layers = _numbers(batch, "num_layers")
        flops_full = _numbers(batch, "flops_full")

        def where(mask, values):
            return np.where(mask, values, 0.0)

        with np.errstate(invalid="ignore", divide="ignore"):
            per_row = {
                "rows": ok.astype(np.float64),
                "exit_rows": has_exit.astype(np.float64),
                "exit_layer": where(has_exit, exit_layer),
                "layers_skipped": where(has_exit, (num_layers - exit_layer) / num_layers),
                "flops_rows": has_flops.astype(np.float64),
                "flops_used": where(has_flops, _numbers(batch, "flops_used")),
                "flops_full": where(has_flops, flops_full),
                "exit_saved_flops": where(has_flops, _numbers(batch, "exit_saved") * flops_full),
                "prefix_saved_flops": where(has_flops, _numbers(batch, "prefix_saved") * flops_full),
                "compute_saved": where(has_flops, _numbers(batch, "compute_saved")),
            }
        table = pa.table({"label": _column(batch, "label"), **per_row}).filter(pa.array(ok))
        grouped = table.group_by("label").aggregate([(name, "sum") for name in LABEL_SUMS])
        for row in grouped.to_pylist():
            sums = self.by_label.setdefault(row["label"], Counter())
            for name in LABEL_SUMS:
                sums[name] += row[f"{name}_sum"]

    def _count_agreement(self, batch: pa.RecordBatch, ok: np.ndarray) -> None:
        label = _column(batch, "label")
        has_label = ok & _is_valid(label)
        # The --calibrate sample ran at full depth: it agrees with itself and measures nothing.
        sample = (_column(batch, "calibration").fill_null(False).to_numpy(zero_copy_only=False)
                  if "calibration" in batch.schema.names else np.zeros(batch.num_rows, bool))
        self.calibration_rows += int(sample.sum())
        policy_rows = has_label & ~sample
        self.policy_rows += int(policy_rows.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            skipped = 1 - _numbers(batch, "exit_layer") / _numbers(batch, "num_layers")
        self.policy_layers_skipped += float(np.nansum(np.where(policy_rows, skipped, 0.0)))
        compared, same = _matches(label, _column(batch, "gold_label"), policy_rows)
        self.policy_gold_rows += compared
        self.policy_gold_correct += same
        full = _column(batch, "full_label")
        compared, same = _matches(label, full, has_label & ~sample)
        self.audit_rows += compared
        self.audit_agreeing += same
        gold = _column(batch, "gold_label")
        compared, same = _matches(full, gold, has_label & ~sample & _is_valid(full))
        self.full_gold_rows += compared
        self.full_gold_correct += same
        compared, same = _matches(label, gold, has_label)
        self.gold_rows += compared
        self.gold_correct += same
        self.gold_rows_without_label += int((~has_label & _is_valid(gold)).sum())

    # --- finalize ---

    def finalize(self) -> dict:
        """Every figure of the run, under stable names (see the module docstring)."""
        totals = Counter()
        for sums in self.by_label.values():
            totals.update(sums)
        ok_rows = self.rows - self.error_rows
        labelled = {label: sums for label, sums in self.by_label.items() if label is not None}
        labelled_rows = int(sum(s["rows"] for s in labelled.values()))
        label_counts = {label: int(sums["rows"]) for label, sums in
                        sorted(labelled.items(), key=lambda item: (-item[1]["rows"], item[0]))}
        return {
            "rows": self.rows,
            "error_rows": self.error_rows,
            "ok_rows": ok_rows,
            "error_share": _ratio(self.error_rows, self.rows),
            "labelled_rows": labelled_rows,
            "unlabelled_rows": ok_rows - labelled_rows,
            "truncated_rows": self.truncated_rows,
            "mean_tokens": _ratio(self.tokens, self.token_rows),
            "label_counts": label_counts,
            "label_shares": {label: _ratio(n, labelled_rows) for label, n in label_counts.items()},
            "num_layers": self.num_layers or None,
            **_exit_figures(totals),
            "exit_layer_counts": self._exit_layer_counts_list(),
            **_flop_figures(totals),
            "saved_share_histogram": {
                "bin_edges": [i / SAVED_SHARE_BINS for i in range(SAVED_SHARE_BINS + 1)],
                **{name: h.tolist() for name, h in self.saved_histograms.items()},
            },
            # Most frequent labels first, like label_counts.
            "savings_by_label": {label: {"rows": label_counts[label],
                                         **_exit_figures(labelled[label]),
                                         **_flop_figures(labelled[label])}
                                 for label in label_counts},
            "audit_agreement": _proportion(self.audit_agreeing, self.audit_rows),
            "audit_disagreement_bound95": upper_bound(self.audit_rows - self.audit_agreeing, self.audit_rows),
            "calibration_rows": self.calibration_rows,
            "outside_sample": {"rows": self.policy_rows,
                               "layers_skipped_share": _ratio(self.policy_layers_skipped, self.policy_rows),
                               "gold_accuracy": _proportion(self.policy_gold_correct, self.policy_gold_rows)},
            "full_depth_gold_accuracy": _proportion(self.full_gold_correct, self.full_gold_rows),
            "gold_accuracy": {**_proportion(self.gold_correct, self.gold_rows),
                              "rows_without_label": self.gold_rows_without_label},
        }

    def _exit_layer_counts_list(self) -> list[int]:
        """Counts for layers 1..num_layers (longer if some row exited past its num_layers)."""
        size = max(self.num_layers, len(self.exit_layer_counts) - 1)
        counts = np.zeros(size + 1, dtype=np.int64)
        counts[:len(self.exit_layer_counts)] = self.exit_layer_counts
        return counts[1:].tolist()


def _matches(label: pa.Array, reference: pa.Array, has_label: np.ndarray) -> tuple[int, int]:
    """(rows with both a label and a reference, rows among them where the two are equal)."""
    compared = has_label & _is_valid(reference)
    equal = pc.equal(label, reference).fill_null(False).to_numpy(zero_copy_only=False)
    return int(compared.sum()), int((compared & equal).sum())


def _exit_figures(sums: Counter) -> dict:
    return {
        "exit_rows": int(sums["exit_rows"]),
        "mean_exit_layer": _ratio(sums["exit_layer"], sums["exit_rows"]),
        # The AdaInfer paper's pruning ratio: the mean share of layers a row did not run.
        "layers_skipped_share": _ratio(sums["layers_skipped"], sums["exit_rows"]),
    }


def _flop_figures(sums: Counter) -> dict:
    flops_full = sums["flops_full"]
    return {
        "flops_rows": int(sums["flops_rows"]),
        "flops_used": float(sums["flops_used"]),
        "flops_full": float(flops_full),
        "flops_saved_share": None if not flops_full else 1.0 - sums["flops_used"] / flops_full,
        "exit_saved_share": _ratio(sums["exit_saved_flops"], flops_full),
        # Early exit's own saving: against full depth with the same prefix handling as the run.
        "exit_saved_share_same_prefix": _ratio(sums["exit_saved_flops"], flops_full - sums["prefix_saved_flops"]),
        "prefix_saved_share": _ratio(sums["prefix_saved_flops"], flops_full),
        "mean_compute_saved": _ratio(sums["compute_saved"], sums["flops_rows"]),
    }


def _gpus_billed(sidecar: dict) -> float:
    """Devices a run is charged for: its GPUs, or one machine for a CPU run."""
    if sidecar.get("device") == "cuda":
        return float(sidecar.get("num_gpus") or 0) or 1.0
    return 1.0


def _engine_device_seconds(sidecar: dict) -> float | None:
    """Device-seconds the model itself ran: the sidecar's engine_s (seconds inside the engine,
    summed over actors) x devices per actor; None when the sidecar does not record it."""
    if sidecar.get("engine_s") is None:
        return None
    actors = sidecar.get("max_actors") or int(str(sidecar.get("num_actors") or 1).split(",")[-1])  # N or MIN,MAX
    return float(sidecar["engine_s"]) * _gpus_billed(sidecar) / max(1, int(actors))


def _one_or_mixed(values: list) -> object:
    distinct = sorted({str(v) for v in values}) if values else []
    if len(distinct) == 1:
        return values[0]
    return "mixed: " + ", ".join(distinct) if distinct else None


def summarize_throughput(inputs: list[str], sidecars: list[dict | None]) -> dict:
    """Wall time, rows/s and billed GPU time from the run sidecar(s), one per input folder.

    Several inputs are taken as parts of one run executed one after the other: wall times and
    GPU time add up, and rows/s is total sidecar rows over total wall time.
    """
    missing = [uri for uri, sidecar in zip(inputs, sidecars) if sidecar is None]
    no_wall = [uri for uri, s in zip(inputs, sidecars) if s is not None and not s.get("wall_s")]
    reason = None
    if missing:
        reason = f"no run sidecar ({SIDECAR_NAME}) in: {', '.join(missing)}"
    elif no_wall:
        reason = f"run sidecar without wall_s in: {', '.join(no_wall)}"
    if reason:
        return {"available": False, "unavailable_reason": reason, "wall_s": None,
                "sidecar_rows": None, "rows_per_s": None, "gpu_seconds": None,
                "machine_hours": None, "device": None, "gpu_name": None, "num_gpus": None,
                "policy": None, "model": None, "cost_basis": None, "engine_device_seconds": None}
    # A resumed output holds several runs (sidecar `runs`, issue 12): each counts its own rows and
    # time; a run killed before its end (no wall_s) has no time to count, and neither do its rows.
    runs = [r for s in sidecars for r in (s.get("runs") or [{**s, "rows_this_run": s.get("rows_this_run", s.get("rows"))}])
            if r.get("wall_s")]
    wall_s = sum(float(r["wall_s"]) for r in runs)
    sidecar_rows = sum(int(s.get("rows") or 0) for s in sidecars)
    all_cuda = all(s.get("device") == "cuda" for s in sidecars)
    return {
        "available": True,
        "unavailable_reason": None,
        "wall_s": wall_s,
        "sidecar_rows": sidecar_rows,
        "rows_per_s": _ratio(sum(int(r.get("rows_this_run") or 0) for r in runs), wall_s),
        "gpu_seconds": sum(float(r["wall_s"]) * _gpus_billed(r) for r in runs),
        "engine_device_seconds": None if any(_engine_device_seconds(s) is None for s in sidecars)
        else sum(_engine_device_seconds(s) for s in sidecars),
        "machine_hours": wall_s / 3600,
        "device": _one_or_mixed([s.get("device") for s in sidecars]),
        "gpu_name": _one_or_mixed([s.get("gpu_name") for s in sidecars]),
        "num_gpus": _one_or_mixed([s.get("num_gpus") for s in sidecars]),
        "policy": _one_or_mixed([s.get("policy") for s in sidecars]),
        "model": _one_or_mixed([s.get("model") for s in sidecars]),
        "cost_basis": "measured_gpu_time" if all_cuda else "cpu_machine_time",
    }


def summarize_run(inputs: list[str], batch_size: int = BATCH_ROWS) -> dict:
    """Every figure of one run (one or more output folders), read batch by batch."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    files = [path for uri in inputs for path in find_parquet_files(uri)[1]]
    if not files:
        raise FileNotFoundError(f"no Parquet files under: {', '.join(inputs)}")
    accumulator = RunSummary()
    for batch in iter_batches(inputs, SUMMARY_COLUMNS, batch_size):
        accumulator.update(batch)
    summary = {"inputs": inputs, "files": len(files), **accumulator.finalize()}
    sidecars = [read_sidecar(uri) for uri in inputs]
    summary["throughput"] = summarize_throughput(inputs, sidecars)
    promises = [s.get("promise") for s in sidecars if s]
    summary["verdict"] = run_verdict(summary, promises[0] if promises else None)
    summary["warnings"] = _run_warnings(summary)
    return summary


def _run_warnings(summary: dict) -> list[str]:
    warnings = []
    sidecar_rows = summary["throughput"]["sidecar_rows"]
    if sidecar_rows is not None and sidecar_rows != summary["rows"]:
        warnings.append(f"the sidecar counts {sidecar_rows} rows but the Parquet files hold "
                        f"{summary['rows']}; rows/s and cost use the sidecar's figures")
    if summary["unlabelled_rows"]:
        warnings.append(f"rows with neither a label nor an error: {summary['unlabelled_rows']}")
    if summary["rows"] and summary["exit_rows"] < summary["ok_rows"]:
        warnings.append("rows without error but without a usable exit_layer/num_layers, left out "
                        f"of the exit figures: {summary['ok_rows'] - summary['exit_rows']}")
    if summary["rows"] and summary["flops_rows"] < summary["ok_rows"]:
        warnings.append("rows without error but with unset FLOP columns, left out of the FLOP "
                        f"figures: {summary['ok_rows'] - summary['flops_rows']}")
    return warnings


# --- 3. Money ----------------------------------------------------------------------------------

def is_full_depth(summary: dict) -> bool:
    """Whether a run was made with `--policy full`, according to its sidecar."""
    return summary["throughput"]["policy"] == "full"


def estimate_cost(summary: dict, price_per_gpu_hour=None, gpu: str | None = None,
                  full_depth_run: dict | None = None) -> dict:
    """Device-hours and cost of the run as it was, of the same run at full depth with the same
    prefix handling (early exit's real saving), and the difference; prefix reuse's saving apart.

    `price_per_gpu_hour`: None (the run's own device, see `resolve_price`), a number or a device
    name. Full depth is measured when `full_depth_run` (the summary of a `--policy full` run over
    the same corpus, with a sidecar) is given, and estimated from the model's compute time
    otherwise. Every figure comes with the assumption it rests on, in `assumptions`.
    """
    throughput = summary["throughput"]
    cost = {"price_per_gpu_hour": None, "currency": PRICE_CURRENCY, "gpu": gpu,
            "price_source": None, "cost_basis": throughput["cost_basis"], "unavailable_reason": None,
            "run_gpu_hours": None, "run_cost": None, "full_depth_source": None,
            "full_depth_gpu_hours": None, "full_depth_cost": None, "saved_gpu_hours": None,
            "saved_cost": None, "saved_share": None, "saved_cost_by_exit": None,
            "saved_cost_by_prefix": None, "saved_gpu_hours_by_prefix": None, "assumptions": []}
    if not throughput["available"]:
        cost["unavailable_reason"] = throughput["unavailable_reason"]
        return cost
    price = resolve_price(price_per_gpu_hour, throughput, gpu)
    cost.update(price_per_gpu_hour=price["price"], gpu=price["device"], price_source=price["source"])
    assumptions = [f"Price: {PRICE_CURRENCY} {price['price']:.2f} per hour of {price['device']} ({price['source']})."
                   if price["price"] is not None else f"No price: {price['source']}; hours only."]
    if throughput["cost_basis"] == "measured_gpu_time":
        assumptions.append("Run GPU-hours = wall time x GPUs the job held (from the run sidecar), "
                           "start-up and I/O included.")
    else:
        assumptions.append("Run hours = wall time of the CPU machine (from the run sidecar), start-up and I/O "
                           "included.")
    run_hours = throughput["gpu_seconds"] / 3600
    full_hours, cost["full_depth_source"], note = _full_depth_gpu_hours(summary, full_depth_run)
    cost["run_gpu_hours"] = run_hours
    if full_hours is None:
        cost["unavailable_reason"] = note
    else:
        assumptions.append(note)
        cost["full_depth_gpu_hours"] = full_hours
        cost["saved_gpu_hours"] = full_hours - run_hours
        cost["saved_share"] = _ratio(cost["saved_gpu_hours"], full_hours)
    if cost["full_depth_source"] == "compute_time_x_flops":
        # Prefix reuse's own saving, on the same compute-time basis: not part of early exit's.
        cost["saved_gpu_hours_by_prefix"] = (throughput["engine_device_seconds"] / 3600
                                             * summary["prefix_saved_share"] * summary["flops_full"]
                                             / summary["flops_used"])
    if price["price"] is not None:
        p = price["price"]
        money = {"run_gpu_hours": "run_cost", "full_depth_gpu_hours": "full_depth_cost",
                 "saved_gpu_hours": "saved_cost", "saved_gpu_hours_by_prefix": "saved_cost_by_prefix"}
        for hours, key in money.items():
            cost[key] = None if cost[hours] is None else cost[hours] * p
        cost["saved_cost_by_exit"] = cost["saved_cost"]  # full depth has the run's own prefix handling
    cost["assumptions"] = assumptions
    return cost


def _full_depth_gpu_hours(summary: dict,
                          full_depth_run: dict | None) -> tuple[float | None, str | None, str]:
    """Device-hours of the same run at full depth with the same prefix handling, where the figure
    comes from, and the assumption it rests on (or, when it is None, why it is missing)."""
    if full_depth_run is not None and full_depth_run["throughput"]["available"] \
            and full_depth_run["rows"] and summary["rows"]:
        gpu_seconds_per_row = full_depth_run["throughput"]["gpu_seconds"] / full_depth_run["rows"]
        return (summary["rows"] * gpu_seconds_per_row / 3600, "measured_full_depth_run",
                "Full depth is measured: the --policy full run's device-seconds per row "
                f"({gpu_seconds_per_row:.4g}) times this run's {summary['rows']} rows; this "
                "assumes both runs saw the same kind of text on comparable hardware with the same prefix handling.")
    if not summary["flops_used"]:
        return None, None, "no rows with FLOP figures: full depth cannot be estimated"
    engine = summary["throughput"].get("engine_device_seconds")
    if engine is None:
        return None, None, ("the run sidecar records no model compute time (engine_s), and whole wall time "
                            "(start-up, I/O) does not scale with depth: pass --compare with a --policy full run "
                            "to measure full depth")
    ratio = (summary["flops_full"] * (1 - summary["prefix_saved_share"])) / summary["flops_used"]
    extra = engine * (ratio - 1)
    return ((summary["throughput"]["gpu_seconds"] + extra) / 3600, "compute_time_x_flops",
            f"Full depth is estimated: the run's hours plus its model compute time ({engine:,.1f} device-s, the "
            f"sidecar's engine_s) x (FLOPs at full depth with the same prefix handling / FLOPs used - 1) = "
            f"+{extra:,.1f} s; start-up and I/O are taken as unchanged. A --policy full run passed with "
            "--compare measures it instead.")


# --- 4. Two runs side by side ------------------------------------------------------------------

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
            batch = pa.record_batch([_column(batch, name).cast(schema.field(name).type)
                                     for name in COMPARE_COLUMNS], schema=schema)
            has_id = _is_valid(batch.column(0))
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
    accuracy_run = _proportion(counts["gold_correct_run"], counts["gold_pairs"])
    accuracy_compare = _proportion(counts["gold_correct_compare"], counts["gold_pairs"])
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
        "label_agreement": _proportion(counts["agreeing_pairs"], counts["labelled_pairs"]),
        # Over matched rows where both runs have a label and a gold label exists: same rows for both.
        "gold_accuracy_run": accuracy_run,
        "gold_accuracy_compare": accuracy_compare,
        "gold_accuracy_difference": (None if accuracy_run["share"] is None
                                     else accuracy_run["share"] - accuracy_compare["share"]),
        # Rows/s of --input over rows/s of --compare; > 1 means --input is faster.
        "throughput_ratio": _ratio(run_rate, other_rate),
        "throughput_ratio_reason": (None if run_rate and other_rate
                                    else "rows/s missing for one of the runs (no sidecar?)"),
    }


# --- 5. Output: plots --------------------------------------------------------------------------

def _new_figure(width: float = 7.0, height: float = 4.0):
    # matplotlib is imported here, not at the top: summaries need no plotting library, and the
    # object-oriented Figure API needs no global backend (it renders with Agg in savefig).
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure, figure.subplots()


def plot_exit_depth(summary: dict, path: str) -> None:
    """Bar chart: rows per exit layer, with the mean exit layer marked."""
    figure, axes = _new_figure()
    counts = summary["exit_layer_counts"]
    axes.bar(range(1, len(counts) + 1), counts, color="#4c72b0")
    if summary["mean_exit_layer"] is not None:
        axes.axvline(summary["mean_exit_layer"], color="#c44e52", linestyle="--",
                     label=f"mean exit layer {summary['mean_exit_layer']:.2f}")
        axes.legend()
    axes.set_xlabel(f"exit layer (of {summary['num_layers'] or '?'})")
    axes.set_ylabel("rows")
    axes.set_title("Exit-depth histogram")
    figure.savefig(path)


def plot_savings_by_label(summary: dict, path: str) -> None:
    """Stacked horizontal bars: share of full-depth FLOPs saved per label, by early exit and by
    prefix reuse (the most frequent labels first)."""
    labels = list(summary["savings_by_label"])[:MAX_LABELS_PLOTTED]
    exit_shares = [summary["savings_by_label"][l]["exit_saved_share"] or 0.0 for l in labels]
    prefix_shares = [summary["savings_by_label"][l]["prefix_saved_share"] or 0.0 for l in labels]
    figure, axes = _new_figure(7.0, max(2.5, 0.35 * len(labels) + 1.5))
    positions = np.arange(len(labels))
    axes.barh(positions, exit_shares, color="#4c72b0", label="early exit")
    axes.barh(positions, prefix_shares, left=exit_shares, color="#dd8452", label="prefix reuse")
    axes.set_yticks(positions, labels=[str(l) for l in labels])
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("share of full-depth FLOPs saved")
    axes.set_title("Savings by label" + (f" (top {MAX_LABELS_PLOTTED})"
                                         if len(summary["savings_by_label"]) > len(labels) else ""))
    axes.legend(loc="lower right")
    figure.savefig(path)


def rows_saving_at_least(histogram: list[int]) -> list[float]:
    """From a saved-share histogram: the share of rows that saved at least each bin's lower edge."""
    counts = np.asarray(histogram, dtype=np.float64)
    total = counts.sum()
    if not total:
        return [0.0] * len(counts)
    return (counts[::-1].cumsum()[::-1] / total).tolist()


def plot_cumulative_savings(summary: dict, path: str) -> None:
    """Curves: share of rows that saved at least x of their full-depth compute, for x in [0, 1].

    Reads the fixed-bin histograms of the summary, so it costs nothing extra at 10 million rows.
    """
    histogram = summary["saved_share_histogram"]
    edges = histogram["bin_edges"][:-1]
    figure, axes = _new_figure()
    for name, text, color in (("compute_saved", "total", "#55a868"),
                              ("exit_saved", "early exit", "#4c72b0"),
                              ("prefix_saved", "prefix reuse", "#dd8452")):
        axes.step(edges, rows_saving_at_least(histogram[name]), where="post", label=text, color=color)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("share of the row's full-depth FLOPs saved, at least")
    axes.set_ylabel("share of rows")
    axes.set_title("Cumulative savings")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path)


def write_plots(summary: dict, out_dir: str) -> dict[str, str]:
    """Write the three PNGs into out_dir; return {plot name: file name}."""
    plot_exit_depth(summary, os.path.join(out_dir, PLOT_FILES["exit_depth"]))
    plot_savings_by_label(summary, os.path.join(out_dir, PLOT_FILES["savings_by_label"]))
    plot_cumulative_savings(summary, os.path.join(out_dir, PLOT_FILES["cumulative_savings"]))
    return dict(PLOT_FILES)


# --- 5. Output: text ---------------------------------------------------------------------------

def _n(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:,}" if isinstance(value, (int, float)) else str(value)


def _pct(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _num(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _money(value) -> str:
    return "n/a" if value is None else f"{PRICE_CURRENCY} {value:,.2f}"


def _proportion_text(proportion: dict) -> str:
    if proportion["share"] is None:
        return "n/a (no rows)"
    return (f"{_pct(proportion['share'])} (95% CI {_pct(proportion['ci95_low'])}"
            f" to {_pct(proportion['ci95_high'])}, {_n(proportion['successes'])} of "
            f"{_n(proportion['rows'])} rows)")


@dataclass
class Section:
    """One part of the report, printed the same way in Markdown and HTML."""
    title: str
    paragraphs: list[str] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None
    bullets: list[str] = field(default_factory=list)
    image: str | None = None  # a PNG file name in the output folder


def headline(report: dict) -> str:
    run, cost = report["run"], report["cost"]
    text = (f"{_n(run['rows'])} rows; early exit saved {_pct(run['exit_saved_share_same_prefix'])} of the FLOPs "
            f"of full depth with the same prefix handling (mean exit layer {_num(run['mean_exit_layer'])} of "
            f"{_n(run['num_layers'])}); prefix reuse, on its own line, saved {_pct(run['prefix_saved_share'])} "
            "of the no-reuse FLOPs")
    if cost["saved_gpu_hours"] is not None:
        how = "measured" if cost["full_depth_source"] == "measured_full_depth_run" else "estimated"
        if cost["saved_cost"] is not None:
            text += (f"; cost {_money(cost['run_cost'])} instead of {_money(cost['full_depth_cost'])} at full "
                     f"depth ({how}), {_money(cost['saved_cost'])} ({_pct(cost['saved_share'])}) saved")
        else:
            text += (f"; {_num(cost['run_gpu_hours'], 3)} device-hours instead of "
                     f"{_num(cost['full_depth_gpu_hours'], 3)} at full depth ({how}), {_pct(cost['saved_share'])} saved")
    return text + "."


def report_sections(report: dict) -> list[Section]:
    """The report's layout, once, for both renderers."""
    run, cost, throughput = report["run"], report["cost"], report["run"]["throughput"]
    sections = [Section("Summary", paragraphs=[headline(report)], bullets=[
        f"Inputs: {', '.join(run['inputs'])} ({run['files']} Parquet files)",
        f"Model: {throughput['model'] or 'n/a'}; policy: {throughput['policy'] or 'n/a'}; "
        f"device: {throughput['device'] or 'n/a'}; GPUs: {_n(throughput['num_gpus'])}",
        f"Price: {_money(cost['price_per_gpu_hour'])} per hour of {cost['gpu']} "
        f"({cost['price_source'] or report['price_source']})",
    ])]
    verdict = run.get("verdict") or {}
    if verdict.get("message"):
        sections.append(Section("Promise and audit", paragraphs=[verdict.get("promise") or "", verdict["message"]]))
    sections.append(Section("Rows", table=(["figure", "value"], [
        ["rows", _n(run["rows"])],
        ["error rows", f"{_n(run['error_rows'])} ({_pct(run['error_share'])})"],
        ["labelled rows", _n(run["labelled_rows"])],
        ["rows without error or label", _n(run["unlabelled_rows"])],
        ["truncated rows", _n(run["truncated_rows"])],
        ["mean prompt tokens", _num(run["mean_tokens"], 1)],
        ["wall time", "n/a" if throughput["wall_s"] is None else f"{throughput['wall_s']:,.1f} s"],
        ["rows/s (run sidecar)", _num(throughput["rows_per_s"])],
    ]), paragraphs=[] if throughput["available"] else
        [f"Throughput and cost are not available: {throughput['unavailable_reason']}."]))
    sections.append(Section("Compute saved", table=(["figure", "value"], [
        ["mean exit layer", f"{_num(run['mean_exit_layer'])} of {_n(run['num_layers'])}"],
        ["share of layers skipped (pruning ratio)", _pct(run["layers_skipped_share"])],
        ["early exit: share of FLOPs saved vs full depth with the same prefix handling",
         _pct(run["exit_saved_share_same_prefix"])],
        ["prefix reuse: share of the no-reuse FLOPs saved", _pct(run["prefix_saved_share"])],
        ["both, vs full depth without prefix reuse", _pct(run["flops_saved_share"])],
        ["mean per-row compute saved (unweighted)", _pct(run["mean_compute_saved"])],
        ["FLOPs used / full depth", f"{run['flops_used']:.4g} / {run['flops_full']:.4g}"],
    ]), paragraphs=["FLOP shares are weighted by each row's FLOPs; early exit is measured against full "
                    "depth with the run's own prefix handling (its real saving), prefix reuse against no reuse; "
                    "the pruning ratio is the mean over rows."]))
    sections.append(_cost_section(cost))
    sections.append(Section("Quality", bullets=[
        f"Agreement with the full model on audited rows: {_proportion_text(run['audit_agreement'])}",
        f"Accuracy against gold labels: {_proportion_text(run['gold_accuracy'])}"
        + (f"; {_n(run['gold_accuracy']['rows_without_label'])} rows with a gold label have "
           "no prediction" if run["gold_accuracy"]["rows_without_label"] else ""),
    ], paragraphs=["Intervals are 95% Wilson score intervals."]))
    sections.append(Section("Savings by label", table=(
        ["label", "rows", "share", "mean exit layer", "layers skipped", "FLOPs saved",
         "by early exit", "by prefix reuse"],
        [[str(label), _n(figures["rows"]), _pct(run["label_shares"][label]),
          _num(figures["mean_exit_layer"]), _pct(figures["layers_skipped_share"]),
          _pct(figures["flops_saved_share"]), _pct(figures["exit_saved_share"]),
          _pct(figures["prefix_saved_share"])]
         for label, figures in run["savings_by_label"].items()]),
        image=report["plots"]["savings_by_label"]))
    total_exits = sum(run["exit_layer_counts"]) or 1
    sections.append(Section("Exit depth", table=(["exit layer", "rows", "share"], [
        [str(layer), _n(n), _pct(n / total_exits)]
        for layer, n in enumerate(run["exit_layer_counts"], start=1)]),
        image=report["plots"]["exit_depth"]))
    sections.append(Section("Cumulative savings", image=report["plots"]["cumulative_savings"],
                            paragraphs=["Share of rows (y) that saved at least a given share of "
                                        "their own full-depth FLOPs (x), in 1% bins."]))
    if report.get("compare"):
        sections.append(_compare_section(report))
    if run["warnings"]:
        sections.append(Section("Warnings", bullets=list(run["warnings"])))
    return sections


def _cost_section(cost: dict) -> Section:
    if cost["run_gpu_hours"] is None:
        return Section("Cost", paragraphs=[f"Not available: {cost['unavailable_reason']}."])
    missing = [f"Full depth not available: {cost['unavailable_reason']}."] \
        if cost["unavailable_reason"] else []
    rows = [
        ["run as it was", _num(cost["run_gpu_hours"], 3), _money(cost["run_cost"])],
        [f"same run at full depth, same prefix handling ({cost['full_depth_source'] or 'n/a'})",
         _num(cost["full_depth_gpu_hours"], 3), _money(cost["full_depth_cost"])],
        [f"saved by early exit ({_pct(cost['saved_share'])})", _num(cost["saved_gpu_hours"], 3),
         _money(cost["saved_cost"])],
    ]
    if cost["saved_gpu_hours_by_prefix"] is not None:
        rows.append(["saved by prefix reuse (separately, vs no reuse)", _num(cost["saved_gpu_hours_by_prefix"], 3),
                     _money(cost["saved_cost_by_prefix"])])
    return Section("Cost", table=(["", "device-hours", "cost"], rows),
                   paragraphs=missing + ["Assumptions:"], bullets=list(cost["assumptions"]))


def _compare_section(report: dict) -> Section:
    run, cost = report["run"], report["cost"]
    other, other_cost = report["compare"]["run"], report["compare"]["cost"]
    joined = report["compare"]["joined"]

    def side_by_side(name, figure):
        return [name, figure(run, cost), figure(other, other_cost)]

    table = (["", "--input", "--compare"], [
        side_by_side("inputs", lambda r, c: ", ".join(r["inputs"])),
        side_by_side("policy", lambda r, c: str(r["throughput"]["policy"] or "n/a")),
        side_by_side("rows", lambda r, c: _n(r["rows"])),
        side_by_side("error rows", lambda r, c: _n(r["error_rows"])),
        side_by_side("mean exit layer", lambda r, c: _num(r["mean_exit_layer"])),
        side_by_side("share of FLOPs saved", lambda r, c: _pct(r["flops_saved_share"])),
        side_by_side("rows/s", lambda r, c: _num(r["throughput"]["rows_per_s"])),
        side_by_side("run cost", lambda r, c: _money(c["run_cost"])),
        ["accuracy against gold (joined rows)", _proportion_text(joined["gold_accuracy_run"]),
         _proportion_text(joined["gold_accuracy_compare"])],
    ])
    return Section("Compare", table=table, paragraphs=[
        "The two runs joined by id. Accuracy is over the joined rows where both runs have a "
        "label and a gold label exists, so both columns grade the same rows."], bullets=[
        f"Matched rows: {_n(joined['matched_rows'])}; only in --input: "
        f"{_n(joined['rows_only_in_run'])}; only in --compare: {_n(joined['rows_only_in_compare'])}"
        f"; duplicate ids: {_n(joined['duplicate_ids_run'])} / {_n(joined['duplicate_ids_compare'])}",
        f"Label agreement: {_proportion_text(joined['label_agreement'])}",
        f"Throughput ratio (--input rows/s / --compare rows/s): {_num(joined['throughput_ratio'])}"
        + (f" ({joined['throughput_ratio_reason']})" if joined["throughput_ratio_reason"] else ""),
    ])


def _markdown_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict) -> str:
    lines = ["# Early-exit cost report", "", f"Generated {report['generated_at']}.", ""]
    for section in report_sections(report):
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.bullets:
            lines += [f"- {bullet}" for bullet in section.bullets] + [""]
        if section.table:
            header, rows = section.table
            lines.append("| " + " | ".join(_markdown_cell(h) for h in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        if section.image:
            lines += [f"![{section.title}]({section.image})", ""]
    return "\n".join(lines)


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; }
"""


def render_html(report: dict, out_dir: str) -> str:
    """A self-contained page: the PNGs from out_dir are embedded as base64 data URIs."""
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
             "<title>Early-exit cost report</title>", f"<style>{HTML_STYLE}</style></head><body>",
             "<h1>Early-exit cost report</h1>", f"<p>Generated {e(report['generated_at'])}.</p>"]
    for section in report_sections(report):
        parts.append(f"<h2>{e(section.title)}</h2>")
        parts += [f"<p>{e(paragraph)}</p>" for paragraph in section.paragraphs]
        if section.bullets:
            parts.append("<ul>" + "".join(f"<li>{e(b)}</li>" for b in section.bullets) + "</ul>")
        if section.table:
            header, rows = section.table
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        if section.image:
            with open(os.path.join(out_dir, section.image), "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            parts.append(f"<img alt='{e(section.title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def terminal_summary(report: dict, out_dir: str | None = None) -> str:
    run, cost = report["run"], report["cost"]
    lines = [headline(report),
             f"errors: {_n(run['error_rows'])}; mean exit layer {_num(run['mean_exit_layer'])} of "
             f"{_n(run['num_layers'])}; layers skipped {_pct(run['layers_skipped_share'])}; "
             f"rows/s {_num(run['throughput']['rows_per_s'])}",
             f"audit agreement: {_proportion_text(run['audit_agreement'])}"]
    if cost["run_gpu_hours"] is None:
        lines.append(f"cost: n/a ({cost['unavailable_reason']})")
    elif cost["run_cost"] is None:
        lines.append(f"cost: no price ({cost['price_source']}); run {_num(cost['run_gpu_hours'], 4)} device-hours, "
                     f"full depth {_num(cost['full_depth_gpu_hours'], 4)} "
                     f"({cost['full_depth_source'] or cost['unavailable_reason']})")
    else:
        lines.append(f"cost at {_money(cost['price_per_gpu_hour'])}/hour of {cost['gpu']}: run "
                     f"{_money(cost['run_cost'])}, full depth with the same prefix handling "
                     f"{_money(cost['full_depth_cost'])} ({cost['full_depth_source'] or cost['unavailable_reason']}), "
                     f"saved {_money(cost['saved_cost'])}")
    if report.get("compare"):
        joined = report["compare"]["joined"]
        lines.append(f"compare: label agreement {_proportion_text(joined['label_agreement'])}; "
                     f"throughput ratio {_num(joined['throughput_ratio'])}")
    if out_dir:
        lines.append(f"report: {os.path.join(out_dir, 'report.md')}, report.html, summary.json")
    return "\n".join(lines)


# --- The job's own end-of-run summary ----------------------------------------------------------

def run_verdict(summary: dict, promise: dict | None) -> dict:
    """What this run's audit says about the policy's promise, in words a manager can act on.

    The audit is a seeded uniform sample run on to full depth. Its disagreements give a one-sided
    95% upper bound (exact binomial) on the share of labels early exit changed in this corpus;
    when that bound is above the promised epsilon, the run says so and how to fix it."""
    audited = summary["audit_agreement"]["rows"]
    disagreed = audited - summary["audit_agreement"]["successes"]
    bound = summary.get("audit_disagreement_bound95")
    out = {"audited_rows": audited, "disagreements": disagreed,
           "observed": _ratio(disagreed, audited), "bound95": bound, "epsilon": None, "ok": None, "message": None}
    if not promise:
        return out
    eps = promise["epsilon"]
    out["epsilon"] = eps
    skipped = promise.get("layers_skipped")
    out["promise"] = (f"Early exit skips about {_pct(skipped)} of the model's layers, and with "
                      f"{_pct(1 - promise['delta'], 0)} confidence it changes at most {_pct(eps)} of the labels "
                      f"that the full model would give (calibrated on {_n(promise['calibration_size'])} rows).")
    if not audited:
        out["message"] = "No row was audited, so this run cannot check the promise (see --audit-rows)"
    elif bound <= eps:
        out["ok"] = True
        out["message"] = (f"Promise confirmed by the audit: {_n(disagreed)} of {_n(audited)} audited labels "
                          f"changed, at most {_pct(bound)} at 95% confidence")
    elif lower_bound(disagreed, audited) > eps:
        out["ok"] = False
        out["message"] = (f"WARNING: early exit changed {_n(disagreed)} of {_n(audited)} audited labels "
                          f"({_pct(out['observed'])}; at least {_pct(lower_bound(disagreed, audited))} at 95% "
                          f"confidence), more than the promised {_pct(eps)}: this corpus differs from the "
                          "calibration data. Recalibrate on it with --calibrate N (e.g. 2000), or use --policy full")
    else:
        out["ok"] = False
        out["message"] = (f"The audit cannot confirm the promise on this corpus: {_n(disagreed)} of {_n(audited)} "
                          f"audited labels changed ({_pct(out['observed'])}), which allows up to {_pct(bound)} at 95% "
                          f"confidence (above {_pct(eps)}). To be sure, recalibrate on this corpus with "
                          f"--calibrate N, or audit more rows (--audit-rows; at least {_n(rows_to_confirm(eps))} "
                          "even with no change)")
    return out


def job_summary(record: dict) -> str:
    """The end-of-run summary `jobs/classify.py` prints, from its run record (`_run.json`)."""
    s, verdict = record["summary"], record.get("verdict") or {}
    lines = ["", "== adainfer-ray: done ==",
             f"rows {_n(s['rows'])} ({_n(record['resumed_rows'])} from an earlier run), errors {_n(s['error_rows'])}, "
             f"truncated {_n(s['truncated_rows'])}"]
    if s["mean_exit_layer"] is not None:
        lines.append(f"mean exit layer {_num(s['mean_exit_layer'], 1)}/{record['num_layers']}, layers skipped "
                     f"{_pct(s['layers_skipped_share'])}; FLOPs saved by early exit {_pct(s['exit_saved_share_same_prefix'])} "
                     f"of a full-depth run with the same prefix reuse")
    if s["calibration_rows"]:
        outside = s["outside_sample"]
        lines.append(f"calibration sample: {_n(s['calibration_rows'])} rows, labeled at full depth "
                     f"(policy in {record['policy']}); the other {_n(outside['rows'])} rows skipped "
                     f"{_pct(outside['layers_skipped_share'])} of layers")
    if verdict.get("promise"):
        lines.append("promise: " + verdict["promise"])
    elif record.get("policy_features") != "none":
        lines.append("policy: no calibrated promise recorded with it")
    if verdict.get("audited_rows"):
        lines.append(f"audit: {_proportion_text(s['audit_agreement'])} agree with full depth")
    if verdict.get("message"):
        lines.append(verdict["message"])
    gold = s["outside_sample"]["gold_accuracy"] if s["calibration_rows"] else s["gold_accuracy"]
    if gold["rows"]:
        where = " outside the calibration sample" if s["calibration_rows"] else ""
        line = f"accuracy on {_n(gold['rows'])} rows with gold labels{where}: {_pct(gold['share'])}"
        if s["full_depth_gold_accuracy"]["rows"]:
            line += (f" (full depth on the {_n(s['full_depth_gold_accuracy']['rows'])} audited ones: "
                     f"{_pct(s['full_depth_gold_accuracy']['share'])})")
        lines.append(line)
    if record.get("rows_per_s") is not None:
        lines.append(f"{_num(record['rows_per_s'], 1)} rows/s over {_num(record['wall_s'], 1)} s on "
                     f"{record['device']} ({record.get('dtype')})"
                     + (f"; first labeled batch {_num(record['first_labels_s'], 1)} s after the start"
                        if record.get("first_labels_s") is not None else ""))
    lines.append(f"output: {record['output']} (Parquet files + {SIDECAR_NAME})")
    return "\n".join(lines)


# --- Everything --------------------------------------------------------------------------------

def build_report(inputs: list[str], price_per_gpu_hour=None,
                 gpu: str | None = None, compare: list[str] | None = None,
                 rows_per_bucket: int = ROWS_PER_BUCKET) -> dict:
    """All figures, as written to summary.json (without the plot file names)."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    compare = [compare] if isinstance(compare, str) else compare
    run = summarize_run(inputs)
    other = summarize_run(compare) if compare else None
    full_depth_run = other if other is not None and is_full_depth(other) else None
    price_source = "the run's own device" if price_per_gpu_hour is None else "given on the command line"
    report = {
        "report_version": REPORT_VERSION,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "price_source": price_source,
        "run": run,
        "cost": estimate_cost(run, price_per_gpu_hour, gpu, full_depth_run),
        "compare": None,
    }
    if other is not None:
        report["compare"] = {
            "run": other,
            "cost": estimate_cost(other, price_per_gpu_hour, gpu),
            "joined": compare_runs(inputs, compare, run, other, rows_per_bucket),
        }
    return report


def write_report(inputs: list[str], out_dir: str,
                 price_per_gpu_hour=None, gpu: str | None = None,
                 compare: list[str] | None = None, rows_per_bucket: int = ROWS_PER_BUCKET) -> dict:
    """Write report.md, report.html, the PNGs and summary.json into out_dir (a local folder)."""
    report = build_report(inputs, price_per_gpu_hour, gpu, compare, rows_per_bucket)
    os.makedirs(out_dir, exist_ok=True)
    report["plots"] = write_plots(report["run"], out_dir)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render_markdown(report))
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(render_html(report, out_dir))
    return report
