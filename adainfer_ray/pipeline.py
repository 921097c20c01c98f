"""The Ray Data job: read -> label -> write, with an optional calibration step inside it.

    files --read_rows--> rows {id, text, gold_label, group, input_error}          (io.read_rows)
          --label------> one output row per input row (schema.OUTPUT_SCHEMA)   (Classifier actors)
          --write------> <output>/*.parquet, <output>/_run.json

`label(ds, ...)` is the public stage for people with a Ray Data pipeline of their own; the job is
that same stage between a reader and a writer. Each Classifier actor loads the model once, then
labels one block of rows per call with the early-exit engine (which regroups the block's items by
depth). Rows are never held across calls, so Ray's retries and lineage cover every row.

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

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from adainfer_ray import io, resume, runstate
from adainfer_ray.schema import OUTPUT_SCHEMA, SIDECAR_NAME

EMBEDDED_CORPUS = Path(__file__).parent / "data" / "reviews.jsonl"
POLICY_SUBDIR = resume.POLICY_SUBDIR  # where --calibrate writes its policy, inside --output
SAMPLE_FILE = "calibration-sample.parquet"  # the calibration sample's output rows, inside --output


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
    actors: str = "1"  # "N" or "MIN,MAX"
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    batch_size: int = 256  # rows per actor call: the engine regroups within it
    max_batch_tokens: int | None = None  # tokens per layer step (engine default: 2048 CPU, 16384 GPU)
    reuse_prefix: bool = True
    calibrate: int = 0  # > 0: calibrate a policy on this many rows of the input first
    epsilon: float = 0.01
    delta: float = 0.05
    audit_fraction: float = 0.01
    audit_rows: int = 300  # at least this many rows audited (all of a smaller corpus)
    seed: int = 0
    limit: int | None = None
    overwrite: bool = False


# -- what the driver resolves once; it travels to the actors as plain objects -----------------------------


def build_task(cfg: JobConfig):
    """The task from the flags, demonstrations read here on the driver (actors get the Task itself)."""
    from adainfer_ray.prompts import make_task

    demos = None
    if cfg.demos:
        import fsspec

        try:
            with fsspec.open(cfg.demos, "r", encoding="utf-8") as f:
                demos = [(d["text"], d["label"]) for d in map(json.loads, filter(str.strip, f))]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise JobError(f"cannot read --demos {cfg.demos}: {type(e).__name__}: {e}; "
                           'expected JSON lines of {"text": ..., "label": ...}') from e
    try:
        return make_task(cfg.task, labels=cfg.labels, template=cfg.template, demos=demos)
    except ValueError as e:  # an unknown task, a template without {text}, demos with unknown labels
        raise JobError(str(e)) from e


def run_precision(device_kind: str, dtype: str) -> str:
    """The dtype actors on `device_kind` will run at ("auto": fp32 on CPU, bf16 on CUDA), as a name."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device_kind == "cuda" else "float32"


def checked_policy(spec: str, model: str, task, model_hash: str, num_layers: int):
    """--policy resolved (policy.resolve_policy) and checked against these weights and this prompt,
    on the driver: the job's preflight and the `label` stage both come here."""
    from adainfer_ray.models import model_id
    from adainfer_ray.policy import resolve_policy

    policy = resolve_policy(spec, model_id(model), task.name)
    policy.check_compatible(model_hash, task.fingerprint(), num_layers)
    return policy


def corpus_audit_rate(cfg: JobConfig, rows: int) -> float:
    """The share of a `rows`-row corpus the job audits: --audit-fraction, or enough for --audit-rows."""
    return max(cfg.audit_fraction, min(1.0, cfg.audit_rows / max(1, rows)))


def audit_mask(ids, fraction: float, seed: int) -> np.ndarray:
    """A seeded, stable sample: the same ids are audited in every run and on every retry."""
    if fraction <= 0:
        return np.zeros(len(ids), bool)
    return uniform_keys(ids, f"{seed}") < fraction


def uniform_keys(ids, salt: str) -> np.ndarray:
    """A number in [0, 1) per id, uniform and fixed by (salt, id): seeded samples that need no state."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{salt}:{i}".encode(), digest_size=8).digest(), "big") / 2**64
                     for i in ids])


def calibration_keys(ids, seed: int) -> np.ndarray:
    """The key that draws the --calibrate sample: the N rows with the smallest keys."""
    return uniform_keys(ids, f"calibrate:{seed}")


def gold_names(values, labels: tuple[str, ...], one_based: bool) -> list:
    """Gold labels as label names: names match case-insensitively; integers are indices (0-based,
    or 1-based as decided once for the whole input). Anything else is kept as given."""
    by_name = {x.lower(): x for x in labels}
    out = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        s = str(v).strip()
        if s.lower() in by_name:
            out.append(by_name[s.lower()])
        elif s.lstrip("-").isdigit() and 0 <= int(s) - one_based < len(labels):
            out.append(labels[int(s) - one_based])
        else:
            out.append(s)
    return out


# -- the actor ---------------------------------------------------------------------------------------


class Classifier:
    """Ray Data callable class: loads the model once, then maps a batch of rows to output rows.

    trace=True runs every row at full depth and adds each layer's exit features (calibration);
    the output rows are the same either way.
    """

    def __init__(self, cfg: JobConfig, task, policy, threads: int | None = None, trace: bool = False,
                 audit_rate: float = 0.0, gold_one_based: bool = False, text_column: str = "text",
                 id_column: str | None = "id", keep_columns: tuple = (), run_state=None):
        runstate.mark(run_state, "actor_start")  # the run's timeline (_run.json): where start-up time goes
        import torch

        from adainfer_ray.engine import EarlyExitEngine
        from adainfer_ray.models import load_model
        from adainfer_ray.policy import ExitPolicy
        from adainfer_ray.prompts import PromptEncoder

        if threads:  # CPU actors share the node's cores
            torch.set_num_threads(threads)
        self.cfg, self.task, self.trace = cfg, task, trace
        self.audit_rate, self.gold_one_based = audit_rate, gold_one_based
        self.text_column, self.id_column, self.keep_columns = text_column, id_column, tuple(keep_columns)
        self.lm = load_model(cfg.model, cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        self.encoder = PromptEncoder(task, self.lm.tokenizer, self.lm.max_context)
        policy = ExitPolicy.full_depth() if trace else policy
        policy.check_compatible(self.lm.model_hash, task.fingerprint(), self.lm.num_layers)
        self.engine = EarlyExitEngine(self.lm, self.encoder.label_token_ids, policy, self.encoder.prefix_ids,
                                      reuse_prefix=cfg.reuse_prefix, max_batch_tokens=cfg.max_batch_tokens)
        self.run_state = run_state  # where this actor ran, and poison rows that end (runstate.py)
        runstate.register_actor(run_state)
        runstate.mark(run_state, "actor_ready")
        self.calls = 0

    @classmethod
    def from_config(cls, cfg: JobConfig, **kwargs) -> "Classifier":
        """An actor's worth of labeling in this process (tests, notebooks): task and policy from cfg."""
        from adainfer_ray.models import model_id
        from adainfer_ray.policy import resolve_policy

        task = build_task(cfg)
        return cls(cfg, task, resolve_policy(cfg.policy, model_id(cfg.model), task.name), **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self.calls += 1
        crash_after = os.environ.get("ADAINFER_CRASH_AFTER_BATCHES")  # reliability tests kill actors this way
        if crash_after and self.calls > int(crash_after):
            os._exit(1)
        n = len(batch[self.text_column])
        ids = ([str(x) for x in batch[self.id_column]] if self.id_column in batch
               else [hashlib.blake2b(str(t).encode(), digest_size=8).hexdigest() for t in batch[self.text_column]])
        errors = [e if isinstance(e, str) else None for e in batch.get("input_error", [None] * n)]
        texts = [t if isinstance(t, str) else None for t in batch[self.text_column]]
        for i, t in enumerate(texts):
            if errors[i] is None and t is None:
                errors[i] = "text is null" if batch[self.text_column][i] is None else "text is not a string"
            elif errors[i] is None and not t.strip():
                errors[i] = "text is empty"
        rows = _empty_rows(n, self.lm.num_layers)
        traces = [None] * n  # trace mode: each row's per-layer features

        def run(at: list[int]):  # label (or trace) the rows `at` of this batch
            runstate.crash_drill([texts[i] for i in at])
            encoded = self.encoder.encode([texts[i] for i in at])
            if self.trace:
                self._trace(encoded, at, rows, traces)
            else:
                self._label(encoded, at, [ids[i] for i in at], rows, errors)

        ok = [i for i in range(n) if errors[i] is None]
        if ok:  # a retried block runs row by row, so that a row that kills the actor ends as an error row
            runstate.label_block(self.run_state, ids, ok, errors, run)
        rows["id"] = np.array(ids, dtype=object)
        gold = batch.get("gold_label", [None] * n)
        rows["gold_label"] = np.array(gold_names(gold, self.task.labels, self.gold_one_based), dtype=object)
        rows["calibration"] = np.full(n, self.trace)
        rows["error"] = np.array(errors, dtype=object)
        table = to_output_table(rows)
        for name in self.keep_columns:  # label(): the caller's own columns ride along
            table = table.append_column(name, pa.array(list(batch[name])))
        if self.trace:
            for key in TRACE_FEATURES + ("item_tokens",):  # one list per row, null where a row has no trace
                table = table.append_column("trace_" + key, _list_column([tr and tr[key] for tr in traces]))
        if self.calls == 1:  # the run keeps the earliest of its actors' first batches: first_labels_s
            runstate.mark(self.run_state, "first_labels")
        runstate.mark(self.run_state, "last_labels", last=True)  # labeling time: actor_ready to last_labels
        return table

    def _label(self, encoded, where, ids, rows, errors):
        """Run the engine on the good rows; if the block fails as a whole, retry item by item so
        that one poisonous row becomes one error row."""
        audit = audit_mask(ids, self.audit_rate, self.cfg.seed)
        try:
            started = time.perf_counter()
            out = self.engine.classify(encoded.item_ids, audit)
            runstate.add_engine_time(self.run_state, time.perf_counter() - started)
            parts = [(np.arange(len(where)), out)]
        except Exception:  # noqa: BLE001 - isolate the culprit below
            parts = []
            for j in range(len(where)):
                try:
                    parts.append((np.array([j]), self.engine.classify([encoded.item_ids[j]], audit[j: j + 1])))
                except Exception as e:  # noqa: BLE001
                    errors[where[j]] = f"labeling failed: {type(e).__name__}: {e}"[:500]
        for js, out in parts:
            self._fill(rows, np.array(where)[js], out, np.array(encoded.truncated)[js])

    def _trace(self, encoded, where, rows, traces):
        """Full depth with every layer's exit features: fill the output rows (the full model's answer,
        at full depth) and keep each row's trace. The exit heads' own FLOPs are not counted here."""
        from adainfer_ray.flops import item_flops

        tr = self.engine.trace(encoded.item_ids)
        L, P = self.lm.num_layers, len(self.encoder.prefix_ids)
        flops = [item_flops(self.engine.dims, P, len(x), L, "none", len(self.task.labels), 1, self.cfg.reuse_prefix)
                 for x in encoded.item_ids]
        out = {"label": tr["final_label"], "label_score": tr["label_top"][:, -1], "exit_layer": np.full(len(where), L),
               "full_label": tr["final_label"], "num_tokens": np.array([P + len(x) for x in encoded.item_ids]),
               **{"flops_" + k: np.array([f[k] for f in flops]) for k in ("used", "full", "full_reuse")}}
        self._fill(rows, np.array(where), out, np.array(encoded.truncated))
        for j, i in enumerate(where):
            traces[i] = {**{key: tr[key][j] for key in TRACE_FEATURES},
                         "item_tokens": np.array([len(encoded.item_ids[j])])}

    def _fill(self, rows, at, out, truncated):
        labels = np.array(self.task.labels, dtype=object)
        rows["label"][at] = labels[out["label"]]
        rows["label_score"][at] = out["label_score"]
        rows["exit_layer"][at] = out["exit_layer"]
        rows["flops_used"][at], rows["flops_full"][at] = out["flops_used"], out["flops_full"]
        full, reuse = out["flops_full"], out["flops_full_reuse"]
        rows["compute_saved"][at] = 1 - out["flops_used"] / full
        rows["exit_saved"][at] = (reuse - out["flops_used"]) / full
        rows["prefix_saved"][at] = (full - reuse) / full
        rows["num_tokens"][at] = out["num_tokens"]
        rows["truncated"][at] = truncated
        audited = out["full_label"] >= 0
        rows["full_label"][at[audited]] = labels[out["full_label"][audited]]


def _list_column(values: list) -> pa.Array:
    """One float32 list per row from numpy arrays (flattened), null where a value is None."""
    sizes = [0 if v is None else v.size for v in values]
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    present = [v.ravel().astype(np.float32) for v in values if v is not None]
    flat = pa.array(np.concatenate(present) if present else np.zeros(0, np.float32))
    return pa.ListArray.from_arrays(offsets, flat, mask=pa.array([v is None for v in values]))


# The per-layer exit features a trace holds ([L] per row; hidden: [L, D]), as the engine's trace names them.
TRACE_FEATURES = ("hidden", "vocab_label", "vocab_top", "vocab_gap", "label_label", "label_top", "label_gap")


def _empty_rows(n: int, num_layers: int) -> dict[str, np.ndarray]:
    nan = np.full(n, np.nan)
    return {"label": np.full(n, None, dtype=object), "label_score": np.full(n, np.nan, np.float32),
            "exit_layer": np.full(n, None, dtype=object), "num_layers": np.full(n, num_layers, np.int32),
            "flops_used": nan.copy(), "flops_full": nan.copy(), "compute_saved": nan.copy(),
            "exit_saved": nan.copy(), "prefix_saved": nan.copy(), "num_tokens": np.full(n, None, dtype=object),
            "truncated": np.zeros(n, bool), "full_label": np.full(n, None, dtype=object)}


def to_output_table(rows: dict[str, np.ndarray]) -> pa.Table:
    """Typed exactly as OUTPUT_SCHEMA, nulls where a row failed."""
    cols = []
    for f in OUTPUT_SCHEMA:
        v = rows[f.name]
        if pa.types.is_floating(f.type):
            cols.append(pa.array(v, f.type, mask=np.isnan(np.asarray(v, np.float64))))
        else:
            cols.append(pa.array(list(v), f.type))
    return pa.table(cols, schema=OUTPUT_SCHEMA)


# -- the driver --------------------------------------------------------------------------------------


class JobError(ValueError):
    """A problem with the job's inputs or settings, found before any actor starts."""


def parse_actors(spec: str) -> int | tuple[int, int]:
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
class Plan:
    """What the driver resolved before any actor starts; actors receive these objects, never paths."""

    files: list[str]
    roots: list[str]  # the input root each file was found under: derived ids are relative to it
    format: str
    has_id_column: bool
    task: object  # prompts.Task
    policy: object  # policy.ExitPolicy
    model_id: str
    model_hash: str
    num_layers: int
    dims: object  # flops.ModelDims
    prefix_tokens: int
    gold_one_based: bool
    embedded_rows: list | None = field(default=None, repr=False)  # the embedded corpus, read here


@dataclass
class CheckedInput:
    """What check_input found: the input's files, their format and which optional columns they have."""

    files: list[str]
    roots: list[str]
    format: str
    present: dict[str, bool]


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
    parse_actors(cfg.actors)
    checks = [(0 <= cfg.audit_fraction <= 1, "--audit-fraction must be between 0 and 1"),
              (cfg.audit_rows >= 0, "--audit-rows must be at least 0"),
              (cfg.batch_size >= 1, "--batch-size must be at least 1"),
              (cfg.limit is None or cfg.limit >= 0, "--limit must be at least 0"),
              (cfg.calibrate >= 0, "--calibrate takes a number of rows (e.g. 2000)"),
              (0 < cfg.epsilon < 1 and 0 < cfg.delta < 1, "--epsilon and --delta must be between 0 and 1"),
              (cfg.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}")]
    for ok, message in checks:
        if not ok:
            raise JobError(message)
    return CheckedInput(files, roots, fmt, present)


def preflight(cfg: JobConfig, log=print, checked: CheckedInput | None = None) -> Plan:
    """Every check that can fail fast runs here, on the driver, before Ray starts any actor. What is
    wrong with the user's input or settings is raised as one of the errors jobs/*.py print as one
    line (JobError, io.InputError, PolicyError, UnsupportedModelError, FileNotFoundError).
    `checked`: check_input's result, when it ran already."""
    checked = checked or check_input(cfg)
    files, roots, fmt, present = checked.files, checked.roots, checked.format, checked.present

    from transformers import AutoConfig, AutoTokenizer  # after the cheap checks: importing torch takes seconds

    from adainfer_ray.flops import ModelDims
    from adainfer_ray.models import UnsupportedModelError, family_of, model_fingerprint, model_id, resolve_model_dir
    from adainfer_ray.policy import ExitPolicy, PolicyError
    from adainfer_ray.prompts import PromptEncoder

    model_dir = resolve_model_dir(cfg.model)
    for name in ("config.json", "tokenizer_config.json"):
        try:
            meta = json.loads((model_dir / name).read_text()) if (model_dir / name).exists() else {}
        except ValueError as e:
            raise UnsupportedModelError(f"{model_dir / name} is not valid JSON ({e}): is --model a Hugging Face "
                                        "model folder?") from e
        # A model folder can name its own Python classes (auto_map); loading them would run its code.
        if meta.get("auto_map") and not cfg.trust_remote_code:
            raise UnsupportedModelError(f"model {cfg.model} asks to run its own Python code (auto_map in {name}): "
                                        "refused; pass --trust-remote-code only if you trust its source")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    family_of(config.model_type)
    config = config.get_text_config()  # the decoder's own settings (Gemma 3 with vision nests them)
    task = build_task(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        encoder = PromptEncoder(task, tokenizer, limit)
    except (OSError, ValueError) as e:  # no tokenizer, verbalizers sharing a token, a prefix too long...
        raise JobError(str(e)) from e
    dims = ModelDims.from_config(config)
    model_hash = model_fingerprint(model_dir)
    if cfg.calibrate:
        policy = ExitPolicy.full_depth()  # calibrate_policy makes the real one (or finds it on resume)
    else:
        policy = checked_policy(cfg.policy, cfg.model, task, model_hash, dims.layers)
    if cfg.calibrate and cfg.policy not in ("default", "full"):
        raise PolicyError("--calibrate makes its own policy: leave out --policy (or use jobs/calibrate.py "
                          "once and --policy FOLDER for later runs)")
    io.check_writable(cfg.output)
    embedded = None
    if cfg.input == str(EMBEDDED_CORPUS) or cfg.input.startswith("memory://"):
        # The embedded corpus and memory:// live on this machine only: read here, hand the rows to Ray.
        embedded = [t for f, r in zip(files, roots) for t in _read_file(f, r, fmt, cfg, present["--id-column"])]
    return Plan(files=files, roots=roots, format=fmt, has_id_column=present["--id-column"], task=task, policy=policy,
                model_id=model_id(cfg.model), model_hash=model_hash, num_layers=dims.layers, dims=dims,
                prefix_tokens=len(encoder.prefix_ids),
                gold_one_based=_gold_is_one_based(files, fmt, cfg, task) if cfg.label_column else False,
                embedded_rows=embedded)


def _gold_is_one_based(files, fmt, cfg, task, peek: int = 2000) -> bool:
    """Integer gold labels are 0-based unless the first rows use 1..num_labels and never 0 (AG News)."""
    values = []
    for table in io.read_rows(files[0], fmt, cfg.text_column, None, cfg.label_column, columns=cfg.columns):
        values += [v for v in table.column("gold_label").to_pylist() if v is not None]
        if len(values) >= peek:
            break
    ints = [int(v) for v in values if v.strip().lstrip("-").isdigit()]
    return bool(ints) and len(ints) == len(values) and min(ints) >= 1 and max(ints) == len(task.labels)


def _warn_on_precision(policy, device_kind: str, dtype: str, log) -> None:
    """A policy is calibrated at one precision; exit decisions at another can differ a little."""
    promise = policy.promise
    if not promise or not promise.get("dtype"):
        return
    now = run_precision(device_kind, dtype)
    if promise["dtype"] != now:
        log(f"warning: this policy was calibrated at {promise['dtype']} on {promise.get('device')}, and this run "
            f"computes in {now}: exits can differ slightly from what calibration measured (use --dtype "
            f"{promise['dtype']}, or calibrate at this precision with --calibrate N)")


def init_ray():
    import ray

    if not ray.is_initialized():
        # Inside `ray job submit` RAY_ADDRESS points at the cluster; otherwise start a local Ray.
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, include_dashboard=False)
    return ray


def starts_local_ray() -> bool:
    """Whether init_ray will start a Ray of its own here (rather than join one: RAY_ADDRESS, or this
    process already connected)."""
    import ray

    return not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")


def preflight_and_init_ray(cfg: JobConfig, log=print, timeline: dict | None = None, then=None):
    """The preflight, and Ray ready: (plan, ray, then(plan)). `then` runs right after the preflight,
    before Ray is joined (the job's resume checks: a refused rerun never reaches a cluster either);
    `timeline` gets the time the preflight and Ray were done.

    Starting a local Ray is mostly waiting on the processes it spawns (about 4 s on an idle 2-core
    machine); the preflight is mostly importing torch and transformers and loading the tokenizer
    (about 3 s). When this process starts its own Ray the two run at once: the preflight in a
    thread, ray.init in the main thread, where it installs its SIGTERM handler (from another
    thread Ray warns and skips it). The cheap checks run first, so a wrong path, column or flag
    never starts Ray; a preflight that fails later shuts down the Ray it overlapped with before
    its one-line error is raised. When joining a cluster (RAY_ADDRESS, `ray job submit`) the
    preflight runs first, as before: connecting is quick, and a wrong setting never reaches it.
    (Importing ray.data in the thread too was tried: Ray Data then warned of "no available CPUs"
    at the end of 2 runs in 3, so it is imported where it is used.)"""
    import threading

    timeline = {} if timeline is None else timeline
    checked = check_input(cfg)
    then = then or (lambda plan: None)
    outcome = {}

    def work():
        try:
            outcome["plan"] = preflight(cfg, log, checked)
            outcome["after"] = then(outcome["plan"])
            timeline["preflight_done"] = time.time()
        except BaseException as e:  # noqa: BLE001 - raised again in the main thread, below
            outcome["error"] = e

    own_ray = starts_local_ray()
    thread = threading.Thread(target=work, name="adainfer-preflight", daemon=True)
    thread.start()
    if not own_ray:  # joining a cluster: the preflight first, so that a wrong setting never reaches it
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
    ray = init_ray()
    timeline["ray_ready"] = time.time()
    thread.join()
    if "error" in outcome:  # only a Ray of our own can be here: shut it down before the one-line error
        ray.shutdown()
        raise outcome["error"]
    return outcome["plan"], ray, outcome["after"]


@dataclass
class Resources:
    """How the model actors are placed, decided once from the cluster."""

    gpus_per_actor: float
    actors: int | tuple[int, int]
    threads: int | None  # torch threads per CPU actor: the node's cores shared by the actors on it

    @property
    def device_kind(self) -> str:
        return "cuda" if self.gpus_per_actor else "cpu"

    @property
    def max_actors(self) -> int:
        return self.actors if isinstance(self.actors, int) else self.actors[1]


def plan_resources(cfg: JobConfig, ray) -> Resources:
    total = ray.cluster_resources()
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if total.get("GPU", 0) > 0 else 0.0)
    actors = parse_actors(cfg.actors)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = min((int(n["Resources"].get("CPU", 1)) for n in nodes), default=1)
    per_node = math.ceil((actors if isinstance(actors, int) else actors[1]) / max(1, len(nodes)))
    return Resources(gpus, actors, None if gpus else max(1, node_cpus // per_node))


def _read_file(path: str, root: str, fmt: str, cfg: JobConfig, has_id_column: bool):
    """One input file as tables of io.INPUT_SCHEMA: the one reader every step uses."""
    return io.read_rows(path, fmt, cfg.text_column, cfg.id_column if has_id_column else None,
                        cfg.label_column, cfg.group_column, cfg.columns, root=root)


def _read_files(batch, fmt, cfg, has_id_column, done=None):
    """Rows of each file in the batch, less those an earlier run already wrote (`done`)."""
    for path, root in zip(batch["path"], batch["root"]):
        for table in _read_file(str(path), str(root), fmt, cfg, has_id_column):
            yield resume.drop_done(table, done) if done is not None else table


# Blocks of at most this many bytes: a large file then streams to the actors as many blocks (Ray
# Data's default, 128 MiB, would make a 100 MB JSONL file one block: one actor, no progress shown).
BLOCK_BYTES = 4 << 20


def read_dataset(cfg: JobConfig, plan: Plan, ray, done=None):
    """The input as a Ray Dataset of io.INPUT_SCHEMA rows, less the ids in `done` (sorted id_keys).
    --limit counts the input's first rows before done ones are dropped, so that a resumed or
    calibrated run labels the same rows as one that ran straight through."""
    ray.data.DataContext.get_current().target_max_block_size = BLOCK_BYTES
    done_ref = ray.put(done) if done is not None and len(done) else None
    drop_while_reading = done_ref if cfg.limit is None else None  # cheapest: never ship a done row
    if plan.embedded_rows is not None:
        tables = [resume.drop_done(t, drop_while_reading) if drop_while_reading is not None else t
                  for t in plan.embedded_rows]
        ds = ray.data.from_arrow(tables or [io.INPUT_SCHEMA.empty_table()])
    else:
        # One read task per file. Half a CPU each (reading is light) also keeps Ray Data from fusing
        # the reads into the model actors, where one actor call would get a bundle of up to
        # --batch-size files: one actor reading everything, and a crash rerunning all of it.
        items = [{"path": f, "root": r} for f, r in zip(plan.files, plan.roots)]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _read_files, batch_size=1, batch_format="numpy", num_cpus=0.5,
            fn_kwargs=dict(fmt=plan.format, cfg=cfg, has_id_column=plan.has_id_column, done=drop_while_reading))
    if cfg.limit is not None:
        ds = ds.limit(cfg.limit)
        if done_ref is not None:
            ds = ds.map_batches(resume.drop_done, fn_args=(done_ref,), batch_format="pyarrow", num_cpus=0.5)
    return ds


def _map_classifier(ds, cfg: JobConfig, task, policy, res: Resources, **actor_kwargs):
    """The one place model actors are started: labeling, tracing and the public `label` stage."""
    import ray

    # The actors get this driver's ADAINFER_* settings (the model cache, the crash drill in
    # Classifier): on a cluster started elsewhere, workers inherit `ray start`'s environment instead.
    env = {k: v for k, v in os.environ.items() if k.startswith("ADAINFER_")}
    pool = ray.data.ActorPoolStrategy(size=res.actors) if isinstance(res.actors, int) else \
        ray.data.ActorPoolStrategy(min_size=res.actors[0], max_size=res.actors[1])
    return ds.map_batches(
        Classifier, fn_constructor_kwargs={"cfg": cfg, "task": task, "policy": policy, "threads": res.threads,
                                           **actor_kwargs},
        batch_size=cfg.batch_size, batch_format="numpy", compute=pool,
        num_gpus=res.gpus_per_actor, num_cpus=None if res.gpus_per_actor else 1,
        runtime_env={"env_vars": env} if env else None,
        # No retry settings needed: Ray Data restarts a dead actor and runs the blocks it held again.
    )


def label(ds, *, text_column: str = "text", id_column: str | None = None, task: str = "sentiment",
          labels: list[str] | None = None, template: str | None = None, model: str = "smollm2-135m",
          policy: str = "default", device: str = "auto", dtype: str = "auto", actors: str | int = 1,
          gpus_per_actor: float | None = None, batch_size: int = 256, audit_fraction: float = 0.01,
          seed: int = 0, trust_remote_code: bool = False):
    """Early-exit labeling as one stage of your own Ray Data pipeline: returns `ds` with the output
    columns (schema.OUTPUT_SCHEMA: label, exit_layer, compute_saved, ...) added to its own.

        ds = ray.data.read_parquet("s3://bucket/reviews/")
        ds = adainfer_ray.label(ds, text_column="body", id_column="review_id")
        ds.write_parquet("s3://bucket/labels/")

    `policy`: "default" (shipped for the default model and built-in tasks), "full", or a folder
    from jobs/calibrate.py. Without `id_column`, the audit sample is drawn by text.
    """

    from transformers import AutoConfig

    from adainfer_ray.models import model_fingerprint, resolve_model_dir

    cfg = JobConfig(text_column=text_column, id_column=id_column or "", task=task, labels=labels, template=template,
                    model=model, policy=policy, device=device, dtype=dtype, actors=str(actors),
                    gpus_per_actor=gpus_per_actor, batch_size=batch_size, audit_fraction=audit_fraction, seed=seed,
                    trust_remote_code=trust_remote_code)
    the_task = build_task(cfg)
    model_dir = resolve_model_dir(model)
    num_layers = AutoConfig.from_pretrained(model_dir).get_text_config().num_hidden_layers
    exit_policy = checked_policy(policy, model, the_task, model_fingerprint(model_dir), num_layers)
    clash = set(OUTPUT_SCHEMA.names)
    keep = [c for c in ds.columns() if c not in clash]
    return _map_classifier(ds, cfg, the_task, exit_policy, plan_resources(cfg, init_ray()), audit_rate=audit_fraction,
                           text_column=text_column, id_column=id_column, keep_columns=keep)


# -- calibration inside the job -----------------------------------------------------------------------


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
    `folder` (local or fsspec). Used by `classify --calibrate N` and by jobs/calibrate.py."""
    import adainfer_ray
    from adainfer_ray import calibrate as cal
    from adainfer_ray.calibration_report import write_report

    t0 = time.perf_counter()
    ds = read_dataset(cfg, plan, ray)
    cutoff, seen = draw_sample_cutoff(ds, size, cfg.seed)
    log(f"calibration: tracing a seeded random sample of {min(size, seen)} of {seen} rows at full depth "
        "(every layer's exit features)...")
    sample = ds.map_batches(_in_sample, fn_kwargs={"seed": cfg.seed, "cutoff": cutoff}, batch_format="numpy")
    traced = _map_classifier(sample, cfg, plan.task, plan.policy, res, trace=True, run_state=run_state,
                             gold_one_based=plan.gold_one_based, keep_columns=("group",))
    outputs, parts = [], []
    for batch in traced.iter_batches(batch_format="pyarrow", batch_size=None):
        outputs.append(batch.select(OUTPUT_SCHEMA.names))
        keep = batch.column("trace_item_tokens").is_valid().to_numpy(zero_copy_only=False)
        parts.append({"gold": np.array(batch.column("gold_label").to_pylist(), dtype=object)[keep],
                      "group": np.array(batch.column("group").to_pylist(), dtype=object)[keep],
                      **{k: _trace_column(batch.column("trace_" + k).filter(pa.array(keep)), plan.num_layers)
                         for k in TRACE_FEATURES + ("item_tokens",)}})
    sample_rows = pa.concat_tables(outputs) if outputs else OUTPUT_SCHEMA.empty_table()
    trace = {k: np.concatenate([p[k] for p in parts]) for k in TRACE_FEATURES + ("item_tokens",)} if parts else {}
    if not trace or not len(trace["item_tokens"]):
        raise JobError("the calibration sample holds no row that could be labeled: check --input and --text-column")
    for key in ("vocab_label", "label_label", "item_tokens"):
        trace[key] = trace[key].astype(np.int64)
    trace["final_label"] = trace["label_label"][:, -1]
    labels = {name: i for i, name in enumerate(plan.task.labels)}
    gold = np.array([labels.get(g, -1) for p in parts for g in p["gold"]])
    groups = np.concatenate([p["group"] for p in parts]) if cfg.group_column else None
    log(f"calibration: traced {len(gold)} rows in {time.perf_counter() - t0:.0f} s; fitting and testing exit rules...")
    device_kind = res.device_kind
    provenance = {
        "model_id": plan.model_id, "model_hash": plan.model_hash, "num_layers": plan.num_layers,
        "task": plan.task.name, "task_fingerprint": plan.task.fingerprint(), "template": plan.task.template,
        "labels": list(plan.task.labels), "verbalizers": list(plan.task.verbalizers),
        "dtype": run_precision(device_kind, cfg.dtype), "device": device_kind,
        "input": cfg.input, "sample_seed": cfg.seed, "rows_in_input": seen, "group_column": cfg.group_column,
        "actor_nodes": ray.get(run_state.actor_nodes.remote()) if run_state is not None else None,
        "created_by": command or "adainfer_ray.pipeline.calibrate_policy",
        "adainfer_ray_version": adainfer_ray.__version__,
    }
    result = cal.calibrate(trace, plan.dims, plan.prefix_tokens, len(plan.task.labels), epsilon=cfg.epsilon,
                           delta=cfg.delta, seed=cfg.seed, gold=gold if (gold >= 0).any() else None,
                           groups=groups, provenance=provenance, log=lambda m: log("  " + m))
    result.policy.save(folder)
    with tempfile.TemporaryDirectory() as tmp:  # the report is local files; copy them next to the policy
        write_report(result, tmp)
        fs, root = io.output_fs(folder)
        fs.put(tmp + "/", posixpath.join(root, "report") + "/", recursive=True)
    log(f"calibration: policy and report written to {folder}")
    return Calibration(result.policy, folder, result, sample_rows, seen)


def _trace_column(column, num_layers: int) -> np.ndarray:
    """A trace column (one list per row, all of one length) back to numpy: [n, L] per-layer values,
    [n, L, D] hidden states, [n] item token counts."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = column.flatten().to_numpy(zero_copy_only=False)
    n = len(column)
    if n == 0 or len(values) == n:  # one value per row
        return values
    per_layer = values.reshape(n, num_layers, -1)
    return per_layer[..., 0] if per_layer.shape[-1] == 1 else per_layer


# -- the job ------------------------------------------------------------------------------------------


def run_classify(cfg: JobConfig, log=print, started_at: float | None = None) -> dict:
    """Run the whole job; returns the run record that is also written as the sidecar.

    started_at: when the command started (time.time()), so that wall_s and the start-up timeline
    count what the user waits for, imports included; default: now."""
    from adainfer_ray import report

    started_at = time.time() if started_at is None else started_at
    started = datetime.fromtimestamp(started_at, timezone.utc)
    timeline = {}  # when the driver's steps were done (the actors report theirs to the run state)

    def who_writes(plan):
        # Who writes this output: a rerun that would mix labels of two kinds is refused (resume.py), before
        # Ray as far as the flags tell: the dtype waits for the cluster, a --calibrate policy for calibration.
        identity = {"model_hash": plan.model_hash, "task_fingerprint": plan.task.fingerprint()}
        if not cfg.calibrate:
            identity["policy_fingerprint"] = resume.policy_fingerprint(plan.policy)
        return identity, resume.check_same_run(cfg.output, identity, cfg.overwrite, log)

    own_ray = starts_local_ray()
    plan, ray, (identity, previous) = preflight_and_init_ray(cfg, log, timeline, then=who_writes)
    try:
        res = plan_resources(cfg, ray)
        identity["dtype"] = run_precision(res.device_kind, cfg.dtype)
        resume.refuse_other_run(cfg.output, previous, identity)
    except BaseException:
        if own_ray:  # a refused run leaves no Ray behind either
            ray.shutdown()
        raise
    if not plan.has_id_column:
        log(f"no column {cfg.id_column!r} in the input: ids are derived as <file path under --input>:<row number>")
    state = runstate.start(f"{started:%Y%m%dT%H%M%S}-{os.getpid()}")
    calibration, rows_seen = None, None
    if cfg.calibrate:
        calibration = _calibrate_or_resume(cfg, plan, ray, res, previous, state, log)
        plan = replace(plan, policy=calibration.policy)
        rows_seen = calibration.rows_seen
    else:
        _warn_on_precision(plan.policy, res.device_kind, cfg.dtype, log)
    if cfg.calibrate:  # the policy is known now: the same refusal as above, for it
        identity["policy_fingerprint"] = resume.policy_fingerprint(plan.policy)
        resume.check_same_run(cfg.output, identity, False, log)
    done = resume.done_ids(cfg.output, log)
    if calibration is not None and calibration.sample is not None:
        log(f"calibration: the sample's {len(calibration.sample)} rows are written; labeling the other rows")
    elif len(done):
        log(f"resuming: {len(done)} rows already in {cfg.output} are kept and not labeled again")
    runs = resume.start_record(cfg.output, previous, identity, {"start_time": started.isoformat(),
                                                                "device": res.device_kind})
    if rows_seen is None:  # the audit's size needs the corpus size: an estimate is enough
        rows_seen = (sum(len(t) for t in plan.embedded_rows) if plan.embedded_rows is not None
                     else io.estimate_rows(plan.files, plan.format))
        rows_seen = min(rows_seen, cfg.limit) if cfg.limit is not None else rows_seen
    audit_rate = 0.0 if plan.policy.never_exits else corpus_audit_rate(cfg, rows_seen)
    ds = read_dataset(cfg, plan, ray, done)
    ds = _map_classifier(ds, cfg, plan.task, plan.policy, res, audit_rate=audit_rate,
                         gold_one_based=plan.gold_one_based, run_state=state)
    _write(ds, cfg.output, started)
    if not io.output_files(cfg.output):  # no rows at all: still leave a table that every reader can open
        io.write_parquet(cfg.output, "empty.parquet", OUTPUT_SCHEMA.empty_table())
    wall = time.time() - started_at
    actor_nodes, engine_s, marks = ray.get([state.actor_nodes.remote(), state.engine_seconds.remote(),
                                            state.marks.remote()])
    ray.kill(state)
    # Seconds from the command's start to each step: where the start-up goes, and the labeling's span.
    timeline = {f"{event}_s": at - started_at
                for event, at in sorted({**timeline, **marks}.items(), key=lambda item: item[1])}
    first_labels_s = timeline.get("first_labels_s")  # None when no row needed labeling
    summary = report.summarize_run([cfg.output])
    if summary["rows"] == 0:
        log(f"the input holds no rows: {cfg.output} holds an empty table (empty.parquet) and {SIDECAR_NAME}")
    elif len(done) and summary["rows"] == len(done) and calibration is None:
        log("nothing left to label: every input row was already in the output")
    policy = plan.policy
    fresh_sample = calibration.sample if calibration is not None and calibration.sample is not None else None
    resumed = len(done) - (len(fresh_sample) if fresh_sample is not None else 0)  # this run wrote the sample
    this_run = {**runs[-1], "end_time": datetime.now(timezone.utc).isoformat(), "wall_s": wall,
                "rows_this_run": summary["rows"] - resumed, "gpu_name": _gpu_name() if res.gpus_per_actor else None,
                "num_gpus": res.gpus_per_actor * res.max_actors, "num_actors": cfg.actors, "max_actors": res.max_actors,
                "engine_s": engine_s, "actor_nodes": actor_nodes, "first_labels_s": first_labels_s,
                "timeline": timeline}
    record = {
        **identity, "runs": runs[:-1] + [this_run], "actor_nodes": actor_nodes,
        "model": plan.model_id, "policy": calibration.folder if calibration else cfg.policy,
        "num_layers": plan.num_layers, "policy_features": policy.features, "policy_metadata": policy.metadata,
        "promise": policy.promise, "task": plan.task.to_dict(), "template": plan.task.template,
        "labels": list(plan.task.labels), "flags": asdict(cfg), "ray_version": ray.__version__,
        "device": res.device_kind, "gpu_name": this_run["gpu_name"], "num_gpus": this_run["num_gpus"],
        "num_actors": cfg.actors, "max_actors": res.max_actors, "engine_s": engine_s, "audit_rate": audit_rate,
        "first_labels_s": first_labels_s, "start_time": started.isoformat(),
        "end_time": this_run["end_time"], "wall_s": wall, "rows_this_run": this_run["rows_this_run"],
        "resumed_rows": resumed, "rows": summary["rows"], "errors": summary["error_rows"],
        "rows_per_s": this_run["rows_this_run"] / wall if wall else None, "output": cfg.output, "summary": summary,
    }
    record["verdict"] = summary["verdict"] = report.run_verdict(summary, policy.promise)
    io.write_json(cfg.output, SIDECAR_NAME, record)
    return record


def _calibrate_or_resume(cfg: JobConfig, plan: Plan, ray, res: Resources, previous: dict | None, state,
                         log) -> Calibration:
    """--calibrate: reuse the policy an earlier run of this output calibrated, or make it now and
    write the sample's rows (labeled at full depth while tracing: no extra cost)."""
    from adainfer_ray.policy import ExitPolicy

    fs, root = io.output_fs(cfg.output)
    folder = cfg.output.rstrip("/") + "/" + POLICY_SUBDIR
    calibrated = fs.exists(posixpath.join(root, POLICY_SUBDIR, "policy.json"))
    if previous is not None and not calibrated:
        raise resume.ResumeError(f"--output {cfg.output} holds labels made without --calibrate: pick another "
                                 "--output, or pass --overwrite to replace them")
    if calibrated:
        policy = ExitPolicy.load(folder)
        policy.check_compatible(plan.model_hash, plan.task.fingerprint(), plan.num_layers)
        log(f"resuming: reusing the policy calibrated by the earlier run in {folder}")
        return Calibration(policy, folder, None, None, int(policy.metadata.get("rows_in_input") or 0) or None)
    calibration = calibrate_policy(cfg, plan, ray, res, folder, cfg.calibrate, log, run_state=state)
    io.write_parquet(cfg.output, SAMPLE_FILE, calibration.sample)
    return calibration


def _write(ds, output: str, started: datetime) -> None:
    out_fs, out_root = io.output_fs(output)
    if "memory" in (out_fs.protocol if isinstance(out_fs.protocol, tuple) else (out_fs.protocol,)):
        import pyarrow.parquet as pq  # memory:// lives in this process only: write from here

        for k, batch in enumerate(ds.iter_batches(batch_format="pyarrow", batch_size=None)):
            with out_fs.open(f"{out_root.rstrip('/')}/part-{started:%Y%m%dT%H%M%S}-{k:05d}.parquet", "wb") as f:
                pq.write_table(batch, f)
    else:
        ds.write_parquet(output)


def _gpu_name():
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None
