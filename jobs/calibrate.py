"""Calibrate an early-exit policy with a stated guarantee: `python jobs/calibrate.py`.

Runs a calibration sample at full depth once (through Ray Data by default), keeping every layer's
exit features; fits per-layer probes and an SVM per feature mode on one part of the sample; on the
other part, picks the exit threshold with Learn-then-Test so that, with probability >= 1 - delta,
the policy disagrees with the full model on at most epsilon of items like the sample. Writes the
policy (policy.json + arrays.safetensors, no pickle) and a calibration report (markdown, JSON, plot).

Gold labels are optional: the promise is about agreement with the full model. With gold labels the
report also shows accuracy, and the paper's criterion (most layers skipped for <= 1 point lost).

Argument parsing, input reading and the Ray Data trace live here; the method is in
`adainfer_ray.calibrate`.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shlex
import sys
import time

import numpy as np

try:
    import adainfer_ray  # noqa: F401
except ImportError:  # run from a checkout without installing: put the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import adainfer_ray
from adainfer_ray import calibrate as cal
from adainfer_ray.features import FEATURE_MODES
from adainfer_ray.models import DEFAULT_MODEL
from adainfer_ray.prompts import BUILTIN_TASKS, make_task

EMBEDDED_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "adainfer_ray", "data", "reviews.jsonl")
TRACE_KEYS = ("hidden", "final_label", "item_tokens", "truncated") + tuple(
    f"{m}_{k}" for m in ("vocab", "label") for k in ("label", "top", "gap"))


# ----------------------------------------------------------------------------------------------
# Flags shared with jobs/evaluate.py


def add_input_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("input")
    g.add_argument("--input", default=EMBEDDED_CORPUS,
                   help="file, glob or URI (s3://, gs://, file://) of the texts; default: the embedded review corpus")
    g.add_argument("--format", choices=("auto", "parquet", "jsonl", "csv", "tsv"), default="auto",
                   help="input format; auto picks it from the file extension")
    g.add_argument("--text-column", default="text",
                   help="column holding the text; several joined by commas (e.g. title,description) are "
                        "concatenated with '. '. SST-2 TSV files use `sentence` (picked automatically)")
    g.add_argument("--label-column", default=None,
                   help="optional gold label column: label names, or indices (0-based, or 1-based when the "
                        "column's largest value equals the number of labels)")
    g.add_argument("--columns", default=None,
                   help="column names for a CSV/TSV file without a header row, comma-separated "
                        "(AG News test.csv: label,title,description)")
    g.add_argument("--min-words", type=int, default=0,
                   help="keep only texts with at least this many words (e.g. to leave out SST-2 train's "
                        "short phrases when the data to classify is whole sentences)")
    g.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                   help="shuffle the rows with this seed before --rows/--limit take their slice")
    g.add_argument("--rows", default=None, metavar="START:STOP",
                   help="use only this slice of the (filtered, shuffled) rows; disjoint slices of the same "
                        "shuffle give disjoint calibration and evaluation sets")
    g.add_argument("--limit", type=int, default=None, help="use at most this many rows (after --rows)")
    g.add_argument("--task", default="sentiment", choices=sorted(BUILTIN_TASKS),
                   help="built-in task (prompt, labels, demonstrations); ignored with --labels")
    g.add_argument("--labels", default=None,
                   help="custom task: comma-separated label names (verbalizer = ' ' + label)")
    g.add_argument("--template", default=None,
                   help="per-item prompt template with one {text}, ending where the model names the label")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="model name, local Hugging Face folder, or fsspec URI of one")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--batch-size", type=int, default=64, help="texts per model call (and per Ray Data batch)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def task_from_args(args):
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    return make_task(args.task, labels=labels, template=args.template)


# ----------------------------------------------------------------------------------------------
# Reading input (a small local reader until adainfer_ray.io serves every job)


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower().removesuffix(".gz")
    for ext, f in ((".parquet", "parquet"), (".jsonl", "jsonl"), (".json", "jsonl"), (".tsv", "tsv"), (".csv", "csv")):
        if name.endswith(ext):
            return f
    raise SystemExit(f"cannot tell the format of {path} from its extension: pass --format")


def _read_one(path: str, fmt: str, columns: list[str] | None):
    import fsspec
    import pandas as pd

    with fsspec.open(path, "rb", compression="infer") as f:
        if fmt == "parquet":
            return pd.read_parquet(f)
        if fmt == "jsonl":
            return pd.read_json(f, lines=True, dtype=False)
        # SST-2 quotes nothing and has stray quote characters: read TSV unquoted. CSV is quoted.
        quoting = 3 if fmt == "tsv" else 0
        df = pd.read_csv(f, sep="\t" if fmt == "tsv" else ",", header=None if columns else "infer", names=columns,
                         quoting=quoting, dtype=str, keep_default_na=False)
    df.columns = [str(c).strip() for c in df.columns]
    return df


def read_labeled_texts(args, task) -> tuple[list[str], np.ndarray | None, list[str]]:
    """(texts, gold label indices [n] with -1 where missing, or None; ids) after filters and slicing."""
    import pandas as pd

    paths = sorted(glob.glob(os.path.expanduser(args.input))) if "://" not in args.input else [args.input]
    if not paths:
        raise SystemExit(f"no input matches {args.input}")
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    df = pd.concat([_read_one(p, _format_of(p, args.format), columns) for p in paths], ignore_index=True)
    text_cols = [c.strip() for c in args.text_column.split(",")]
    if text_cols == ["text"] and "text" not in df.columns and "sentence" in df.columns:
        text_cols = ["sentence"]  # SST-2
    missing = [c for c in text_cols + ([args.label_column] if args.label_column else []) if c not in df.columns]
    if missing:
        raise SystemExit(f"{args.input} has no column {missing}; it has {list(df.columns)}")
    # CSV exports of AG News write a backslash where the text had a line break.
    texts = [". ".join(str(p).replace("\\", " ").strip() for p in parts) for parts in zip(*(df[c] for c in text_cols))]
    ids = [str(x) for x in df["id"]] if "id" in df.columns else [str(i) for i in range(len(df))]
    gold = gold_indices(df[args.label_column].tolist(), task) if args.label_column else None
    keep = np.array([len(t.split()) >= args.min_words and t.strip() != "" for t in texts])
    order = np.flatnonzero(keep)
    if args.shuffle is not None:
        order = np.random.default_rng(args.shuffle).permutation(order)
    if args.rows:
        start, stop = (int(x) if x else None for x in args.rows.split(":"))
        order = order[start:stop]
    if args.limit is not None:
        order = order[: args.limit]
    texts, ids = [texts[i] for i in order], [ids[i] for i in order]
    return texts, (gold[order] if gold is not None else None), ids


def gold_indices(values: list, task) -> np.ndarray:
    """Gold labels -> label indices (-1 when missing/unknown). Names match case-insensitively;
    integers are 0-based unless the largest equals the number of labels and none is 0 (1-based)."""
    names = {n.lower(): i for i, n in enumerate(task.labels)}
    text = [str(v).strip() for v in values]
    if all(t.lstrip("-").isdigit() or t == "" for t in text):
        ints = np.array([int(t) if t else -1 for t in text])
        one_based = ints.max() == len(task.labels) and not (ints == 0).any()
        ints = ints - 1 if one_based else ints
        return np.where((ints >= 0) & (ints < len(task.labels)), ints, -1)
    return np.array([names.get(t.lower(), -1) for t in text])


# ----------------------------------------------------------------------------------------------
# Full-depth trace: Ray Data, or in-process


class TraceBatch:
    """Ray Data callable class: loads the model once per actor, traces one batch per call."""

    def __init__(self, model: str, device: str, task, threads: int | None):
        import torch

        from adainfer_ray.models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.tracer = cal.Tracer(load_model(model, device=device), task)

    def __call__(self, batch: dict) -> dict:
        tr = self.tracer(list(batch["text"]))
        n = len(tr["final_label"])
        tr["hidden"] = tr["hidden"].reshape(n, -1)  # one flat float16 vector per row
        tr["prefix_tokens"] = np.full(n, self.tracer.prefix_tokens, np.int32)
        return {"row": batch["row"], **tr}


def _wants_gpu(device: str) -> bool:
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def trace_with_ray(args, task, texts: list[str]) -> tuple[dict, int]:
    import ray

    ray.init(ignore_reinit_error=True, include_dashboard=False, num_cpus=args.threads or os.cpu_count())
    ds = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(texts)])
    out = ds.map_batches(TraceBatch, fn_constructor_args=(args.model, args.device, task, args.threads),
                         batch_size=args.batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=args.actors),
                         num_cpus=1, num_gpus=1 if _wants_gpu(args.device) else 0)
    parts = list(out.iter_batches(batch_format="numpy", batch_size=None))
    tr = cal.concat_traces(parts)
    order = np.argsort(tr.pop("row"))  # Ray Data may return blocks out of order
    prefix_tokens = int(tr.pop("prefix_tokens")[0])
    tr = {k: v[order] for k, v in tr.items()}
    tr["hidden"] = tr["hidden"].reshape(len(texts), -1, tr["hidden"].shape[1] // len(tr["vocab_top"][0]))
    return tr, prefix_tokens


def trace_in_process(args, task, texts: list[str]) -> tuple[dict, int]:
    from adainfer_ray.models import load_model

    lm = load_model(args.model, device=args.device)
    return cal.trace_texts(lm, task, texts, chunk=args.batch_size)


def _text_hashes(texts: list[str]) -> np.ndarray:
    return np.array([hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts])


def load_or_trace(args, task, texts: list[str], model_hash: str) -> tuple[dict, int]:
    """The full-depth trace of `texts`. With --trace-cache, rows traced before for the same model
    and prompt are reused (matched by a hash of each text) and only new texts run; the cache then
    keeps old and new rows, so growing a calibration sample costs only the added items."""
    key = hashlib.sha256(json.dumps([model_hash, task.fingerprint()]).encode()).hexdigest()[:16]
    hashes = _text_hashes(texts)
    cached, where = None, np.full(len(texts), -1)
    if args.trace_cache and os.path.exists(args.trace_cache):
        with np.load(args.trace_cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                cached = {k: z[k] for k in TRACE_KEYS + ("text_hash", "prefix_tokens")}
                index = {h: i for i, h in enumerate(cached["text_hash"])}
                where = np.array([index.get(h, -1) for h in hashes])
            else:
                print(f"{args.trace_cache} was made for another model or prompt: not reusing it")
    missing = np.flatnonzero(where < 0)
    if cached is not None:
        print(f"reusing the full-depth trace of {len(texts) - len(missing)} items from {args.trace_cache}")
    if len(missing) == 0:
        return {k: cached[k][where] for k in TRACE_KEYS}, int(cached["prefix_tokens"])
    t0 = time.time()
    print(f"tracing {len(missing)} items at full depth ({'Ray Data' if args.ray else 'in-process'})...")
    new, prefix_tokens = (trace_with_ray if args.ray else trace_in_process)(args, task, [texts[i] for i in missing])
    print(f"traced {len(missing)} items in {time.time() - t0:.0f} s ({len(missing) / (time.time() - t0):.1f}/s)")
    if cached is None:  # nothing reused: the new rows are the whole trace
        cached = {k: new[k][:0] for k in TRACE_KEYS}
        cached["text_hash"] = hashes[:0]
    where[missing] = len(cached["text_hash"]) + np.arange(len(missing))
    new["text_hash"] = hashes[missing]
    merged = {k: np.concatenate([cached[k], new[k]]) for k in TRACE_KEYS + ("text_hash",)}
    if args.trace_cache:
        os.makedirs(os.path.dirname(os.path.abspath(args.trace_cache)), exist_ok=True)
        np.savez(args.trace_cache, key=np.array(key), prefix_tokens=np.array(prefix_tokens), **merged)
    return {k: merged[k][where] for k in TRACE_KEYS}, prefix_tokens


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python jobs/calibrate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_input_args(parser)
    g = parser.add_argument_group("calibration")
    g.add_argument("--epsilon", type=float, default=cal.DEFAULT_EPSILON,
                   help="promised bound on the share of items where the policy disagrees with the full model")
    g.add_argument("--delta", type=float, default=cal.DEFAULT_DELTA,
                   help="allowed probability that the promise fails (over the draw of the calibration sample)")
    g.add_argument("--features", choices=("auto",) + FEATURE_MODES, default="auto",
                   help="exit feature mode; auto tries all and keeps the one saving the most FLOPs under the "
                        "guarantee (delta is split across the modes tried)")
    g.add_argument("--score", choices=cal.SCORES, default="linear",
                   help="exit rule: linear scores of [top, gap, depth] chosen for the high-confidence tail, or "
                        "the paper's RBF SVM")
    g.add_argument("--min-layers", default="1,4,8",
                   help="comma-separated candidates for the first layer where the policy may stop; chosen on the "
                        "fit part with the rule")
    g.add_argument("--fit-fraction", type=float, default=0.5,
                   help="share of the sample that fits probes and exit rules; the rest tests thresholds")
    g.add_argument("--seed", type=int, default=0, help="seed of the fit/test split and the probes' cross-fitting folds")
    g.add_argument("--thresholds", type=int, default=200, help="number of candidate thresholds per feature mode")
    g.add_argument("--out", default=None, help="policy folder to write (default: policies/<model>-<task>)")
    g.add_argument("--report", default=None,
                   help="folder for the calibration report (default: <out>/report)")
    g.add_argument("--trace-cache", default=None,
                   help="NPZ file keeping full-depth traces: texts traced before for the same model and prompt are "
                        "not run again, so recalibrating, or growing the sample, costs only the new items")
    g.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True,
                   help="trace through Ray Data (actors load the model once); --no-ray traces in this process")
    g.add_argument("--actors", type=int, default=1, help="Ray Data actors tracing in parallel (one model each)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from adainfer_ray.calibration_report import write_report
    from adainfer_ray.flops import ModelDims
    from adainfer_ray.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    task = task_from_args(args)
    texts, gold, _ = read_labeled_texts(args, task)
    if not texts:
        raise SystemExit("no rows left to calibrate on")
    lm = load_model(args.model, device="cpu")  # the driver needs the config, hash and tokenizer only
    out = args.out or os.path.join("policies", f"{os.path.basename(str(args.model).rstrip('/'))}-{task.name}")
    trace, prefix_tokens = load_or_trace(args, task, texts, lm.model_hash)
    provenance = {
        "model_id": lm.model_id, "model_hash": lm.model_hash, "num_layers": lm.num_layers,
        "task": task.name, "task_fingerprint": task.fingerprint(), "template": task.template,
        "labels": list(task.labels), "verbalizers": list(task.verbalizers),
        "input": args.input, "input_filters": {"min_words": args.min_words, "shuffle": args.shuffle,
                                               "rows": args.rows, "limit": args.limit},
        "created_by": "jobs/calibrate.py", "adainfer_ray_version": adainfer_ray.__version__,
        "command": shlex.join(["python", "jobs/calibrate.py"] + (argv if argv is not None else sys.argv[1:])),
    }
    result = cal.calibrate(trace, ModelDims.from_config(lm.config), prefix_tokens, len(task.labels),
                           epsilon=args.epsilon, delta=args.delta, features=args.features, score=args.score,
                           min_layers=[int(x) for x in args.min_layers.split(",")], fit_fraction=args.fit_fraction,
                           seed=args.seed, gold=gold, num_thresholds=args.thresholds, provenance=provenance)
    result.policy.save(out)
    report_dir = write_report(result, args.report or os.path.join(out, "report"))
    print(f"policy written to {out}; calibration report in {report_dir}")


if __name__ == "__main__":
    main()
