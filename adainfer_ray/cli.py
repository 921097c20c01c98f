"""The flags the jobs share, defined once: classify and calibrate take the same input, task and
model flags with the same names and meanings, and turn them into the same JobConfig.

Every default shown by --help is the JobConfig default, so --help and the library cannot disagree.
"""

from __future__ import annotations

import argparse
import sys

from adainfer_ray.job.config import EMBEDDED_CORPUS, PROMISES, JobConfig

DEFAULTS = JobConfig()


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A job's parser with the flags every job takes: input, task and model."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_input_args(p)
    add_task_args(p)
    add_model_args(p)
    return p


def add_input_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--input", default=DEFAULTS.input,
                   help="corpus: a file, folder, glob or fsspec URI (s3://, gs://, memory://) of Parquet, JSONL, "
                        "CSV or TSV files; default: the embedded 300-review demo corpus")
    g.add_argument("--format", default=DEFAULTS.format, choices=["auto", "parquet", "jsonl", "csv", "tsv"],
                   help="input format; auto reads it from the file extension")
    g.add_argument("--columns", default=None,
                   help="column names of a CSV/TSV file without a header row, comma-separated "
                        "(e.g. label,title,description)")
    g.add_argument("--text-column", default=DEFAULTS.text_column, help="column holding the text to label")
    g.add_argument("--id-column", default=DEFAULTS.id_column,
                   help="column holding a row id; when absent, ids are derived as <file>:<row number>")
    g.add_argument("--label-column", default=None,
                   help="optional gold-label column (label names, or 0- or 1-based indices), copied to gold_label "
                        "so reports show accuracy (the embedded corpus has one: `label`, used by default with it)")
    g.add_argument("--group-column", default=None,
                   help="calibration: rows sharing a value here (a source sentence, a thread, an author) stay on "
                        "one side of the fit/test split, so dependent rows cannot flatter the test")
    g.add_argument("--limit", type=int, default=None, help="use only the first N rows")


def add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--task", default=DEFAULTS.task, help="built-in task: sentiment (negative/positive) or topic "
                   "(World/Sports/Business/Sci/Tech); ignored when --labels is given")
    g.add_argument("--labels", default=None, help="custom task: comma-separated label names, e.g. 'bug,feature,question'")
    g.add_argument("--template", default=None,
                   help=r"per-item prompt template with one {text}, ending where the model names the label; "
                        r"\n, \t and \\ are escapes, e.g. 'Ticket: {text}\nType:' (default: the task's own)")
    g.add_argument("--demos", default=None, help="JSONL file of few-shot demonstrations {\"text\", \"label\"} "
                   "(default: the task's built-in demonstrations; none for a custom task)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULTS.model,
                   help="smollm2-135m (embedded), a Hugging Face Hub id (org/name[@revision], from the HF cache), "
                        "a local model folder, an fsspec URI of one, or a .gguf file")
    g.add_argument("--device", default=DEFAULTS.device, help="auto (CUDA when present), cuda, or cpu")
    g.add_argument("--dtype", default=DEFAULTS.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute precision; auto: float32 on CPU, bfloat16 on CUDA (float16 without bf16 support)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a model folder to run its own Python code")
    g.add_argument("--no-prefix-reuse", action="store_true",
                   help="run the few-shot prefix for every item instead of once per actor (for comparisons)")
    g.add_argument("--max-batch-tokens", type=int, default=None,
                   help="tokens per layer step inside an actor (default: 2048 on CPU, 16384 on GPU)")


def add_scale_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale")
    g.add_argument("--actors", default=DEFAULTS.actors, help="number of model actors: N, or MIN,MAX to autoscale")
    g.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs each actor holds (default: 1 when the cluster has GPUs, else 0)")
    g.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help="rows per actor call; the engine regroups them by exit depth inside the call")


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (the promise)")
    g.add_argument("--epsilon", type=float, default=DEFAULTS.epsilon,
                   help="the promised bound: the share of labels early exit changes vs the full model (--promise "
                        "agreement), or the accuracy it loses, as a fraction (--promise accuracy; 0.01 = 1 point)")
    g.add_argument("--delta", type=float, default=DEFAULTS.delta,
                   help="allowed probability that the promise fails (over the draw of the calibration sample)")
    g.add_argument("--promise", default=DEFAULTS.promise, choices=list(PROMISES),
                   help="what --epsilon bounds. agreement: the share of labels early exit changes vs the full model "
                        "(no gold labels needed; the strictest). accuracy: the accuracy points early exit loses vs "
                        "the full model, measured on gold labels (needs --label-column when calibrating; a label "
                        "that changes from wrong to right pays for one that changes from right to wrong, so it "
                        "skips more layers). Without --calibrate, --policy default picks the shipped policy made "
                        "under this promise")
    g.add_argument("--prior", default=DEFAULTS.prior, metavar="{default,none,FOLDER}",
                   help="calibration: a policy calibrated on other rows for this model and prompt whose rule (and "
                        "probes) joins the candidates, re-thresholded on this sample; the fit part picks it when "
                        "it saves the most among rules as simple. default: the shipped policy when one matches "
                        "the model and task (it was calibrated on SST-2 train phrases: pass none if your corpus "
                        "holds them); none: learn from this sample only; or a policy folder")
    g.add_argument("--fit-fraction", type=float, default=DEFAULTS.fit_fraction,
                   help="calibration: the share of the sample that learns the probes and chooses the rule; the rest "
                        "tests it. Small samples want a small share (the test's power); thousands of rows afford "
                        "more (on 1,000 SST-2 phrases 0.4 skipped 1.8 points more than 0.3; on 6,885, 0.5 about 1 "
                        "more than 0.3)")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="seed of the calibration sample, its fit/test split, and the audit sample")


def unescape(template: str | None) -> str | None:
    r"""--template as typed in a shell: \n, \t and \\ become a newline, a tab and a backslash. Only
    these three, so that any other character (é, emoji, a lone backslash) stays as it is."""
    if template is None:
        return None
    out, i = [], 0
    while i < len(template):
        pair = template[i: i + 2]
        if pair in ("\\n", "\\t", "\\\\"):
            out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
            i += 2
        else:
            out.append(template[i])
            i += 1
    return "".join(out)


def config_from_args(a: argparse.Namespace, **extra) -> JobConfig:
    """One JobConfig from the shared flags (plus a job's own settings in `extra`)."""
    label_column = a.label_column
    if label_column is None and a.input == str(EMBEDDED_CORPUS):
        label_column = "label"  # the demo corpus carries gold labels: show accuracy
    return JobConfig(
        input=a.input, format=a.format, columns=a.columns.split(",") if a.columns else None,
        text_column=a.text_column, id_column=a.id_column, label_column=label_column, group_column=a.group_column,
        task=a.task, labels=[x.strip() for x in a.labels.split(",")] if a.labels else None,
        template=unescape(a.template), demos=a.demos, model=a.model, device=a.device, dtype=a.dtype,
        trust_remote_code=a.trust_remote_code, reuse_prefix=not a.no_prefix_reuse,
        max_batch_tokens=a.max_batch_tokens, actors=a.actors, gpus_per_actor=a.gpus_per_actor,
        batch_size=a.batch_size, epsilon=a.epsilon, delta=a.delta, promise=a.promise, prior=a.prior,
        fit_fraction=a.fit_fraction, seed=a.seed,
        limit=a.limit, **extra)


def run_main(fn, *args) -> int:
    """Run a job; errors in what the user gave print as one `error: ...` line and exit 2. Anything
    else is a bug or an outage and keeps its traceback."""
    from adainfer_ray.io import InputError
    from adainfer_ray.models import UnsupportedModelError
    from adainfer_ray.job.config import JobError
    from adainfer_ray.policy import PolicyError

    user_errors = (InputError, JobError, PolicyError, UnsupportedModelError, FileNotFoundError, PermissionError)
    try:
        return fn(*args)
    except user_errors as e:
        # Raised inside a Ray task (a file that turns out corrupt mid-run), it arrives wrapped in Ray's
        # RayTaskError, whose text is a whole traceback: print the cause's message.
        cause = getattr(e, "cause", None)
        message = str(cause if isinstance(cause, user_errors) else e)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2
