"""Label a text corpus with an early-exit LLM on Ray Data; write labels + compute stats to Parquet.

    python jobs/classify.py                                   # embedded demo corpus, local Ray
    ray job submit --working-dir . -- python jobs/classify.py --input s3://bucket/reviews/ --output s3://bucket/labels/

Argument parsing only: the job itself is adainfer_ray.pipeline.run_classify.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from adainfer_ray.pipeline import EMBEDDED_CORPUS, JobConfig  # noqa: E402


def parse_args(argv=None) -> JobConfig:
    d = JobConfig()
    p = argparse.ArgumentParser(
        prog="jobs/classify.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", default=d.input,
                   help="corpus: a file, folder, glob or fsspec URI (s3://, gs://, memory://); "
                        "default: the embedded 300-review demo corpus")
    g.add_argument("--format", default=d.format, choices=["auto", "parquet", "jsonl", "csv", "tsv"],
                   help="input format; auto reads it from the file extension")
    g.add_argument("--text-column", default=d.text_column, help="column holding the text to label")
    g.add_argument("--id-column", default=d.id_column,
                   help="column holding a row id; when absent, ids are derived as <file path under --input>:<row number>")
    g.add_argument("--label-column", default=None,
                   help="optional gold-label column, copied to gold_label so reports can show accuracy "
                        "(the embedded corpus has one: `label`, used by default with it)")
    g.add_argument("--limit", type=int, default=None, help="label only the first N rows")
    g = p.add_argument_group("task")
    g.add_argument("--task", default=d.task, help="built-in task: sentiment (negative/positive) or topic "
                   "(World/Sports/Business/Sci/Tech); ignored when --labels is given")
    g.add_argument("--labels", default=None, help="custom task: comma-separated label names, e.g. 'bug,feature,question'")
    g.add_argument("--template", default=None,
                   help=r"per-item prompt template with one {text}, ending where the model names the label, "
                        r"e.g. 'Ticket: {text}\nType:' (default: the task's own)")
    g.add_argument("--demos", default=None, help="JSONL file of few-shot demonstrations {\"text\", \"label\"} "
                   "(default: the task's built-in demonstrations; none for a custom task)")
    g = p.add_argument_group("model and exit policy")
    g.add_argument("--model", default=d.model, help="smollm2-135m (embedded), a local HF model folder, "
                   "or an fsspec URI of one (copied once into the user cache)")
    g.add_argument("--policy", default=d.policy, help="exit policy: `default` (shipped for the default model "
                   "and built-in tasks), `full` (no early exit: the baseline), or a folder from jobs/calibrate.py")
    g.add_argument("--device", default=d.device, help="auto (CUDA when present, bf16), cuda, or cpu (fp32)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a model folder to run its own Python code")
    g.add_argument("--no-prefix-reuse", action="store_true",
                   help="run the few-shot prefix for every item instead of once per actor (for comparisons)")
    g.add_argument("--max-batch-tokens", type=int, default=None,
                   help="tokens per layer step inside an actor (default: 2048 on CPU, 16384 on GPU)")
    g = p.add_argument_group("scale")
    g.add_argument("--actors", default=d.actors, help="number of model actors: N, or MIN,MAX to autoscale")
    g.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs each actor holds (default: 1 when the cluster has GPUs, else 0)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="rows per actor call; the engine regroups them by exit depth inside the call")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=d.output, help="output folder or fsspec URI for Parquet + _run.json; "
                   "re-running over the same folder resumes")
    g.add_argument("--overwrite", action="store_true",
                   help="delete what --output holds first; needed when it was written with another model, "
                        "policy, task or dtype (a rerun refuses to mix labels of two kinds)")
    g.add_argument("--audit-fraction", type=float, default=d.audit_fraction,
                   help="seeded share of rows also run to full depth (full_label) to measure agreement")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the audit sample")
    a = p.parse_args(argv)
    label_column = a.label_column
    if label_column is None and a.input == str(EMBEDDED_CORPUS):
        label_column = "label"  # the demo corpus carries gold labels: show accuracy
    return JobConfig(
        input=a.input, output=a.output, format=a.format, text_column=a.text_column, id_column=a.id_column,
        label_column=label_column, task=a.task, labels=a.labels.split(",") if a.labels else None,
        template=a.template.encode().decode("unicode_escape") if a.template else None, demos=a.demos,
        model=a.model, policy=a.policy, device=a.device, actors=a.actors, gpus_per_actor=a.gpus_per_actor,
        batch_size=a.batch_size, max_batch_tokens=a.max_batch_tokens, reuse_prefix=not a.no_prefix_reuse,
        audit_fraction=a.audit_fraction, seed=a.seed, limit=a.limit, trust_remote_code=a.trust_remote_code,
        overwrite=a.overwrite)


def print_summary(run: dict) -> None:
    s = run["summary"]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"
    print("\n== adainfer-ray: done ==")
    print(f"rows {s['rows']} ({run['resumed_rows']} from an earlier run), errors {s['errors']}, truncated {s['truncated']}")
    if s["mean_exit_layer"] is not None:
        print(f"mean exit layer {s['mean_exit_layer']:.1f}/{run['num_layers']}, layers skipped {pct(s['layers_skipped'])}, "
              f"FLOPs saved {pct(s['flops_saved'])} vs the whole prompt at full depth "
              f"({pct(s['flops_saved_by_exit'])} by early exit, the rest by prefix reuse)")
    if s["audited"]:
        print(f"agreement with full depth on {s['audited']} audited rows: {pct(s['audit_agreement'])}")
    if s["gold_rows"]:
        print(f"accuracy on {s['gold_rows']} rows with gold labels: {pct(s['accuracy'])}")
    print(f"{run['rows_per_s']:.1f} rows/s over {run['wall_s']:.1f} s on {run['device']}")
    print(f"output: {run['output']} (Parquet files + _run.json)")


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from adainfer_ray.io import InputError
    from adainfer_ray.models import UnsupportedModelError
    from adainfer_ray.pipeline import JobError, run_classify
    from adainfer_ray.policy import PolicyError

    # Errors in what the user gave us: each says what is wrong and what to do, on one line, exit 2.
    # Anything else is a bug or an outage and keeps its traceback.
    user_errors = (InputError, JobError, PolicyError, UnsupportedModelError, FileNotFoundError, PermissionError)
    try:
        run = run_classify(cfg)
    except user_errors as e:
        # Raised inside a Ray task (a file that turns out corrupt mid-run), it arrives wrapped in Ray's
        # RayTaskError, whose text is a whole traceback: print the cause's message.
        cause = getattr(e, "cause", None)
        message = str(cause if isinstance(cause, user_errors) else e)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    print_summary(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
