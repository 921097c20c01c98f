"""What the job says at the end of a run: the audit's verdict on the policy's promise (`run_verdict`)
and the end-of-run summary `jobs/classify.py` prints (`job_summary`). The one owner of both.
"""

from __future__ import annotations

from adainfer_ray.report.health import distribution_text
from adainfer_ray.report.text import fmt_n, fmt_num, fmt_pct, fmt_proportion
from adainfer_ray.schema import SIDECAR_NAME
from adainfer_ray.stats import lower_bound, paired_loss_bound, ratio, rows_to_confirm

CONFIDENCE = 0.95  # of the audit's bounds


def run_verdict(summary: dict, promise: dict | None) -> dict:
    """What this run's audit says about the policy's promise, in words a manager can act on.

    The audit is a seeded uniform sample run on to full depth. Under an agreement promise its
    disagreements give a one-sided 95% upper bound (exact binomial) on the share of labels early
    exit changed in this corpus. Under an accuracy promise, the audited rows with gold labels give
    a 95% upper bound on the accuracy early exit lost (the paired test calibration uses); without
    gold labels the run reports agreement and says it cannot check accuracy. When the bound is
    above the promised epsilon, the run says so and how to fix it."""
    audited = summary["audit_agreement"]["rows"]
    disagreed = audited - summary["audit_agreement"]["successes"]
    bound = summary.get("audit_disagreement_bound95")
    out = {"audited_rows": audited, "disagreements": disagreed,
           "observed": ratio(disagreed, audited), "bound95": bound, "epsilon": None, "ok": None, "message": None}
    if not promise:
        return out
    kind = promise.get("promise", "agreement")
    out.update(epsilon=promise["epsilon"], promise_kind=kind, promise=promise_text(promise))
    if not audited:
        out["message"] = ("No row was audited (--audit-fraction 0 turns the audit off), so this run cannot check "
                          "the promise")
    elif kind == "accuracy" and (summary.get("audit_gold") or {}).get("rows"):
        out.update(_accuracy_verdict(summary["audit_gold"], promise["epsilon"]))
    else:
        out.update(_agreement_verdict(disagreed, audited, bound, promise["epsilon"]))
        if kind == "accuracy":  # nothing to check accuracy against: say what was checked instead
            out["ok"] = None
            out["message"] = ("The audited rows carry no gold labels, so this run cannot check the accuracy promise "
                              "(give --label-column); agreement with full depth instead: " + out["message"])
    return out


def drift_sentence(drift: dict | None, on_drift: str | None = None) -> str | None:
    """When and why the run acted on its online audit (_run.json's drift), in one sentence."""
    if not drift:
        return None
    what = "accuracy lost" if drift.get("checks") == "accuracy" else "labels changed"
    did = {"full": "labeled every later row at full depth", "stop": "stopped",
           "warn": "went on labeling (--on-drift warn)"}.get(drift.get("action"), "acted")
    cannot = (" It had no gold labels, so it checked agreement, not accuracy." if drift.get("kind") == "accuracy"
              and drift.get("checks") != "accuracy" else "")
    return (f"drift: {fmt_num(drift.get('at_s'), 0)} s into the run ({drift.get('at')}), after "
            f"{fmt_n(drift['audited'])} audited rows, the online audit showed the promise broken ({what}: "
            f"at least {fmt_pct(drift['lower_bound'])} at {1 - drift['alpha']:.0%} confidence, above epsilon "
            f"{fmt_pct(drift['epsilon'])}); the run {did}. {fmt_n(drift['rows_labeled_before'])} rows were labeled "
            f"before; rows with after_drift = true came after.{cannot} To label this corpus early, recalibrate "
            f"on it: --calibrate N.")


def promise_text(promise: dict) -> str:
    """A policy's promise in one sentence (the job's summary, the verdict and --plan)."""
    eps, skipped = promise["epsilon"], promise.get("layers_skipped")
    if promise.get("promise") == "accuracy":
        what = f"it loses at most {fmt_pct(eps)} accuracy against the full model's (on gold labels)"
    else:
        what = f"it changes at most {fmt_pct(eps)} of the labels that the full model would give"
    return (f"Early exit skips about {fmt_pct(skipped)} of the model's layers, and with "
            f"{fmt_pct(1 - promise['delta'], 0)} confidence {what} "
            f"(calibrated on {fmt_n(promise['calibration_size'])} rows).")


def _agreement_verdict(disagreed: int, audited: int, bound: float, eps: float) -> dict:
    if bound <= eps:
        return {"ok": True, "message": (f"Promise confirmed by the audit: {fmt_n(disagreed)} of {fmt_n(audited)} "
                                        f"audited labels changed, at most {fmt_pct(bound)} at 95% confidence")}
    if lower_bound(disagreed, audited) > eps:
        return {"ok": False, "message": (
            f"WARNING: early exit changed {fmt_n(disagreed)} of {fmt_n(audited)} audited labels "
            f"({fmt_pct(ratio(disagreed, audited))}; at least {fmt_pct(lower_bound(disagreed, audited))} at 95% "
            f"confidence), more than the promised {fmt_pct(eps)}: this corpus differs from the "
            "calibration data. Recalibrate on it with --calibrate N (e.g. 2000), or use --policy full")}
    return {"ok": False, "message": (
        f"The audit cannot confirm the promise on this corpus: {fmt_n(disagreed)} of {fmt_n(audited)} "
        f"audited labels changed ({fmt_pct(ratio(disagreed, audited))}), which allows up to {fmt_pct(bound)} at 95% "
        f"confidence (above {fmt_pct(eps)}). To be sure, recalibrate on this corpus with "
        f"--calibrate N, or audit more rows (--audit-rows; at least {fmt_n(rows_to_confirm(eps))} "
        "even with no change)")}


def _accuracy_verdict(audit_gold: dict, eps: float) -> dict:
    n, worse, better = audit_gold["rows"], audit_gold["exit_only_wrong"], audit_gold["full_only_wrong"]
    lost = (worse - better) / n
    bound = paired_loss_bound(worse, better, n, CONFIDENCE)
    said = (f"on {fmt_n(n)} audited rows with gold labels, early exit is {fmt_pct(lost)} less accurate than full "
            f"depth ({fmt_n(audit_gold['exit_only_wrong'])} rows wrong only at the exit, "
            f"{fmt_n(audit_gold['full_only_wrong'])} only at full depth), at most {fmt_pct(bound)} at 95% confidence")
    out = {"accuracy_rows": n, "accuracy_lost": lost, "accuracy_lost_bound95": bound}
    if bound <= eps:
        return {**out, "ok": True, "message": "Accuracy promise confirmed by the audit: " + said}
    return {**out, "ok": False, "message": (
        f"The audit cannot confirm the accuracy promise ({fmt_pct(eps)}) on this corpus: {said}. To be sure, "
        "audit more rows with gold labels (--audit-rows), or recalibrate on this corpus with --calibrate N")}


def job_summary(record: dict) -> str:
    """The end-of-run summary `jobs/classify.py` prints, from its run record (`_run.json`)."""
    s, verdict = record["summary"], record.get("verdict") or {}
    lines = ["", "== adainfer-ray: done ==",
             f"rows {fmt_n(s['rows'])} ({fmt_n(record['resumed_rows'])} from an earlier run), errors {fmt_n(s['error_rows'])}, "
             f"truncated {fmt_n(s['truncated_rows'])}"]
    if s["mean_exit_layer"] is not None:
        lines.append(f"mean exit layer {fmt_num(s['mean_exit_layer'], 1)}/{record['num_layers']}, layers skipped "
                     f"{fmt_pct(s['layers_skipped_share'])}; FLOPs saved by early exit {fmt_pct(s['exit_saved_share_same_prefix'])} "
                     f"of a full-depth run with the same prefix reuse")
    if s["calibration_rows"]:
        outside = s["outside_sample"]
        lines.append(f"calibration sample: {fmt_n(s['calibration_rows'])} rows, labeled at full depth "
                     f"(policy in {record['policy']}); the other {fmt_n(outside['rows'])} rows skipped "
                     f"{fmt_pct(outside['layers_skipped_share'])} of layers")
    if verdict.get("promise"):
        lines.append("promise: " + verdict["promise"])
    elif record.get("policy_features") != "none":
        lines.append("policy: no calibrated promise recorded with it")
    if verdict.get("audited_rows"):
        lines.append(f"audit: {fmt_proportion(s['audit_agreement'])} agree with full depth")
    if verdict.get("message"):
        lines.append(verdict["message"])
    if record.get("drift"):
        lines.append(drift_sentence(record["drift"]))
    gold = s["outside_sample"]["gold_accuracy"] if s["calibration_rows"] else s["gold_accuracy"]
    if gold["rows"]:
        where = " outside the calibration sample" if s["calibration_rows"] else ""
        line = f"accuracy on {fmt_n(gold['rows'])} rows with gold labels{where}: {fmt_pct(gold['share'])}"
        if s["full_depth_gold_accuracy"]["rows"]:
            line += (f" (full depth on the {fmt_n(s['full_depth_gold_accuracy']['rows'])} audited ones: "
                     f"{fmt_pct(s['full_depth_gold_accuracy']['share'])})")
        lines.append(line)
    health = s.get("label_health")
    if health and health["written"]["rows"]:
        lines.append(distribution_text(health))
        lines += [f"WARNING: {w}" for w in health["warnings"]]
    if record.get("rows_per_s") is not None:
        lines.append(f"{fmt_num(record['rows_per_s'], 1)} rows/s over {fmt_num(record['wall_s'], 1)} s on "
                     f"{record['device']} ({record.get('dtype')})"
                     + (f"; first labeled batch {fmt_num(record['first_labels_s'], 1)} s after the start"
                        if record.get("first_labels_s") is not None else ""))
    lines.append(f"output: {record['output']} (Parquet files + {SIDECAR_NAME})")
    return "\n".join(lines)

