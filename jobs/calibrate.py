"""Calibrate an early-exit policy with a stated guarantee, once, to reuse across runs.

    python jobs/calibrate.py --input sample.parquet --sample 2000 --output my-policy/
    python jobs/classify.py --input corpus/ --policy my-policy/
    python jobs/calibrate.py --refit my-policy/ --promise accuracy --output my-policy-accuracy/

Draws a seeded random sample of the input, runs it at full depth through the classify job's own
actors (same reader, prompt, engine, dtype and device), and picks the exit rule and threshold with
Learn-then-Test: with probability >= 1 - delta, the policy changes at most epsilon of the labels
the full model gives, on rows like the sample. Writes policy.json + arrays.safetensors (no
pickle) and a calibration report into --output. `classify --calibrate N` does the same inside one
run. Gold labels are optional under --promise agreement (the promise is about agreement with the
full model; with them the report also shows accuracy) and required under --promise accuracy. The
sample's trace is kept next to the policy (trace.safetensors), so --refit FOLDER fits and tests a
new policy from it with other --epsilon/--delta/--promise in seconds, without the model.

Argument parsing only: the method is adainfer_ray.job.run.run_calibrate.
"""

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from adainfer_ray import cli  # noqa: E402


def parse_args(argv=None):
    p = cli.parser("jobs/calibrate.py", __doc__.split("\n\n")[0])  # input, task and model flags
    g = p.add_argument_group("calibration")
    g.add_argument("--sample", type=int, default=2000, metavar="N",
                   help="calibrate on a seeded random sample of N rows of the input (all rows if fewer)")
    g.add_argument("--output", default=None,
                   help="policy folder (local or fsspec URI) to write; default: policies/<model>-<task>")
    g.add_argument("--refit", default=None, metavar="FOLDER",
                   help="refit from the trace an earlier calibration kept in FOLDER (FOLDER/trace.safetensors) "
                        "with this run's --epsilon/--delta/--promise/--fit-fraction/--seed: no model, no Ray, seconds; "
                        "writes to --output (default: FOLDER itself); the input, task and model flags are not used")
    cli.add_calibration_args(p)
    cli.add_scale_args(p)
    a = p.parse_args(argv)
    if a.refit:
        return a, a.output or a.refit
    task = "custom" if a.labels else a.task
    folder = a.output or os.path.join("policies", f"{os.path.basename(a.model.rstrip('/'))}-{task}")
    return cli.config_from_args(a, calibrate=a.sample, output=folder), folder


def refit(a, folder: str, command: str) -> int:
    from adainfer_ray.job import refit_policy
    from adainfer_ray.job.config import PROMISES, JobError

    if not (0 < a.epsilon < 1 and 0 < a.delta < 1):
        raise JobError("--epsilon and --delta must be between 0 and 1")
    if a.promise not in PROMISES:
        raise JobError(f"--promise must be one of {', '.join(PROMISES)}")
    if not 0 < a.fit_fraction < 1:
        raise JobError("--fit-fraction must be between 0 and 1 (e.g. 0.4)")
    result = refit_policy(a.refit, folder, a.epsilon, a.delta, a.promise, seed=a.seed, command=command,
                          prior=a.prior, fit_fraction=a.fit_fraction)
    print(result.summary["message"])
    print(f"policy: {folder}  (use it with: python jobs/classify.py --policy {folder} ...)")
    return 0


def calibrate(cfg, folder: str, command: str) -> int:
    from adainfer_ray.job import run_calibrate

    calibration = run_calibrate(cfg, folder, command)
    print(calibration.result.summary["message"])
    print(f"policy: {folder}  (use it with: python jobs/classify.py --policy {folder} ...)")
    return 0


def main(argv=None) -> int:
    cfg, folder = parse_args(argv)
    command = shlex.join(["python", "jobs/calibrate.py"] + (argv if argv is not None else sys.argv[1:]))
    if isinstance(cfg, argparse.Namespace):  # --refit: the parsed flags, no job to configure
        return cli.run_main(refit, cfg, folder, command)
    return cli.run_main(calibrate, cfg, folder, command)


if __name__ == "__main__":
    sys.exit(main())
