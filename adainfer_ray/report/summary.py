"""The numbers of one run, read in bounded memory: `summarize_run` and what it is made of.

`RunSummary` takes one pyarrow RecordBatch at a time and keeps only running totals (sums, counters
keyed by label, fixed-size histograms), so a 10-million-row output costs the same memory as a
10-row one, plus one row group in flight. `summarize_throughput` reads wall time, rows/s and billed
device time from the run sidecar(s). `summarize_run` wires both together, with the audit verdict.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adainfer_ray.report.health import label_health
from adainfer_ray.report.outputs import (BATCH_ROWS, column, find_parquet_files, is_valid, iter_batches,
                                         numbers, read_sidecar)
from adainfer_ray.report.verdict import run_verdict
from adainfer_ray.schema import OUTPUT_SCHEMA, SIDECAR_NAME
from adainfer_ray.stats import proportion, ratio, upper_bound

SAVED_SHARE_BINS = 100     # fixed bins over [0, 1] for the per-row saved-share histograms

# The columns a summary reads: everything but `id` and `label_probs`, the widest columns, not needed.
SUMMARY_COLUMNS = [name for name in OUTPUT_SCHEMA.names if name not in ("id", "label_probs")]

FLOP_COLUMNS = ["flops_used", "flops_full", "compute_saved", "exit_saved", "prefix_saved"]


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
        self.rows = self.error_rows = self.truncated_rows = 0
        self.token_rows, self.tokens, self.num_layers = 0, 0.0, 0
        self.by_label: dict[str | None, Counter] = {}
        # exit_layer_counts[k] = rows that stopped after layer k; index 0 stays 0.
        self.exit_layer_counts = np.zeros(1, dtype=np.int64)
        self.saved_histograms = {name: np.zeros(SAVED_SHARE_BINS, dtype=np.int64)
                                 for name in ("compute_saved", "exit_saved", "prefix_saved")}
        self.audit_rows = self.audit_agreeing = self.calibration_rows = 0
        # Rows labeled by the policy (outside the --calibrate sample): what the promise is about.
        self.policy_rows, self.policy_layers_skipped = 0, 0.0
        self.policy_gold_rows = self.policy_gold_correct = 0
        self.full_gold_rows = self.full_gold_correct = 0  # audited rows with a gold label: accuracy at full depth
        # ... and on those rows, where exit and full depth differ in being right: the accuracy promise's losses
        self.audit_gold_exit_only_wrong = self.audit_gold_full_only_wrong = 0
        self.gold_rows = self.gold_correct = self.gold_rows_without_label = 0
        # Label health (report.health): full-depth labels on the audit sample, and gold labels, by name.
        self.full_depth_label_counts, self.gold_label_counts = Counter(), Counter()

    def update(self, batch: pa.RecordBatch) -> "RunSummary":
        ok = ~is_valid(column(batch, "error"))
        self.rows += batch.num_rows
        self.error_rows += int((~ok).sum())
        self._count_tokens(batch, ok)
        has_exit = self._count_exit_layers(batch, ok)
        has_flops = self._count_saved_shares(batch, ok)
        self._add_label_sums(batch, ok, has_exit, has_flops)
        self._count_agreement(batch, ok)
        return self

    def _count_tokens(self, batch: pa.RecordBatch, ok: np.ndarray) -> None:
        self.truncated_rows += int(column(batch, "truncated").fill_null(False)
                                   .to_numpy(zero_copy_only=False).sum())
        tokens = numbers(batch, "num_tokens")
        has_tokens = ok & ~np.isnan(tokens)
        self.token_rows += int(has_tokens.sum())
        self.tokens += float(tokens[has_tokens].sum())

    def _count_exit_layers(self, batch: pa.RecordBatch, ok: np.ndarray) -> np.ndarray:
        """Update the exit-depth histogram; return the mask of rows with a usable exit layer."""
        exit_layer = numbers(batch, "exit_layer")
        num_layers = numbers(batch, "num_layers")
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
        values = {name: numbers(batch, name) for name in FLOP_COLUMNS}
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
        exit_layer = numbers(batch, "exit_layer")
        num_layers = numbers(batch, "num_layers")
        flops_full = numbers(batch, "flops_full")

        def where(mask, values):
            return np.where(mask, values, 0.0)

        with np.errstate(invalid="ignore", divide="ignore"):
            per_row = {
                "rows": ok.astype(np.float64),
                "exit_rows": has_exit.astype(np.float64),
                "exit_layer": where(has_exit, exit_layer),
                "layers_skipped": where(has_exit, (num_layers - exit_layer) / num_layers),
                "flops_rows": has_flops.astype(np.float64),
                "flops_used": where(has_flops, numbers(batch, "flops_used")),
                "flops_full": where(has_flops, flops_full),
                "exit_saved_flops": where(has_flops, numbers(batch, "exit_saved") * flops_full),
                "prefix_saved_flops": where(has_flops, numbers(batch, "prefix_saved") * flops_full),
                "compute_saved": where(has_flops, numbers(batch, "compute_saved")),
            }
        table = pa.table({"label": column(batch, "label"), **per_row}).filter(pa.array(ok))
        grouped = table.group_by("label").aggregate([(name, "sum") for name in LABEL_SUMS])
        for row in grouped.to_pylist():
            sums = self.by_label.setdefault(row["label"], Counter())
            for name in LABEL_SUMS:
                sums[name] += row[f"{name}_sum"]

    def _count_agreement(self, batch: pa.RecordBatch, ok: np.ndarray) -> None:
        label = column(batch, "label")
        has_label = ok & is_valid(label)
        # The --calibrate sample ran at full depth: it agrees with itself and measures nothing.
        sample = (column(batch, "calibration").fill_null(False).to_numpy(zero_copy_only=False)
                  if "calibration" in batch.schema.names else np.zeros(batch.num_rows, bool))
        self.calibration_rows += int(sample.sum())
        policy_rows = has_label & ~sample
        self.policy_rows += int(policy_rows.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            skipped = 1 - numbers(batch, "exit_layer") / numbers(batch, "num_layers")
        self.policy_layers_skipped += float(np.nansum(np.where(policy_rows, skipped, 0.0)))
        compared, same = _matches(label, column(batch, "gold_label"), policy_rows)
        self.policy_gold_rows += compared
        self.policy_gold_correct += same
        full = column(batch, "full_label")
        # Rows labeled after the online audit stopped early exit (--on-drift full) ran at full depth
        # too: like the sample, they would only dilute what the audit measures of the policy.
        after_drift = column(batch, "after_drift").fill_null(False).to_numpy(zero_copy_only=False)
        early = has_label & ~sample & ~after_drift
        compared, same = _matches(label, full, early)
        self.audit_rows += compared
        self.audit_agreeing += same
        gold = column(batch, "gold_label")
        compared, same = _matches(full, gold, early & is_valid(full))
        _count_values(self.full_depth_label_counts, full, has_label & ~sample & is_valid(full))
        _count_values(self.gold_label_counts, gold, is_valid(gold))
        self.full_gold_rows += compared
        self.full_gold_correct += same
        self._count_paired_gold(label, full, gold, early & is_valid(full) & is_valid(gold))
        compared, same = _matches(label, gold, has_label)
        self.gold_rows += compared
        self.gold_correct += same
        self.gold_rows_without_label += int((~has_label & is_valid(gold)).sum())

    def _count_paired_gold(self, label, full, gold, audited_gold: np.ndarray) -> None:
        """Audited rows with gold: early exit wrong where full depth is right (loss +1), and the reverse (-1)."""
        exit_right = pc.equal(label, gold).fill_null(False).to_numpy(zero_copy_only=False)
        full_right = pc.equal(full, gold).fill_null(False).to_numpy(zero_copy_only=False)
        self.audit_gold_exit_only_wrong += int((audited_gold & ~exit_right & full_right).sum())
        self.audit_gold_full_only_wrong += int((audited_gold & exit_right & ~full_right).sum())

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
            "error_share": ratio(self.error_rows, self.rows),
            "labelled_rows": labelled_rows,
            "unlabelled_rows": ok_rows - labelled_rows,
            "truncated_rows": self.truncated_rows,
            "mean_tokens": ratio(self.tokens, self.token_rows),
            "label_counts": label_counts,
            "label_shares": {label: ratio(n, labelled_rows) for label, n in label_counts.items()},
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
            "audit_agreement": proportion(self.audit_agreeing, self.audit_rows),
            "audit_disagreement_bound95": upper_bound(self.audit_rows - self.audit_agreeing, self.audit_rows),
            "calibration_rows": self.calibration_rows,
            "outside_sample": {"rows": self.policy_rows,
                               "layers_skipped_share": ratio(self.policy_layers_skipped, self.policy_rows),
                               "gold_accuracy": proportion(self.policy_gold_correct, self.policy_gold_rows)},
            "full_depth_gold_accuracy": proportion(self.full_gold_correct, self.full_gold_rows),
            "full_depth_label_counts": dict(self.full_depth_label_counts.most_common()),
            "gold_label_counts": dict(self.gold_label_counts.most_common()),
            "audit_gold": {"rows": self.full_gold_rows, "exit_only_wrong": self.audit_gold_exit_only_wrong,
                           "full_only_wrong": self.audit_gold_full_only_wrong},
            "gold_accuracy": {**proportion(self.gold_correct, self.gold_rows),
                              "rows_without_label": self.gold_rows_without_label},
        }

    def _exit_layer_counts_list(self) -> list[int]:
        """Counts for layers 1..num_layers (longer if some row exited past its num_layers)."""
        size = max(self.num_layers, len(self.exit_layer_counts) - 1)
        counts = np.zeros(size + 1, dtype=np.int64)
        counts[:len(self.exit_layer_counts)] = self.exit_layer_counts
        return counts[1:].tolist()


def _count_values(counter: Counter, values: pa.Array, where: np.ndarray) -> None:
    """Add how often each value of `values` occurs among the rows `where` ([n] bools)."""
    for item in pc.value_counts(values.filter(pa.array(where))).to_pylist():
        counter[item["values"]] += item["counts"]


def _matches(label: pa.Array, reference: pa.Array, has_label: np.ndarray) -> tuple[int, int]:
    """(rows with both a label and a reference, rows among them where the two are equal)."""
    compared = has_label & is_valid(reference)
    equal = pc.equal(label, reference).fill_null(False).to_numpy(zero_copy_only=False)
    return int(compared.sum()), int((compared & equal).sum())


def _exit_figures(sums: Counter) -> dict:
    return {
        "exit_rows": int(sums["exit_rows"]),
        "mean_exit_layer": ratio(sums["exit_layer"], sums["exit_rows"]),
        # The AdaInfer paper's pruning ratio: the mean share of layers a row did not run.
        "layers_skipped_share": ratio(sums["layers_skipped"], sums["exit_rows"]),
    }


def _flop_figures(sums: Counter) -> dict:
    flops_full = sums["flops_full"]
    return {
        "flops_rows": int(sums["flops_rows"]),
        "flops_used": float(sums["flops_used"]),
        "flops_full": float(flops_full),
        "flops_saved_share": None if not flops_full else 1.0 - sums["flops_used"] / flops_full,
        "exit_saved_share": ratio(sums["exit_saved_flops"], flops_full),
        # Early exit's own saving: against full depth with the same prefix handling as the run.
        "exit_saved_share_same_prefix": ratio(sums["exit_saved_flops"], flops_full - sums["prefix_saved_flops"]),
        "prefix_saved_share": ratio(sums["prefix_saved_flops"], flops_full),
        "mean_compute_saved": ratio(sums["compute_saved"], sums["flops_rows"]),
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
        "rows_per_s": ratio(sum(int(r.get("rows_this_run") or 0) for r in runs), wall_s),
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
    summary["drift"] = next((s["drift"] for s in sidecars if s and s.get("drift")), None)  # the run acted on its audit
    labels = [s.get("labels") for s in sidecars if s and s.get("labels")]
    summary["label_health"] = label_health(summary, labels[0] if labels else None)
    summary["warnings"] = _run_warnings(summary)  # the label health's own warnings stay in label_health
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


def is_full_depth(summary: dict) -> bool:
    """Whether a run was made with `--policy full`, according to its sidecar."""
    return summary["throughput"]["policy"] == "full"

