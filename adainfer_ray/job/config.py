"""The job's settings (JobConfig), its user-facing error (JobError), and the input checks that run
in milliseconds, before torch is imported or Ray starts (check_input)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adainfer_ray import io

PROMISES = ("agreement", "accuracy")  # what --epsilon bounds (calibrate.calibrate's promise)
EMBEDDED_CORPUS = Path(__file__).parent.parent / "data" / "reviews.jsonl"


@dataclass
class JobConfig:
    """Everything `jobs/classify.py` and `jobs/calibrate.py` can set; the defaults are the flags' defaults."""

    input: str = str(EMBEDDED_CORPUS)
    output: str = "output"
    format: str = "auto"
    columns: list[str] | None = None  # names of a headerless CSV/TSV file's columns
    text_column: str = "text"
    id_column: str = "id"
    label_column: str | None = None  # gold labels to carry into the output (gold_label)
    group_column: str | None = None  # calibration: rows of one group stay on one side of the fit/test split
    task: str = "sentiment"
    labels: list[str] | None = None
    template: str | None = None
    demos: str | None = None  # a JSONL file of {"text", "label"} demonstrations
    model: str = "smollm2-135m"
    policy: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    actors: str = "1"  # "N" or "MIN,MAX", as typed (parse_actors reads it)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    batch_size: int = 256  # rows per actor call: the engine regroups within it
    max_batch_tokens: int | None = None  # tokens per layer step (engine default: 2048 CPU, 16384 GPU)
    reuse_prefix: bool = True
    calibrate: int = 0  # > 0: calibrate a policy on this many rows of the input first
    epsilon: float = 0.01
    delta: float = 0.05
    promise: str = "agreement"  # what epsilon bounds: "agreement" with full depth, or "accuracy" lost (gold labels)
    prior: str = "default"  # calibration: a rule learned elsewhere joins the candidates ("default", "none", a folder)
    fit_fraction: float = 0.4  # calibration: the sample's share that chooses the rule (calibrate.DEFAULT_FIT_FRACTION)
    audit_fraction: float = 0.01
    audit_rows: int = 300  # at least this many rows audited (all of a smaller corpus)
    on_drift: str = "full"  # once the online audit shows the promise broken: full, stop or warn
    seed: int = 0
    limit: int | None = None
    overwrite: bool = False
    progress_s: float = 10.0  # seconds between progress lines (job.progress); 0: none


class JobError(ValueError):
    """A problem with the job's inputs or settings, found before any actor starts."""


def parse_actors(spec: str | int) -> int | tuple[int, int]:
    """--actors: the one parser. "N" -> N actors, "MIN,MAX" -> an autoscaling pool."""
    try:
        parts = [int(x) for x in str(spec).split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] >= 1:
        return parts[0]
    if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
        return parts[0], parts[1]
    raise JobError(f"--actors takes N or MIN,MAX (e.g. 4 or 1,8), got {spec!r}")


@dataclass
class CheckedInput:
    """What check_input found: the input's files, their format, which optional columns they have,
    and --actors parsed."""

    files: list[str]
    roots: list[str]  # the input root each file was found under: derived ids are relative to it
    format: str
    present: dict[str, bool]
    actors: int | tuple[int, int]


def check_input(cfg: JobConfig) -> CheckedInput:
    """The preflight's cheap half (milliseconds: paths, columns, flags), run before Ray starts at all."""
    from adainfer_ray.models import DTYPES

    _, files, roots = io.list_files(cfg.input)
    fmt = io.detect_format(files[0], cfg.format)
    required = {"--text-column": cfg.text_column}
    for flag, column in (("--label-column", cfg.label_column), ("--group-column", cfg.group_column)):
        if column:
            required[flag] = column
    present = io.check_columns(files, fmt, required, {"--id-column": cfg.id_column}, cfg.columns)
    actors = parse_actors(cfg.actors)
    checks = [(0 <= cfg.audit_fraction <= 1, "--audit-fraction must be between 0 and 1"),
              (cfg.audit_rows >= 0, "--audit-rows must be at least 0"),
              (cfg.batch_size >= 1, "--batch-size must be at least 1"),
              (cfg.progress_s >= 0, "--progress-every takes seconds (0: no progress lines)"),
              (cfg.limit is None or cfg.limit >= 0, "--limit must be at least 0"),
              (cfg.calibrate >= 0, "--calibrate takes a number of rows (e.g. 2000)"),
              (0 < cfg.epsilon < 1 and 0 < cfg.delta < 1, "--epsilon and --delta must be between 0 and 1"),
              (0 < cfg.fit_fraction < 1, "--fit-fraction must be between 0 and 1 (e.g. 0.4)"),
              (cfg.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
              (cfg.promise in PROMISES, f"--promise must be one of {', '.join(PROMISES)}"),
              # an accuracy promise is calibrated on gold labels: without them there is nothing to measure
              (not (cfg.calibrate and cfg.promise == "accuracy" and not cfg.label_column),
               "--promise accuracy calibrates on gold labels: give --label-column, or use --promise agreement")]
    for ok, message in checks:
        if not ok:
            raise JobError(message)
    return CheckedInput(files, roots, fmt, present, actors)
