"""The job's two entry points, and its record: `run_classify` (read -> label -> write, with
--calibrate first when asked) and `run_calibrate` (jobs/calibrate.py: calibration alone). The
record (_run.json) says who wrote the output, with what, and how long it took."""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from datetime import datetime, timezone

from adainfer_ray import io, resume, runstate
from adainfer_ray.online_audit import OnlineAudit
from adainfer_ray.job.calibration import Calibration, calibrate_or_reuse, calibrate_policy
from adainfer_ray.job.cluster import map_classifier, plan_resources, preflight_and_init_ray, starts_local_ray
from adainfer_ray.job.config import JobConfig, JobError
from adainfer_ray.job.dataset import estimate_rows, read_dataset, write_output
from adainfer_ray.job.plan import run_precision, warn_on_precision
from adainfer_ray.job.progress import ProgressReporter
from adainfer_ray.prompts import TEXT_HANDLING
from adainfer_ray.job.sampling import corpus_audit_rate
from adainfer_ray.schema import SIDECAR_NAME


def run_classify(cfg: JobConfig, log=print, started_at: float | None = None) -> dict:
    """Run the whole job; returns the run record that is also written as the sidecar.

    started_at: when the command started (runstate.timestamp()), so that wall_s and the start-up
    timeline count what the user waits for, imports included; default: now."""
    started_at = runstate.timestamp() if started_at is None else started_at
    timeline = {}  # when the driver's steps were done (the actors report theirs to the run state)
    plan, ray, res, identity, previous = _start(cfg, log, timeline)
    state = runstate.start(f"{datetime.fromtimestamp(started_at, timezone.utc):%Y%m%dT%H%M%S}-{os.getpid()}")
    plan, calibration = _settle_policy(cfg, plan, ray, res, identity, previous, state, log)
    ray.get(state.set_audit.remote(online_audit(plan.policy, cfg.label_column is not None), cfg.on_drift))
    done = resume.done_ids(cfg.output, log)
    _say_what_is_kept(cfg, calibration, done, log)
    runs = _start_record(cfg, plan, res, identity, previous, started_at)
    audit_rate = _audit_rate(cfg, plan, calibration)

    ds = read_dataset(cfg, plan, ray, done)
    ds = map_classifier(ds, cfg, plan.task, plan.policy, res, audit_rate=audit_rate,
                        gold_one_based=plan.gold_one_based, run_state=state)
    try:
        with ProgressReporter(state, *_rows_to_label(cfg, plan, done), cfg.progress_s, log):
            write_output(ds, cfg.output, datetime.fromtimestamp(started_at, timezone.utc))
    except Exception as e:
        drift = (runstate.ask(state, "audit_state") or {}).get("drift")
        if cfg.on_drift != "stop" or drift is None:
            _stop_if_ray_gave_up(e, log)
            raise
        record = _stopped_record(cfg, plan, ray, res, identity, runs, state, calibration, done, audit_rate,
                                 started_at, timeline, log)
        io.write_json(cfg.output, SIDECAR_NAME, record)
        raise DriftStopped(drift_line(drift, record["rows"])) from None

    record = _run_record(cfg, plan, ray, res, identity, runs, state, calibration, done, audit_rate,
                         started_at, timeline, log)
    io.write_json(cfg.output, SIDECAR_NAME, record)
    return record


class RunInterrupted(JobError):
    """Ray could not recover from a loss (the driver's node, objects whose owner died): the rows
    written so far are kept, and the same command resumes."""


def _stop_if_ray_gave_up(error: BaseException, log) -> None:
    """A loss Ray did not recover from ends the run with one line (its traceback logged first), saying
    that the same command resumes; any other error (a bug) keeps its traceback as it is."""
    import traceback

    from ray import exceptions as rx

    lost = (rx.NodeDiedError, rx.ObjectLostError, rx.OwnerDiedError, rx.ActorDiedError, rx.RaySystemError,
            rx.ActorUnavailableError)
    cause = error
    while cause is not None and not isinstance(cause, lost):
        cause = cause.__cause__ or getattr(cause, "cause", None)
    if cause is None:
        return
    log("".join(traceback.format_exception(error)))
    try:
        what = " ".join(str(cause).split())[:300]
    except Exception:  # noqa: BLE001 - some Ray errors cannot print themselves outside Ray
        what = "no message"
    raise RunInterrupted(f"Ray could not recover from a lost part of the cluster ({type(cause).__name__}: {what}); "
                         "the rows written so far are kept: run the same command again to resume") from error


class DriftStopped(JobError):
    """--on-drift stop: the online audit showed the promise broken; the output so far is resumable."""


def online_audit(policy, gold: bool) -> OnlineAudit | None:
    """The audit checked as blocks finish: of the policy's promise (epsilon; agreement, or accuracy
    where the promise is on accuracy and rows carry gold labels). None for a policy that promises nothing."""
    promise = policy.promise
    if policy.never_exits or not promise or not promise.get("epsilon"):
        return None
    kind = "accuracy" if promise["promise"] == "accuracy" else "agreement"  # ExitPolicy.promise names it
    return OnlineAudit(float(promise["epsilon"]), kind=kind, gold=gold)


def drift_line(drift: dict, rows_written: int) -> str:
    """The one line a run stopped by --on-drift stop ends with."""
    what = "accuracy lost" if drift["checks"] == "accuracy" else "labels changed by early exit"
    return (f"stopped: the online audit showed the promise broken ({what}: at least {drift['lower_bound']:.1%} "
            f"at {1 - drift['alpha']:.0%} confidence, above epsilon {drift['epsilon']:.1%}, after "
            f"{drift['audited']:,} audited rows); {rows_written:,} rows are in the output. Recalibrate on this corpus "
            f"(--calibrate N --overwrite), or run the same command with --on-drift full to label the rest at full depth")


def run_calibrate(cfg: JobConfig, folder: str, command: str = "", log=print) -> Calibration:
    """jobs/calibrate.py: calibrate a policy on cfg.calibrate rows of the input into `folder`, as
    `classify --calibrate` does, and stop there."""
    plan, ray, _ = preflight_and_init_ray(cfg, log)
    state = runstate.start(f"calibrate-{os.getpid()}")  # poison rows end here too
    return calibrate_policy(cfg, plan, ray, plan_resources(cfg, plan.actors, ray), folder, cfg.calibrate, log,
                            command=command, run_state=state)


def _start(cfg: JobConfig, log, timeline: dict):
    """Preflight, the resume checks and Ray: (plan, ray, resources, identity, previous sidecar).
    A run refused here leaves no Ray of its own behind."""

    def who_writes(plan):
        # Who writes this output: a rerun that would mix labels of two kinds is refused (resume.py), before
        # Ray as far as the flags tell: the dtype waits for the cluster, a --calibrate policy for calibration.
        identity = {"model_hash": plan.model_hash, "task_fingerprint": plan.task.fingerprint(),
                    "text_handling": TEXT_HANDLING}
        if not cfg.calibrate:
            identity["policy_fingerprint"] = resume.policy_fingerprint(plan.policy)
        return identity, resume.check_same_run(cfg.output, identity, cfg.overwrite, log)

    own_ray = starts_local_ray()
    plan, ray, (identity, previous) = preflight_and_init_ray(cfg, log, timeline, then=who_writes)
    try:
        res = plan_resources(cfg, plan.actors, ray)
        identity["dtype"] = run_precision(res.device_kind, cfg.dtype)
        resume.refuse_other_run(cfg.output, previous, identity)
    except BaseException:
        if own_ray:
            ray.shutdown()
        raise
    if not plan.has_id_column:
        log(f"no column {cfg.id_column!r} in the input: ids are derived as <file path under --input>:<row number>")
    return plan, ray, res, identity, previous


def _settle_policy(cfg, plan, ray, res, identity, previous, state, log):
    """The policy this run labels with: --policy as planned, or --calibrate's (made now, or reused
    from an earlier run of this output; then checked against that output as the flags were)."""
    if not cfg.calibrate:
        warn_on_precision(plan.policy, res.device_kind, cfg.dtype, log)
        return plan, None
    calibration = calibrate_or_reuse(cfg, plan, ray, res, previous, state, log)
    plan = replace(plan, policy=calibration.policy)
    identity["policy_fingerprint"] = resume.policy_fingerprint(plan.policy)
    resume.check_same_run(cfg.output, identity, False, log)
    return plan, calibration


def _say_what_is_kept(cfg, calibration, done, log) -> None:
    if calibration is not None and calibration.sample is not None:
        log(f"calibration: the sample's {len(calibration.sample)} rows are written; labeling the other rows")
    elif len(done):
        log(f"resuming: {len(done)} rows already in {cfg.output} are kept and not labeled again")


def _start_record(cfg, plan, res, identity, previous, started_at: float) -> list[dict]:
    """_run.json as the run starts; it carries the policy's promise, so that the report's verdict
    (report.summarize_run) is the run's, and the task's labels (a label never predicted counts too)."""
    started = datetime.fromtimestamp(started_at, timezone.utc).isoformat()
    # ... and the labels, in the order of label_probs, so that the summary's label health knows them all.
    return resume.start_record(cfg.output, previous, {**identity, "promise": plan.policy.promise,
                                                      "labels": list(plan.task.labels)},
                               {"start_time": started, "device": res.device_kind})


def _rows_to_label(cfg, plan, done) -> tuple[int, bool]:
    """Rows this run labels, for its progress lines, and whether that is exact: Parquet footers and the
    embedded corpus are; text formats are line counts (blank lines, quoted newlines), an estimate."""
    exact = plan.embedded_rows is not None or plan.format == "parquet"
    return max(0, estimate_rows(cfg, plan) - len(done)), exact


def _audit_rate(cfg, plan, calibration) -> float:
    """The audit's share of rows: none for a policy that never exits; sized by the corpus (the
    calibration counted it; otherwise an estimate is enough)."""
    if plan.policy.never_exits:
        return 0.0
    rows = calibration.rows_seen if calibration is not None and calibration.rows_seen else estimate_rows(cfg, plan)
    return corpus_audit_rate(cfg, rows)


def _run_record(cfg, plan, ray, res, identity, runs, state, calibration, done, audit_rate, started_at, timeline,
                log) -> dict:
    """The run record (_run.json): identity, every flag, this run's time line, the summary and verdict."""
    from adainfer_ray import report

    wall = runstate.timestamp() - started_at  # a span between two wall-clock stamps, as the timeline's
    # A lost run state (a bug, or the driver's own node in trouble) costs these figures, not the record.
    actor_nodes = runstate.ask(state, "actor_nodes", default={})
    engine_s = runstate.ask(state, "engine_seconds", default=None)
    marks = runstate.ask(state, "marks", default={})
    audit = runstate.ask(state, "audit_state", default=None)
    try:
        ray.kill(state)
    except Exception:  # noqa: BLE001 - already gone
        pass
    # Seconds from the command's start to each step: where the start-up goes, and the labeling's span.
    timeline = {f"{event}_s": at - started_at
                for event, at in sorted({**timeline, **marks}.items(), key=lambda item: item[1])}
    summary = report.summarize_run([cfg.output])  # its verdict reads the promise _start_record wrote
    fresh_sample = calibration.sample if calibration is not None and calibration.sample is not None else None
    if summary["rows"] == 0:
        log(f"the input holds no rows: {cfg.output} holds an empty table (empty.parquet) and {SIDECAR_NAME}")
    elif len(done) and summary["rows"] == len(done) and calibration is None:
        log("nothing left to label: every input row was already in the output")
    resumed = len(done) - (len(fresh_sample) if fresh_sample is not None else 0)  # this run wrote the sample
    gpu_name = _gpu_name() if res.gpus_per_actor else None
    this_run = {**runs[-1], "end_time": datetime.now(timezone.utc).isoformat(), "wall_s": wall,
                "rows_this_run": summary["rows"] - resumed, "gpu_name": gpu_name,
                "num_gpus": res.gpus_per_actor * res.max_actors, "num_actors": cfg.actors, "max_actors": res.max_actors,
                "engine_s": engine_s, "actor_nodes": actor_nodes, "first_labels_s": timeline.get("first_labels_s"),
                "timeline": timeline, "on_drift": cfg.on_drift, "online_audit": audit,
                "drift": _drift_record(audit, started_at)}
    policy = plan.policy
    return {
        **identity, "runs": runs[:-1] + [this_run], "actor_nodes": actor_nodes,
        "model": plan.model_id, "policy": calibration.folder if calibration else cfg.policy,
        "num_layers": plan.num_layers, "policy_features": policy.features, "policy_metadata": policy.metadata,
        "promise": policy.promise, "task": plan.task.to_dict(), "template": plan.task.template,
        "labels": list(plan.task.labels), "flags": asdict(cfg), "ray_version": ray.__version__,
        "device": res.device_kind, "gpu_name": gpu_name, "num_gpus": this_run["num_gpus"],
        "num_actors": cfg.actors, "max_actors": res.max_actors, "engine_s": engine_s, "audit_rate": audit_rate,
        "first_labels_s": this_run["first_labels_s"], "start_time": runs[-1]["start_time"],
        "end_time": this_run["end_time"], "wall_s": wall, "rows_this_run": this_run["rows_this_run"],
        "resumed_rows": resumed, "rows": summary["rows"], "errors": summary["error_rows"],
        # This run's rate, by the report's own rule (the report's figure spans every run of an output).
        "rows_per_s": report.summarize_throughput([cfg.output], [this_run])["rows_per_s"],
        "output": cfg.output, "summary": summary, "verdict": summary["verdict"],
        "online_audit": audit, "drift": this_run["drift"],
    }


def _stopped_record(cfg, plan, ray, res, identity, runs, state, calibration, done, audit_rate, started_at, timeline,
                    log) -> dict:
    """The run record of a run --on-drift stop ended; before any block was written, the identity, the
    runs and the drift alone (what a resume and a reader of _run.json need)."""
    if io.output_files(cfg.output) or calibration is not None:
        return _run_record(cfg, plan, ray, res, identity, runs, state, calibration, done, audit_rate, started_at,
                           timeline, log)
    audit = runstate.ask(state, "audit_state", default=None)
    drift = _drift_record(audit, started_at)
    this_run = {**runs[-1], "end_time": datetime.now(timezone.utc).isoformat(), "rows_this_run": 0,
                "on_drift": cfg.on_drift, "online_audit": audit, "drift": drift}
    return {**identity, "runs": runs[:-1] + [this_run], "promise": plan.policy.promise, "flags": asdict(cfg),
            "rows": len(done), "online_audit": audit, "drift": drift, "output": cfg.output}


def _drift_record(audit: dict | None, started_at: float) -> dict | None:
    """When (seconds from the start, and UTC) and why the run acted on the online audit; None if it did not."""
    drift = (audit or {}).get("drift")
    if not drift:
        return None
    return {**drift, "at_s": drift["at"] - started_at,
            "at": datetime.fromtimestamp(drift["at"], timezone.utc).isoformat()}


def _gpu_name():
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None
