"""The Ray Data job: read -> map_batches(Classifier actors) -> write_parquet, plus a JSON sidecar.

    files --read_rows--> rows {id, text, gold_label, input_error}
          --Classifier--> one output row per input row (schema.OUTPUT_SCHEMA)
          --write_parquet--> <output>/*.parquet, <output>/_run.json

Each actor loads the model, the exit policy and the shared-prefix cache once, then labels one block
of rows per call with the early-exit engine (which regroups the block's items by depth). Rows are
never held across calls, so Ray's retries and lineage cover every row: a crashed actor's block is
simply run again by its replacement.

What the job promises (the README's "What the job guarantees" is the user's version):
- one output row per input row: a row that cannot be labeled gets `error` set and `label` null;
- everything that can be checked before the run (paths, columns, model, policy, output) fails fast,
  on the driver, before any actor starts;
- re-running the same command over the same --output resumes: rows in readable output files are
  kept and not labeled again; what may be deleted, and which runs may continue an output, is
  adainfer_ray.resume's to decide;
- a row that kills its actor every time ends as an error row (adainfer_ray.runstate).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from adainfer_ray import io, resume, runstate
from adainfer_ray.schema import OUTPUT_SCHEMA, SIDECAR_NAME

POLICY_DIR = Path(__file__).parent / "data" / "policies"
EMBEDDED_CORPUS = Path(__file__).parent / "data" / "reviews.jsonl"


@dataclass
class JobConfig:
    """Everything `jobs/classify.py` can set; the defaults are the flags' defaults."""

    input: str = str(EMBEDDED_CORPUS)
    output: str = "output"
    format: str = "auto"
    text_column: str = "text"
    id_column: str = "id"
    label_column: str | None = None  # gold labels to carry into the output (gold_label)
    task: str = "sentiment"
    labels: list[str] | None = None
    template: str | None = None
    demos: str | None = None  # a JSONL file of {"text", "label"} demonstrations
    model: str = "smollm2-135m"
    policy: str = "default"
    device: str = "auto"
    actors: str = "1"  # "N" or "MIN,MAX"
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    batch_size: int = 256  # rows per actor call: the engine regroups within it
    max_batch_tokens: int | None = None  # tokens per layer step (engine default: 2048 CPU, 16384 GPU)
    reuse_prefix: bool = True
    audit_fraction: float = 0.01
    seed: int = 0
    limit: int | None = None
    trust_remote_code: bool = False
    overwrite: bool = False  # replace an --output written by another model/policy/task/dtype
    extra: dict = field(default_factory=dict)


# -- task and policy, resolved the same way on the driver and in every actor ----------------------------


def build_task(cfg: JobConfig):
    from adainfer_ray.prompts import make_task

    demos = None
    if cfg.demos:
        import json

        import fsspec

        try:
            with fsspec.open(cfg.demos, "r") as f:
                demos = [(d["text"], d["label"]) for d in map(json.loads, filter(str.strip, f))]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise JobError(f"cannot read --demos {cfg.demos}: {type(e).__name__}: {e}; "
                           'expected JSON lines of {"text": ..., "label": ...}') from e
    return make_task(cfg.task, labels=cfg.labels, template=cfg.template, demos=demos)


def load_policy(spec: str, model_id: str, task):
    """`full`, `default` (shipped for the default model and built-in tasks), or a policy folder."""
    from adainfer_ray.policy import ExitPolicy, PolicyError

    if spec == "full":
        return ExitPolicy.full_depth()
    if spec == "default":
        folder = POLICY_DIR / f"{model_id}-{task.name}"
        if not (folder / "policy.json").exists():
            raise PolicyError(f"no default exit policy ships for model {model_id!r} and task {task.name!r}: "
                              "make one with jobs/calibrate.py and pass --policy FOLDER, or use --policy full")
        return ExitPolicy.load(folder)
    try:
        return ExitPolicy.load(spec)
    except PolicyError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file (missing keys, not safetensors...)
        raise PolicyError(f"cannot read exit policy at {spec}: {type(e).__name__}: {e}. "
                          "Pass a folder written by jobs/calibrate.py, `default`, or `full`.") from e


def audit_mask(ids, fraction: float, seed: int) -> np.ndarray:
    """A seeded, stable sample: the same ids are audited in every run and on every retry."""
    if fraction <= 0:
        return np.zeros(len(ids), bool)
    u = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") / 2**64 for i in ids]
    return np.array(u) < fraction


# -- the actor ---------------------------------------------------------------------------------------


class Classifier:
    """Ray Data callable class: loads everything once, then maps a batch of rows to output rows."""

    def __init__(self, cfg: JobConfig, threads: int | None = None, run_state=None):
        import torch

        from adainfer_ray.engine import EarlyExitEngine
        from adainfer_ray.models import load_model
        from adainfer_ray.prompts import PromptEncoder

        if threads:  # CPU actors share the node's cores
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.lm = load_model(cfg.model, cfg.device, cfg.trust_remote_code)
        self.task = build_task(cfg)
        self.encoder = PromptEncoder(self.task, self.lm.tokenizer, self.lm.max_context)
        policy = load_policy(cfg.policy, self.lm.model_id, self.task)
        policy.check_compatible(self.lm.model_hash, self.task.fingerprint(), self.lm.num_layers)
        self.engine = EarlyExitEngine(self.lm, self.encoder.label_token_ids, policy, self.encoder.prefix_ids,
                                      reuse_prefix=cfg.reuse_prefix, max_batch_tokens=cfg.max_batch_tokens)
        self.calls = 0
        self.run_state = run_state  # issue 12: node ids for _run.json; poison rows end (runstate.py)
        runstate.register_actor(run_state)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        crash_after = os.environ.get("ADAINFER_CRASH_AFTER_BATCHES")  # reliability tests kill actors this way
        if crash_after and self.calls > int(crash_after):
            os._exit(1)
        n = len(batch["id"])
        errors = [e if isinstance(e, str) else None for e in batch["input_error"]]
        texts = [t if isinstance(t, str) else None for t in batch["text"]]
        for i, t in enumerate(texts):
            if errors[i] is None and t is None:
                errors[i] = "text is null"
            elif errors[i] is None and not t.strip():
                errors[i] = "text is empty"
        ok = [i for i in range(n) if errors[i] is None]
        rows = _empty_rows(n, self.lm.num_layers)
        if ok:  # a retried block runs row by row, so that a row that kills the actor ends as an error row
            runstate.label_block(self.run_state, batch["id"], ok, errors, lambda at: self._label(
                [texts[i] for i in at], at, [batch["id"][i] for i in at], rows, errors))
        rows["id"] = np.array([str(x) for x in batch["id"]], dtype=object)
        rows["gold_label"] = np.array(batch["gold_label"], dtype=object)
        rows["error"] = np.array(errors, dtype=object)
        return to_output_table(rows)

    def _label(self, texts, where, ids, rows, errors):
        """Run the engine on the good rows; if the block fails as a whole, retry item by item so
        that one poisonous row becomes one error row."""
        runstate.crash_drill(texts)
        enc = self.encoder.encode(texts)
        audit = audit_mask(ids, self.cfg.audit_fraction, self.cfg.seed)
        try:
            out = self.engine.classify(enc.item_ids, audit)
            parts = [(np.arange(len(where)), out)]
        except Exception:  # noqa: BLE001 - isolate the culprit below
            parts = []
            for j in range(len(where)):
                try:
                    parts.append((np.array([j]), self.engine.classify([enc.item_ids[j]], audit[j: j + 1])))
                except Exception as e:  # noqa: BLE001
                    errors[where[j]] = f"labeling failed: {type(e).__name__}: {e}"[:500]
        labels = np.array(self.task.labels, dtype=object)
        for js, out in parts:
            at = np.array(where)[js]
            rows["label"][at] = labels[out["label"]]
            rows["label_score"][at] = out["label_score"]
            rows["exit_layer"][at] = out["exit_layer"]
            rows["flops_used"][at], rows["flops_full"][at] = out["flops_used"], out["flops_full"]
            full, reuse = out["flops_full"], out["flops_full_reuse"]
            rows["compute_saved"][at] = 1 - out["flops_used"] / full
            rows["exit_saved"][at] = (reuse - out["flops_used"]) / full
            rows["prefix_saved"][at] = (full - reuse) / full
            rows["num_tokens"][at] = out["num_tokens"]
            rows["truncated"][at] = np.array(enc.truncated)[js]
            audited = out["full_label"] >= 0
            rows["full_label"][at[audited]] = labels[out["full_label"][audited]]


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


def preflight(cfg: JobConfig) -> dict:
    """Every check that can fail fast runs here, on the driver, before Ray starts any actor. What is
    wrong with the user's input or settings is raised as one of the errors jobs/classify.py prints as
    one line (JobError, io.InputError, PolicyError, UnsupportedModelError, FileNotFoundError)."""
    import json

    _, files, roots = io.list_files(cfg.input)
    fmt = io.detect_format(files[0], cfg.format)
    required = {"--text-column": cfg.text_column}
    if cfg.label_column:
        required["--label-column"] = cfg.label_column
    present = io.check_columns(files, fmt, required, {"--id-column": cfg.id_column})
    parse_actors(cfg.actors)
    if not 0 <= cfg.audit_fraction <= 1:
        raise JobError("--audit-fraction must be between 0 and 1")
    if cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 0):
        raise JobError("--batch-size must be at least 1 and --limit at least 0")

    from transformers import AutoTokenizer  # after the cheap checks: importing torch takes seconds

    from adainfer_ray.models import DEFAULT_MODEL, UnsupportedModelError, family_of, model_fingerprint, resolve_model_dir
    from adainfer_ray.prompts import PromptEncoder

    model_dir = resolve_model_dir(cfg.model)
    configs = {}
    for name in ("config.json", "tokenizer_config.json"):
        try:
            configs[name] = json.loads((model_dir / name).read_text()) if (model_dir / name).exists() else {}
        except ValueError as e:
            raise UnsupportedModelError(f"{model_dir / name} is not valid JSON ({e}): is --model a Hugging Face "
                                        "model folder?") from e
        # A model folder can name its own Python classes (auto_map); loading them would run its code.
        if configs[name].get("auto_map") and not cfg.trust_remote_code:
            raise UnsupportedModelError(f"model {cfg.model} asks to run its own Python code (auto_map in {name}): "
                                        "refused; pass --trust-remote-code only if you trust its source")
    config = configs["config.json"]
    family_of(config.get("model_type", "?"))
    try:
        task = build_task(cfg)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
        PromptEncoder(task, tokenizer, config.get("max_position_embeddings") or config.get("n_positions") or 2048)
    except JobError:
        raise
    except (OSError, ValueError) as e:  # an unknown task, a template without {text}, no tokenizer...
        raise JobError(str(e)) from e
    model_id = DEFAULT_MODEL if cfg.model in (None, "", "default", DEFAULT_MODEL) else cfg.model
    model_hash, num_layers = model_fingerprint(model_dir), config.get("num_hidden_layers") or config.get("n_layer")
    policy = load_policy(cfg.policy, model_id, task)
    policy.check_compatible(model_hash, task.fingerprint(), num_layers)
    io.check_writable(cfg.output)
    return {"files": files, "roots": roots, "format": fmt, "has_id_column": present["--id-column"], "task": task,
            "model_id": model_id, "policy": policy, "model_hash": model_hash, "num_layers": num_layers}


def init_ray():
    import ray

    if not ray.is_initialized():
        # Inside `ray job submit` RAY_ADDRESS points at the cluster; otherwise start a local Ray.
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    return ray


def _read_files(batch, fmt, text_column, id_column, label_column, done=None):
    """Rows of each file in the batch, less those an earlier run already wrote (`done`)."""
    for path, root in zip(batch["path"], batch["root"]):
        for table in io.read_rows(str(path), fmt, text_column, id_column, label_column, root=str(root)):
            yield resume.drop_done(table, done) if done is not None else table


def run_classify(cfg: JobConfig, log=print) -> dict:
    """Run the whole job; returns the run record that is also written as the sidecar."""
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    checked = preflight(cfg)
    if not checked["has_id_column"]:
        log(f"no column {cfg.id_column!r} in the input: ids are derived as <file path under the input>:<row number>")
    # issue 12: who wrote the output; refuse to mix, keep the history of runs (adainfer_ray/resume.py).
    # Checked before Ray starts; only the dtype waits for the cluster (GPUs or not).
    identity = {"model_hash": checked["model_hash"], "policy_fingerprint": resume.policy_fingerprint(checked["policy"]),
                "task_fingerprint": checked["task"].fingerprint()}
    previous = resume.check_same_run(cfg.output, identity, cfg.overwrite, log)
    done = resume.done_ids(cfg.output, log)
    if len(done):
        log(f"resuming: {len(done)} rows already in {cfg.output} are kept and not labeled again")
    ray = init_ray()
    resources = ray.cluster_resources()
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if resources.get("GPU", 0) > 0 else 0.0)
    identity["dtype"] = _dtype(cfg.device, gpus)
    resume.refuse_other_run(cfg.output, previous, identity)
    runs = resume.start_record(cfg.output, previous, identity, {"start_time": started.isoformat(),
                                                                "device": "cuda" if gpus else "cpu"})
    state = runstate.start(f"{started:%Y%m%dT%H%M%S}-{os.getpid()}")
    actors = parse_actors(cfg.actors)
    max_actors = actors if isinstance(actors, int) else actors[1]
    # CPU actors: torch uses the node's cores, but each actor reserves only one Ray CPU so that the
    # readers and writers (one CPU each) can still be scheduled beside it.
    threads = None if gpus else max(1, int(resources.get("CPU", 1)) // max_actors)
    memory_in = cfg.input.startswith("memory://")
    files, roots = checked["files"], checked["roots"]
    read_args = dict(fmt=checked["format"], text_column=cfg.text_column, label_column=cfg.label_column,
                     id_column=cfg.id_column if checked["has_id_column"] else None,
                     done=ray.put(done) if len(done) else None)
    if memory_in:  # memory:// lives in this process only: read here, hand the rows to Ray
        tables = [t for f, r in zip(files, roots) for t in _read_files({"path": [f], "root": [r]}, **read_args)]
        ds = ray.data.from_arrow(tables or [io.INPUT_SCHEMA.empty_table()])
    else:
        # One read task per file. Half a CPU each (reading is light) also keeps Ray Data from fusing
        # the reads into the model actors, where one actor call would get a bundle of up to
        # --batch-size files: one actor reading everything, and a crash rerunning all of it.
        ds = ray.data.from_items([{"path": f, "root": r} for f, r in zip(files, roots)],
                                 override_num_blocks=len(files)).map_batches(
            _read_files, batch_size=1, fn_kwargs=read_args, batch_format="numpy", num_cpus=0.5)
    if cfg.limit is not None:
        ds = ds.limit(cfg.limit)
    # The actors get this driver's ADAINFER_* settings (the model cache, the crash drill in
    # Classifier): on a cluster started elsewhere, workers inherit `ray start`'s environment instead.
    env = {k: v for k, v in os.environ.items() if k.startswith("ADAINFER_")}
    ds = ds.map_batches(
        Classifier, fn_constructor_kwargs={"cfg": cfg, "threads": threads, "run_state": state},
        batch_size=cfg.batch_size, batch_format="numpy", concurrency=actors, num_gpus=gpus,
        num_cpus=None if gpus else 1, runtime_env={"env_vars": env} if env else None,
        # Ray Data places pool actors with SPREAD (DataContext default): over the nodes, not packed on one.
        # No retry settings needed: Ray Data restarts a dead actor without limit and runs the blocks
        # it held again (max_restarts=-1, max_task_retries=-1 are its defaults for actor pools).
    )
    out_fs, out_root = io.output_fs(cfg.output)
    if out_fs.protocol in ("memory", ("memory",)) or "memory" in getattr(out_fs, "protocol", ()):
        import pyarrow.parquet as pq

        for k, batch in enumerate(ds.iter_batches(batch_format="pyarrow", batch_size=None)):
            with out_fs.open(f"{out_root.rstrip('/')}/part-{started:%Y%m%dT%H%M%S}-{k:05d}.parquet", "wb") as f:
                pq.write_table(batch, f)
    else:
        ds.write_parquet(cfg.output)
    if not io.output_files(cfg.output):  # no rows at all: still leave a table that every reader can open
        io.write_parquet(cfg.output, "empty.parquet", OUTPUT_SCHEMA.empty_table())
    wall = time.perf_counter() - t0
    actor_nodes = ray.get(state.actor_nodes.remote())
    ray.kill(state)
    summary = summarize_output(cfg.output)
    if summary["rows"] == 0:
        log(f"the input holds no rows: {cfg.output} holds an empty table (empty.parquet) and {SIDECAR_NAME}")
    elif len(done) and summary["rows"] == len(done):
        log("nothing left to label: every input row was already in the output")

    this_run = {**runs[-1], "end_time": datetime.now(timezone.utc).isoformat(), "wall_s": wall,
                "rows_this_run": summary["rows"] - len(done), "gpu_name": _gpu_name() if gpus else None,
                "num_gpus": gpus * max_actors, "num_actors": cfg.actors, "actor_nodes": actor_nodes}
    record = {
        **identity, "runs": runs[:-1] + [this_run], "actor_nodes": actor_nodes,
        "model": checked["model_id"], "model_hash": checked["model_hash"],
        "policy": cfg.policy, "num_layers": checked["num_layers"], "policy_features": checked["policy"].features,
        "policy_metadata": checked["policy"].metadata, "task": checked["task"].to_dict(),
        "template": checked["task"].template, "labels": list(checked["task"].labels),
        "flags": asdict(cfg), "ray_version": ray.__version__,
        "device": "cuda" if gpus else "cpu", "gpu_name": _gpu_name() if gpus else None,
        "num_gpus": gpus * max_actors, "num_actors": cfg.actors,
        "start_time": started.isoformat(), "end_time": datetime.now(timezone.utc).isoformat(),
        "wall_s": wall, "rows_this_run": summary["rows"] - len(done), "resumed_rows": len(done),
        "rows": summary["rows"], "errors": summary["errors"],
        "rows_per_s": (summary["rows"] - len(done)) / wall if wall else None, "output": cfg.output,
        "summary": summary,
    }
    io.write_json(cfg.output, SIDECAR_NAME, record)
    return record


def _dtype(device: str, gpus: float) -> str:
    """The dtype the actors compute in (models.pick_device): fp32 on CPU; on CUDA bf16, or fp16 where
    bf16 is missing, which only a GPU can tell: a driver without one records `cuda-half`."""
    if device == "cpu" or (device == "auto" and not gpus):
        return "float32"
    import torch

    if not torch.cuda.is_available():
        return "cuda-half"
    from adainfer_ray.models import pick_device

    return str(pick_device("cuda")[1]).removeprefix("torch.")


def _gpu_name():
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None


def summarize_output(output: str) -> dict:
    """Streaming totals over the written Parquet (one row group at a time): rows, errors, exit depth,
    FLOPs saved, agreement with the audited full-depth labels, accuracy against gold."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, _ = io.output_fs(output)
    keys = ("rows", "errors", "truncated", "exit_layers", "layers", "flops_used", "flops_full", "flops_exit_saved",
            "audited", "audit_agree", "gold", "gold_correct")
    t = dict.fromkeys(keys, 0)
    cols = ["label", "exit_layer", "num_layers", "flops_used", "flops_full", "exit_saved", "full_label",
            "gold_label", "error", "truncated"]
    for path in io.output_files(output):
        with fs.open(path, "rb") as f:
            for b in pq.ParquetFile(f).iter_batches(columns=cols):
                ok = b.filter(pc.is_null(b.column("error")))
                t["rows"] += b.num_rows
                t["errors"] += b.num_rows - ok.num_rows
                t["truncated"] += pc.sum(ok.column("truncated")).as_py() or 0
                for key, col in (("exit_layers", "exit_layer"), ("layers", "num_layers"),
                                 ("flops_used", "flops_used"), ("flops_full", "flops_full")):
                    t[key] += pc.sum(ok.column(col)).as_py() or 0
                t["flops_exit_saved"] += pc.sum(pc.multiply(ok.column("exit_saved"), ok.column("flops_full"))).as_py() or 0
                for n_key, hit_key, col in (("audited", "audit_agree", "full_label"), ("gold", "gold_correct", "gold_label")):
                    ref = ok.filter(pc.is_valid(ok.column(col)))
                    t[n_key] += ref.num_rows
                    t[hit_key] += pc.sum(pc.equal(ref.column("label"), ref.column(col))).as_py() or 0
    ok_rows = t["rows"] - t["errors"]
    return {
        "rows": t["rows"], "errors": t["errors"], "truncated": t["truncated"],
        "mean_exit_layer": t["exit_layers"] / ok_rows if ok_rows else None,
        "layers_skipped": 1 - t["exit_layers"] / t["layers"] if t["layers"] else None,
        "flops_saved": 1 - t["flops_used"] / t["flops_full"] if t["flops_full"] else None,
        "flops_saved_by_exit": t["flops_exit_saved"] / t["flops_full"] if t["flops_full"] else None,
        "audited": t["audited"], "audit_agreement": t["audit_agree"] / t["audited"] if t["audited"] else None,
        "gold_rows": t["gold"], "accuracy": t["gold_correct"] / t["gold"] if t["gold"] else None,
    }
