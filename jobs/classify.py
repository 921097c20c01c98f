"""Label a text corpus with an early-exit LLM on Ray Data; write labels + compute stats to Parquet.

    python jobs/classify.py                                   # embedded demo corpus, local Ray
    python jobs/classify.py --input corpus/ --calibrate 2000  # calibrate on 2,000 of its rows first
    ray job submit --working-dir . -- python jobs/classify.py --input s3://bucket/reviews/ --output s3://bucket/labels/

Argument parsing only: the job itself is adainfer_ray.job.run.run_classify.
"""

import time

STARTED_AT = time.time()  # runstate.timestamp()'s clock, from here: wall_s and first_labels_s count the imports

import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from adainfer_ray import cli  # noqa: E402


def parse_args(argv=None):
    p = cli.parser("jobs/classify.py", __doc__.split("\n\n")[0])  # input, task and model flags
    g = p.add_argument_group("exit policy")
    g.add_argument("--policy", default=cli.DEFAULTS.policy, help="exit policy: `default` (shipped for the default "
                   "model and built-in tasks), `full` (no early exit: the baseline), or a folder from jobs/calibrate.py")
    g.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="calibrate a policy on a seeded random sample of N rows of this input first (run at full "
                        "depth, no gold labels needed; written to <output>/_policy), then label every row with it; "
                        "0: use --policy")
    cli.add_calibration_args(p)
    cli.add_scale_args(p)
    g = p.add_argument_group("output and audit")
    g.add_argument("--output", default=cli.DEFAULTS.output, help="output folder or fsspec URI for Parquet + _run.json; "
                   "re-running over the same folder resumes")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing output made with another model, policy, task or dtype")
    g.add_argument("--audit-fraction", type=float, default=cli.DEFAULTS.audit_fraction,
                   help="seeded share of rows also run on to full depth (full_label), to check the promise on this "
                        "corpus. Cost: each audited row also runs the layers early exit skipped, so the audit adds "
                        "about (audited rows x layers skipped) of a full-depth run; 0 turns the audit off (no "
                        "--audit-rows floor), and the run then cannot check its promise")
    g.add_argument("--audit-rows", type=int, default=cli.DEFAULTS.audit_rows,
                   help="audit at least this many rows (all rows of a smaller corpus): 300 is the fewest that can "
                        "confirm a 1%% promise at 95%% confidence; costs at most that many full-depth rows")
    g.add_argument("--on-drift", default=cli.DEFAULTS.on_drift, choices=["full", "stop", "warn"],
                   help="what the run does once its audit, checked as blocks finish (anytime-valid at 95%%), shows "
                        "the policy's promise broken on this corpus: full labels every remaining row at full depth "
                        "(after_drift = true), stop ends the run with one line and a resumable output, warn only "
                        "says so at the end. Default full: every label from then on is the full model's, so the "
                        "promise holds for them, and an overnight run still finishes")
    g.add_argument("--progress-every", type=float, default=cli.DEFAULTS.progress_s, metavar="SECONDS",
                   help="print a progress line (rows done of the total, rows/s, time left, layers skipped, error "
                        "rows) this often, in any log (ray job submit too); 0: none")
    g = p.add_argument_group("plan (a dry run: what a run will cost, before it runs)")
    g.add_argument("--plan", action="store_true",
                   help="count the input's rows, label a seeded sample here (with the policy and at full depth) and "
                        "print one prompt as the model sees it, token counts, truncation, layers skipped, the "
                        "calibration and audit cost, and device-hours for the whole corpus; writes nothing")
    g.add_argument("--plan-rows", type=int, default=128, metavar="N", help="rows in the plan's sample")
    g.add_argument("--price-per-hour", default=None, metavar="PRICE_OR_DEVICE",
                   help="price the plan's hours: a number (this machine's hourly price) or a device name "
                        "(A100, H100: its hours estimated from FLOPs, said how)")
    a = p.parse_args(argv)
    if a.plan:
        return cli.config_from_args(a, output=a.output, policy=a.policy, calibrate=a.calibrate,
                                    audit_fraction=a.audit_fraction, audit_rows=a.audit_rows), \
            {"sample_size": a.plan_rows, "price": a.price_per_hour}
    return cli.config_from_args(a, output=a.output, policy=a.policy, calibrate=a.calibrate, overwrite=a.overwrite,
                                progress_s=a.progress_every, on_drift=a.on_drift,
                                audit_fraction=a.audit_fraction, audit_rows=a.audit_rows)


def classify(cfg, plan: dict | None = None) -> int:
    if plan is not None:  # --plan: a dry run, nothing written
        from adainfer_ray.job.dryrun import plan_run, plan_text

        print(plan_text(plan_run(cfg, **plan)))
        return 0
    from adainfer_ray.job import run_classify
    from adainfer_ray.report import job_summary

    print(job_summary(run_classify(cfg, started_at=STARTED_AT)))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run_main(classify, *(args if isinstance(args, tuple) else (args,)))


if __name__ == "__main__":
    sys.exit(main())
