"""Calibration inside the job: draw a seeded uniform sample of the input, trace it at full depth
through the job's own actors (every layer's exit features), fit and test exit rules on the driver
(adainfer_ray.calibrate: Learn-then-Test), and write the policy and its report."""

from __future__ import annotations

import posixpath
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from adainfer_ray import io, resume
from adainfer_ray.job.actor import trace_features
from adainfer_ray.job.cluster import Resources, map_classifier
from adainfer_ray.job.config import JobConfig, JobError
from adainfer_ray.job.dataset import read_dataset
from adainfer_ray.job.plan import Plan, calibration_prior, checked_policy, run_precision
from adainfer_ray.job.progress import ProgressReporter
from adainfer_ray.job.sampling import calibration_keys
from adainfer_ray.job.trace_file import SavedTrace, load_trace, save_trace
from adainfer_ray.schema import OUTPUT_SCHEMA

POLICY_SUBDIR = resume.POLICY_SUBDIR  # where --calibrate writes its policy, inside --output
SAMPLE_FILE = "calibration-sample.parquet"  # the calibration sample's output rows, inside --output


@dataclass
class Calibration:
    policy: object  # policy.ExitPolicy, saved in `folder`
    folder: str
    result: object | None  # calibrate.CalibrationResult (None when an earlier run's policy was reused)
    sample: pa.Table | None  # the sample's output rows (full-depth labels, calibration = True)
    rows_seen: int  # rows of the input (after --limit), counted while drawing the sample


def _calibration_keys(batch, seed: int):
    return {"key": calibration_keys(batch["id"], seed)}


def _in_sample(batch, seed: int, cutoff: float):
    keep = calibration_keys(batch["id"], seed) <= cutoff
    return {k: v[keep] for k, v in batch.items()}


def draw_sample_cutoff(ds, size: int, seed: int) -> tuple[float, int]:
    """The key of the size-th smallest row: rows with key <= cutoff are a uniform random sample of
    `size` rows (all rows when there are fewer), drawn in one streaming pass that keeps `size` keys."""
    smallest, seen = np.zeros(0), 0
    keys = ds.select_columns(["id"]).map_batches(_calibration_keys, fn_kwargs={"seed": seed}, batch_format="numpy")
    for batch in keys.iter_batches(batch_format="numpy", batch_size=None):
        seen += len(batch["key"])
        smallest = np.concatenate([smallest, batch["key"]])
        if len(smallest) > size:
            smallest = np.partition(smallest, size - 1)[:size]
    return (float(smallest.max()) if len(smallest) else -1.0), seen


def calibrate_policy(cfg: JobConfig, plan: Plan, ray, res: Resources, folder: str, size: int, log=print,
                     command: str = "", run_state=None) -> Calibration:
    """Draw a seeded uniform sample of `size` input rows, trace it at full depth through the job's
    own actors, calibrate on the driver (Learn-then-Test) and write the policy and its report to
    `folder` (local or fsspec), with the sample's trace (trace.safetensors: refit_policy reads it).
    Used by `classify --calibrate N` and by jobs/calibrate.py."""
    started = time.perf_counter()
    ds = read_dataset(cfg, plan, ray)
    cutoff, seen = draw_sample_cutoff(ds, size, cfg.seed)
    log(f"calibration: tracing a seeded random sample of {min(size, seen)} of {seen} rows at full depth "
        "(every layer's exit features)...")
    sample = ds.map_batches(_in_sample, fn_kwargs={"seed": cfg.seed, "cutoff": cutoff}, batch_format="numpy")
    traced = map_classifier(sample, cfg, plan.task, plan.policy, res, trace=True, run_state=run_state,
                            gold_one_based=plan.gold_one_based, keep_columns=("group",))
    with ProgressReporter(run_state, min(size, seen), True, cfg.progress_s, log):  # the trace is the long part
        sample_rows, trace, gold, groups = _collect_traces(traced, plan)
    log(f"calibration: traced {len(gold)} rows in {time.perf_counter() - started:.0f} s; "
        "fitting and testing exit rules...")
    saved = SavedTrace(trace, gold, groups if cfg.group_column else None, plan.dims, plan.prefix_tokens,
                       len(plan.task.labels), _provenance(cfg, plan, ray, res, seen, command, run_state))
    save_trace(folder, saved)  # first: a fit that fails can be redone from it (refit_policy)
    result = _fit(saved, cfg.epsilon, cfg.delta, cfg.promise, cfg.seed, plan.prior, log, cfg.fit_fraction)
    _write_policy(result, folder)
    log(f"calibration: policy, report and the sample's trace written to {folder}")
    return Calibration(result.policy, folder, result, sample_rows, seen)


def refit_policy(trace_folder: str, folder: str, epsilon: float, delta: float, promise: str, seed: int = 0,
                 command: str = "", log=print, prior: str = "default", fit_fraction: float = JobConfig.fit_fraction):
    """jobs/calibrate.py --refit: fit and test a policy again from the trace an earlier calibration
    wrote in `trace_folder`, with another epsilon/delta/promise, into `folder` (no model, no Ray).
    Returns the calibrate.CalibrationResult."""
    saved = load_trace(trace_folder)
    if promise == "accuracy" and not (saved.gold >= 0).any():
        raise JobError(f"--promise accuracy needs gold labels, and the trace in {trace_folder} has none: "
                       "calibrate again with --label-column, or use --promise agreement")
    saved.provenance.update(refit_from=trace_folder, created_by=command or saved.provenance.get("created_by"),
                            prior=prior)
    result = _fit(saved, epsilon, delta, promise, seed, calibration_prior(prior, saved.provenance, promise, log), log,
                  fit_fraction)
    _write_policy(result, folder)
    log(f"refit: policy and report written to {folder}")
    return result


def _fit(saved: SavedTrace, epsilon: float, delta: float, promise: str, seed: int, prior, log,
         fit_fraction: float):
    """The one fit (calibrate.calibrate) of a traced sample, for a fresh calibration and a refit alike.
    prior: job.plan.calibration_prior's policy, or None."""
    from adainfer_ray import calibrate as cal

    gold = saved.gold if (saved.gold >= 0).any() else None
    return cal.calibrate(saved.trace, saved.dims, saved.prefix_tokens, saved.num_labels, epsilon=epsilon,
                         delta=delta, seed=seed, gold=gold, groups=saved.groups, promise=promise,
                         fit_fraction=fit_fraction, provenance=saved.provenance, log=lambda m: log("  " + m),
                         prior=prior)


def _collect_traces(traced, plan: Plan):
    """The traced sample back on the driver: (its output rows, trace {key: [n, L] / [n, L, D] / [n]},
    gold [n] label indices (-1: none), groups [n])."""
    keys = trace_features(_trace_modes()) + ("item_tokens",)  # the columns the tracing actors emit
    outputs, parts = [], []
    for batch in traced.iter_batches(batch_format="pyarrow", batch_size=None):
        outputs.append(batch.select(OUTPUT_SCHEMA.names))
        keep = batch.column("trace_item_tokens").is_valid().to_numpy(zero_copy_only=False)
        parts.append({"gold": np.array(batch.column("gold_label").to_pylist(), dtype=object)[keep],
                      "group": np.array(batch.column("group").to_pylist(), dtype=object)[keep],
                      **{k: _trace_column(batch.column("trace_" + k).filter(pa.array(keep)), plan.num_layers)
                         for k in keys}})
    sample_rows = pa.concat_tables(outputs) if outputs else OUTPUT_SCHEMA.empty_table()
    trace = {k: np.concatenate([p[k] for p in parts]) for k in keys} if parts else {}
    if not trace or not len(trace["item_tokens"]):
        raise JobError("the calibration sample holds no row that could be labeled: check --input and --text-column")
    for key in {"vocab_label", "label_label", "item_tokens"} & set(trace):
        trace[key] = trace[key].astype(np.int64)
    trace["final_label"] = trace["label_label"][:, -1]
    labels = {name: i for i, name in enumerate(plan.task.labels)}
    gold = np.array([labels.get(g, -1) for p in parts for g in p["gold"]])
    return sample_rows, trace, gold, np.concatenate([p["group"] for p in parts])


def _trace_modes():
    from adainfer_ray.calibrate import trace_modes

    return trace_modes()


def _provenance(cfg: JobConfig, plan: Plan, ray, res: Resources, seen: int, command: str, run_state) -> dict:
    """What the policy records about how it was made (policy.json metadata)."""
    import adainfer_ray

    return {
        "model_id": plan.model_id, "model_hash": plan.model_hash, "num_layers": plan.num_layers,
        "task": plan.task.name, "task_fingerprint": plan.task.fingerprint(), "template": plan.task.template,
        "labels": list(plan.task.labels), "verbalizers": list(plan.task.verbalizers),
        "dtype": run_precision(res.device_kind, cfg.dtype), "device": res.device_kind,
        "input": cfg.input, "sample_seed": cfg.seed, "rows_in_input": seen, "group_column": cfg.group_column,
        "prior": cfg.prior,
        "actor_nodes": ray.get(run_state.actor_nodes.remote()) if run_state is not None else None,
        "created_by": command or "adainfer_ray.job.calibration.calibrate_policy",
        "adainfer_ray_version": adainfer_ray.__version__,
    }


def _write_policy(result, folder: str) -> None:
    """The policy (JSON + safetensors) and its calibration report, in `folder` (local or fsspec)."""
    from adainfer_ray.calibration_report import write_report

    result.policy.save(folder)
    with tempfile.TemporaryDirectory() as tmp:  # the report is local files; copy them next to the policy
        write_report(result, tmp)
        fs, root = io.output_fs(folder)
        fs.put(tmp + "/", posixpath.join(root, "report") + "/", recursive=True)


def _trace_column(column, num_layers: int) -> np.ndarray:
    """A trace column (one list per row, all of one length) back to numpy: [n, L] per-layer values,
    [n, L, D + K] probe inputs (hidden), [n] item token counts."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = column.flatten().to_numpy(zero_copy_only=False)
    n = len(column)
    if n == 0 or len(values) == n:  # one value per row
        return values
    per_layer = values.reshape(n, num_layers, -1)
    return per_layer[..., 0] if per_layer.shape[-1] == 1 else per_layer


def calibrate_or_reuse(cfg: JobConfig, plan: Plan, ray, res: Resources, previous: dict | None, state,
                       log) -> Calibration:
    """--calibrate: reuse the policy an earlier run of this output calibrated, or make it now and
    write the sample's rows (labeled at full depth while tracing: no extra cost)."""
    fs, root = io.output_fs(cfg.output)
    folder = cfg.output.rstrip("/") + "/" + POLICY_SUBDIR
    calibrated = fs.exists(posixpath.join(root, POLICY_SUBDIR, "policy.json"))
    if previous is not None and not calibrated:
        raise resume.ResumeError(f"--output {cfg.output} holds labels made without --calibrate: pick another "
                                 "--output, or pass --overwrite to replace them")
    if calibrated:
        policy = checked_policy(folder, plan.task, plan.model_id, plan.model_hash, plan.num_layers)
        log(f"resuming: reusing the policy calibrated by the earlier run in {folder}")
        return Calibration(policy, folder, None, None, int(policy.metadata.get("rows_in_input") or 0) or None)
    calibration = calibrate_policy(cfg, plan, ray, res, folder, cfg.calibrate, log, run_state=state)
    io.write_parquet(cfg.output, SAMPLE_FILE, calibration.sample)
    return calibration
