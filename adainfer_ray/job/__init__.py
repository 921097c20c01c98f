"""The Ray Data job: read -> label -> write, with an optional calibration step inside it.

    files --dataset.read_dataset--> rows {id, text, gold_label, group, input_error}   (io.read_rows)
          --actor.Classifier------> one output row per input row (schema.OUTPUT_SCHEMA)
          --dataset.write_output--> <output>/*.parquet, <output>/_run.json           (run.py's record)

One idea per module, and data flows down this list:

    run.py          run_classify / run_calibrate: the orchestration, and the run record (_run.json)
    calibration.py  --calibrate: the seeded sample, tracing it through the actors, fitting the policy;
                    refit_policy: a new policy from a kept trace (jobs/calibrate.py --refit)
    trace_file.py   the sample's trace on disk (<policy>/trace.safetensors), for refits
    stage.py        label(ds, ...): the labeling step inside a user's own Ray Data pipeline
    cluster.py      Ray start (overlapped with the preflight), Resources, the one actor pool
    actor.py        Classifier: loads the model once, maps a batch of rows to output rows
    dataset.py      read (fsspec + pyarrow, ids, rows already written left out) and write
    plan.py         the one place the driver resolves task, model, policy, dtype, context limit
    sampling.py     seeded samples without state (the audit, the calibration draw)
    config.py       JobConfig, JobError, --actors, the input checks that run before Ray starts

Each Classifier actor loads the model once, then labels one block of rows per call with the
early-exit engine (which regroups the block's items by depth). Rows are never held across calls,
so Ray's retries and lineage cover every row.

With `--calibrate N` the job first draws a seeded uniform sample of N rows, runs it at full depth
through the same actors (same reader, prompt, engine, dtype and device) keeping every layer's exit
features, calibrates a policy on the driver (Learn-then-Test), writes it to <output>/_policy/,
writes the sample's rows (their full-depth labels, marked `calibration`), then labels the rest.
`jobs/calibrate.py` runs the same `calibrate_policy` and stops there.

What the job promises (the README's "What the job guarantees" is the user's version):
- one output row per input row: a row that cannot be labeled gets `error` set and `label` null;
- everything that can be checked before the run (paths, columns, model, policy, output) fails fast,
  on the driver, before any actor starts;
- re-running the same command over the same --output resumes: rows in readable output files are
  kept and not labeled again, and a calibrated policy in <output>/_policy/ is reused; what may be
  deleted, and which runs may continue an output, is adainfer_ray.resume's to decide;
- a row that kills its actor every time ends as an error row (adainfer_ray.runstate).
"""

from adainfer_ray.job.calibration import calibrate_policy, refit_policy
from adainfer_ray.job.config import JobConfig, JobError
from adainfer_ray.job.plan import preflight
from adainfer_ray.job.run import run_calibrate, run_classify
from adainfer_ray.job.stage import label

__all__ = ["JobConfig", "JobError", "calibrate_policy", "label", "refit_policy", "preflight", "run_calibrate", "run_classify"]
