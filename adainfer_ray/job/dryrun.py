"""`--plan`: what a run will cost, before it runs. Nothing is written and no Ray starts.

It runs the job's own preflight (the same one-line errors, exit 2), counts the input's rows (Parquet
footers where it can, a streaming count otherwise), draws a seeded sample of rows while counting,
and labels that sample in this process with the job's own model actor class (actor.Classifier:
reader rows in, output rows out: the encoder, the engine and the policy of a real run), once with
the policy and once at full depth. From the sample it reports the prompt as the model sees it,
token counts, the share truncated, the layers the policy skips, and rows/s on this machine; from
those, device-hours and cost for the whole corpus, with the calibration sample and the audit
included, each figure with how it was estimated.
"""

from __future__ import annotations

import heapq
import os
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa

from adainfer_ray import io
from adainfer_ray.job.config import JobConfig
from adainfer_ray.job.sampling import corpus_audit_rate, uniform_keys

ASSUMED_UTILIZATION = 0.3  # share of a named device's peak FLOP/s a run is assumed to reach (stated in the plan)


def count_and_sample(cfg: JobConfig, plan, size: int) -> tuple[int, str, pa.Table]:
    """(rows in the input after --limit, how they were counted, the seeded sample: the `size` rows
    with the smallest keys fixed by (seed, id), read in one streaming pass)."""
    from adainfer_ray.job.dataset import read_file

    tables = plan.embedded_rows if plan.embedded_rows is not None else (
        t for path, root in zip(plan.files, plan.roots) for t in read_file(path, root, plan.format, cfg, plan.has_id_column))
    kept, seen = [], 0  # kept: a max-heap (negated keys) of the `size` smallest keys so far
    for table in tables:
        if cfg.limit is not None:
            table = table.slice(0, max(0, cfg.limit - seen))
        rows = table.to_pylist()
        for key, row in zip(uniform_keys([r["id"] for r in rows], f"plan:{cfg.seed}"), rows):
            if len(kept) < size:
                heapq.heappush(kept, (-key, row["id"], row))
            elif -kept[0][0] > key:
                heapq.heapreplace(kept, (-key, row["id"], row))
        seen += len(rows)
        if cfg.limit is not None and seen >= cfg.limit:
            break
    if plan.format == "parquet" and plan.embedded_rows is None:
        footer_rows = io.estimate_rows(plan.files, "parquet")
        rows, how = (min(footer_rows, cfg.limit) if cfg.limit is not None else footer_rows), "Parquet footers (exact)"
    else:
        rows, how = seen, "a streaming count of every row (exact)"
    sample = [row for _, _, row in sorted(kept, key=lambda k: -k[0])]
    return rows, how, pa.Table.from_pylist(sample, schema=io.INPUT_SCHEMA)


def _batch(table: pa.Table) -> dict[str, np.ndarray]:
    """Reader rows as the numpy batch a model actor receives."""
    return {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}


def timed_labels(clf, table: pa.Table) -> tuple[pa.Table, float]:
    """The output rows of `table` through one model actor, and the seconds it took (after a warm-up)."""
    clf(_batch(table.slice(0, min(8, table.num_rows))))  # first-call costs (prefix cache, kernels) are not per-row
    started = time.perf_counter()
    out = clf(_batch(table))
    return out, time.perf_counter() - started


def plan_run(cfg: JobConfig, sample_size: int = 128, price=None, log=print) -> dict:
    """Every figure of the plan, as a dict; `plan_text` prints it."""
    from adainfer_ray.job.actor import Classifier
    from adainfer_ray.job.cluster import threads_per_actor
    from adainfer_ray.job.plan import plan_labeling, preflight
    from adainfer_ray.policy import ExitPolicy, PolicyError
    from adainfer_ray.report.prices import DEVICE_PEAK_TFLOPS, resolve_price

    plan = preflight(cfg, log)
    policy, policy_note = plan.policy, f"--policy {cfg.policy}"
    if cfg.calibrate:  # the real policy is made on the run: the shipped one stands in where there is one
        try:
            policy, policy_note = plan_labeling(replace(cfg, calibrate=0), "default").policy, \
                "--calibrate makes the policy on the run; the shipped default policy stands in here"
        except PolicyError:
            policy_note = "--calibrate makes the policy on the run, and no shipped policy stands in: full depth shown"
    rows, count_how, sample = count_and_sample(cfg, plan, sample_size)
    threads = threads_per_actor(os.cpu_count() or 1, 1)
    out = {"rows": rows, "rows_counted_by": count_how, "sample_rows": sample.num_rows, "policy_note": policy_note,
           "promise": policy.promise, "labels": list(plan.task.labels), "num_layers": plan.num_layers}
    if not sample.num_rows:
        return out
    early = Classifier(cfg, plan.task, policy, threads=threads, audit_rate=0.0)
    full = Classifier(cfg, plan.task, ExitPolicy.full_depth(), threads=threads, audit_rate=0.0)
    ok = np.array([e is None for e in sample.column("input_error").to_pylist()])
    early_rows, early_s = timed_labels(early, sample)
    full_rows, full_s = timed_labels(full, sample)
    encoded = early.encoder.encode([sample.column("text")[int(np.argmax(ok))].as_py()])
    out["prompt"] = early.lm.tokenizer.decode(encoded.prefix_ids + encoded.item_ids[0])
    out.update(_sample_figures(early_rows, full_rows, early_s, full_s, plan.num_layers))
    out.update(_corpus_figures(out, cfg, rows, policy))
    out["device"] = early.lm.device.type
    out["price"] = _priced(out, price, resolve_price, DEVICE_PEAK_TFLOPS)
    return out


def _sample_figures(early_rows: pa.Table, full_rows: pa.Table, early_s: float, full_s: float, num_layers: int) -> dict:
    """Tokens, truncation, layers skipped, FLOPs and rows/s, measured on the sample."""
    good = np.array([e is None for e in early_rows.column("error").to_pylist()])
    tokens = np.array(early_rows.column("num_tokens").to_pylist(), dtype=float)[good]
    exits = np.array(early_rows.column("exit_layer").to_pylist(), dtype=float)[good]
    n = early_rows.num_rows

    def flops(table):  # per labeled row, as the run counts them
        return float(np.nansum(np.array(table.column("flops_used").to_pylist(), dtype=float)[good])) / max(1, good.sum())

    return {"error_rows_in_sample": int((~good).sum()),
            "mean_tokens": float(tokens.mean()) if len(tokens) else None,
            "p95_tokens": float(np.percentile(tokens, 95)) if len(tokens) else None,
            "truncated_share": float(np.mean(early_rows.column("truncated").to_pylist())),
            "layers_skipped_share": float(np.mean((num_layers - exits) / num_layers)) if len(exits) else None,
            "flops_per_row_early": flops(early_rows), "flops_per_row_full": flops(full_rows),
            "rows_per_s_early": n / early_s, "rows_per_s_full": n / full_s}


def _corpus_figures(fig: dict, cfg: JobConfig, rows: int, policy) -> dict:
    """Seconds of one device for the whole corpus: at full depth; with early exit, the --calibrate
    sample (full depth) and the audit (an audited row also runs what it skipped: full minus early)."""
    calibrate = min(cfg.calibrate, rows)
    labeled = rows - calibrate
    audit_rate = 0.0 if policy.never_exits else corpus_audit_rate(cfg, labeled)
    per_full, per_early = 1 / fig["rows_per_s_full"], 1 / fig["rows_per_s_early"]
    audit_s = audit_rate * labeled * max(0.0, per_full - per_early)
    return {"calibration_rows": calibrate, "calibration_s": calibrate * per_full,
            "audit_rate": audit_rate, "audit_rows": int(round(audit_rate * labeled)), "audit_s": audit_s,
            "full_depth_s": rows * per_full, "early_exit_s": labeled * per_early,
            "total_s": calibrate * per_full + labeled * per_early + audit_s,
            "full_depth_flops": rows * fig["flops_per_row_full"],
            "total_flops": (calibrate + audit_rate * labeled) * fig["flops_per_row_full"]
            + labeled * (1 - audit_rate) * fig["flops_per_row_early"]}


def _priced(fig: dict, price, resolve_price, peaks: dict) -> dict | None:
    """Hours and money on the device --price-per-hour names (a number prices this machine's measured
    hours; a device name, e.g. A100, is estimated from FLOPs at its peak x ASSUMED_UTILIZATION: the
    weakest figure of the plan, and said so). None without --price-per-hour."""
    if price is None:
        return None
    priced = resolve_price(price, {"device": fig["device"]})
    name = priced["device"]
    if name in peaks:
        rate = peaks[name] * 1e12 * ASSUMED_UTILIZATION
        full_h, total_h = fig["full_depth_flops"] / rate / 3600, fig["total_flops"] / rate / 3600
        how = (f"estimated: the sample's FLOPs per row / ({peaks[name]:g} TFLOP/s peak x {ASSUMED_UTILIZATION:.0%} "
               "assumed utilization); measure with a short run on that device to be sure")
    else:
        name = "this machine"
        full_h, total_h = fig["full_depth_s"] / 3600, fig["total_s"] / 3600
        how = "measured: the sample's rows/s on this machine, at the given hourly price"
    return {"device": name, "price": priced["price"], "source": priced["source"], "full_depth_h": full_h,
            "total_h": total_h, "how": how, "full_depth_cost": full_h * priced["price"],
            "total_cost": total_h * priced["price"]}


def plan_text(fig: dict) -> str:
    """The plan as printed by `jobs/classify.py --plan`: each figure with how it was estimated."""
    from adainfer_ray.report.text import fmt_money, fmt_n, fmt_num, fmt_pct
    from adainfer_ray.report.verdict import promise_text

    def hours(seconds):  # three significant digits: a 300-row corpus and a 50-million-row one alike
        return f"{seconds / 3600:,.3g}"

    lines = ["== adainfer-ray: plan (nothing was labeled or written) ==",
             f"rows: {fmt_n(fig['rows'])} ({fig['rows_counted_by']})"]
    if not fig.get("sample_rows"):
        return "\n".join(lines + ["the input holds no rows: a run would write an empty output"])
    lines += [f"sample: {fmt_n(fig['sample_rows'])} rows, seeded (--seed), labeled here with the job's own model actor, "
              "with the policy and at full depth",
              "one prompt exactly as the model sees it (shared prefix + the row):", "---", fig["prompt"], "---",
              f"tokens per row: mean {fmt_num(fig['mean_tokens'], 1)}, p95 {fmt_num(fig['p95_tokens'], 0)} (prefix "
              f"included; measured on the sample); truncated: {fmt_pct(fig['truncated_share'])} of the sample",
              f"policy: {fig['policy_note']}"]
    if fig["promise"]:
        lines.append("promise: " + promise_text(fig["promise"]))
    lines += [f"layers skipped with early exit: {fmt_pct(fig['layers_skipped_share'])} on the sample "
              f"(of {fig['num_layers']} layers)",
              f"rows/s on this machine ({fig['device']}, one model actor): {fmt_num(fig['rows_per_s_early'], 1)} with "
              f"early exit, {fmt_num(fig['rows_per_s_full'], 1)} at full depth (measured on the sample)",
              f"calibration sample: {fmt_n(fig['calibration_rows'])} rows at full depth, "
              f"{hours(fig['calibration_s'])} h",
              f"audit: {fmt_pct(fig['audit_rate'])} of the rows ({fmt_n(fig['audit_rows'])}) also run on to full depth, "
              f"{hours(fig['audit_s'])} h (--audit-fraction 0 turns it off)"]
    lines.append(f"whole corpus on this machine: {hours(fig['full_depth_s'])} machine-hours at full "
                 f"depth, {hours(fig['total_s'])} with early exit (calibration and audit included; "
                 "measured: the sample's rows/s, one model actor; N actors on N such machines divide the wall time "
                 "by N, not the machine-hours)")
    p = fig["price"]
    if p is not None:
        lines.append(f"whole corpus on {p['device']}: {hours(p['full_depth_h'] * 3600)} device-hours, "
                     f"{fmt_money(p['full_depth_cost'])} at full depth; {hours(p['total_h'] * 3600)} device-hours, "
                     f"{fmt_money(p['total_cost'])} with early exit (at {fmt_money(p['price'])}/h: {p['source']})")
        lines.append(f"  how: {p['how']}")
    lines.append("not included: start-up (model load, about 30 s per actor on CPU) and reading/writing")
    return "\n".join(lines)
