"""Re-running the same command over the same --output resumes: this module decides what is kept.

- Which rows are done: the ids in the readable output files (done_ids); the readers drop them
  (drop_done), so each input row is written once across any number of interrupted runs.
- What an unreadable output file is: deleted only when it is provably a local write cut short (a
  local file without Parquet's closing magic bytes `PAR1`: Ray writes each file in place and Parquet
  puts its footer last). A local file that ends like Parquet but cannot be read is moved aside into
  <output>/_quarantine/, never deleted. Any other failure to read (remote storage, permissions, a
  throttle, an expired credential) stops the run with one line: the file is not touched.
- Whether the existing output may be continued at all: a run with another model (hash), policy,
  task (fingerprint), dtype or text handling would mix two kinds of labels in one table, so it is refused, naming
  both, unless --overwrite (which deletes the old output first).
- The history: _run.json keeps one entry per run (`runs`), each with its own rows, time and device,
  so throughput is computed per run, not from all rows over the last run's time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np
import pyarrow as pa

from adainfer_ray import io
from adainfer_ray.schema import OUTPUT_SCHEMA, SIDECAR_NAME

QUARANTINE = "_quarantine"
POLICY_SUBDIR = "_policy"  # where classify --calibrate keeps its policy, inside --output
IDENTITY_KEYS = ("model_hash", "policy_fingerprint", "task_fingerprint", "dtype", "text_handling")
# Outputs written before texts were stripped of outer whitespace (prompts.TEXT_HANDLING) record no
# handling: theirs was the text as it came.
BEFORE_TEXT_HANDLING = {"text_handling": "as-is"}


class ResumeError(io.InputError):
    """The output folder cannot be resumed as it is (another run's labels, an unreadable file): jobs/classify.py
    prints it as one line, like every InputError."""


def id_keys(ids) -> np.ndarray:
    """Ids as fixed-width 16-byte digests, which sort and search like numbers: 50M finished ids take
    800 MB, and two different ids share a digest with odds of about 2^-128, so none is skipped by chance."""
    return np.array([hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in ids], dtype="S16")


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocol))


def _ends_like_parquet(fs, path) -> bool:
    with fs.open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 4:
            return False
        f.seek(size - 4)
        return f.read(4) == b"PAR1"


def done_ids(output: str, log=print) -> np.ndarray:
    """The sorted id_keys of the rows an earlier, interrupted run of this job already wrote."""
    import pyarrow.parquet as pq

    fs, root = io.output_fs(output)
    keys = []
    for path in io.output_files(output):
        try:
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                foreign = pf.schema_arrow.names != OUTPUT_SCHEMA.names
                ids = None if foreign else pf.read(columns=["id"]).column("id").to_pylist()
        except Exception as e:  # noqa: BLE001 - sorted out below: only a provable local cut is deleted
            _set_aside(fs, root, path, e, log)
            continue
        if foreign:
            raise ResumeError(foreign_output_message(output, path, pf.schema_arrow.names))
        keys.append(id_keys(ids))
    return np.sort(np.concatenate(keys)) if keys else np.zeros(0, "S16")


def foreign_output_message(output: str, path: str, names: list[str]) -> str:
    """Why a file in --output cannot be resumed: another program's, or an older version of this job's
    (it lacks columns added since; a run mixing the two would write files of two schemas)."""
    lacks = [n for n in OUTPUT_SCHEMA.names if n not in names]
    if lacks and set(names) < set(OUTPUT_SCHEMA.names):
        return (f"output {output} holds {path}, written by an older version of this job (it lacks the columns "
                f"{', '.join(lacks)}): finish that run with the version that started it, or pick an empty --output")
    return (f"output {output} holds {path}, which is not this job's output: "
            "pick an empty --output folder (or the folder of the run to resume)")


def _set_aside(fs, root: str, path: str, error: Exception, log) -> None:
    why = f"{type(error).__name__}: {error}"
    if not _is_local(fs) or isinstance(error, PermissionError):
        raise ResumeError(f"cannot read {path} in --output to resume ({why}); nothing was changed: "
                          "fix the access and run the same command again")
    try:
        cut_short = not _ends_like_parquet(fs, path)
    except OSError as e:
        raise ResumeError(f"cannot read {path} in --output to resume ({type(e).__name__}: {e}); "
                          "nothing was changed: fix the access and run the same command again") from e
    if cut_short:  # a write that a crash cut short: its rows are labeled again
        fs.rm(path)
        log(f"deleted {path}: a write cut short (no Parquet footer); its rows are labeled again")
        return
    aside = f"{root.rstrip('/')}/{QUARANTINE}/{os.path.basename(path)}"
    fs.makedirs(os.path.dirname(aside), exist_ok=True)
    fs.mv(path, aside)
    log(f"moved {path} to {aside}: a complete Parquet file that cannot be read ({why}); its rows are labeled again")


def drop_done(table: pa.Table, done) -> pa.Table:
    """Drop the rows an earlier run wrote. `done` (an ObjectRef of the sorted done_ids array) is put
    into Ray's object store once and read in place by every task, not copied into each of them."""
    import ray

    done = ray.get(done)
    mine = id_keys(table.column("id").to_pylist())
    at = np.searchsorted(done, mine).clip(max=len(done) - 1)
    return table.filter(pa.array(done[at] != mine))


# -- which run wrote the output ---------------------------------------------------------------------


def policy_fingerprint(policy) -> str:
    """A digest of the policy as it is saved (its JSON and arrays): the same policy from another folder
    matches, a recalibrated one does not."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as d:
        folder = policy.save(os.path.join(d, "p"))
        for name in sorted(os.listdir(folder)):
            h.update(name.encode())
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def read_sidecar(output: str) -> dict | None:
    fs, root = io.output_fs(output)
    path = f"{root.rstrip('/')}/{SIDECAR_NAME}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def check_same_run(output: str, identity: dict, overwrite: bool, log=print) -> dict | None:
    """Refuse to continue an output written with another model, policy, task or dtype (unless
    overwrite: then its files are deleted). Returns the earlier sidecar to extend, or None."""
    previous = read_sidecar(output)
    has_rows = bool(io.output_files(output))
    if overwrite:
        fs, root = io.output_fs(output)
        policy = f"{root.rstrip('/')}/{POLICY_SUBDIR}"  # a policy an earlier --calibrate made here
        if previous is not None or has_rows or fs.exists(policy):
            for path in io.output_files(output) + [f"{root.rstrip('/')}/{SIDECAR_NAME}"]:
                if fs.exists(path):
                    fs.rm(path)
            if fs.exists(policy):
                fs.rm(policy, recursive=True)
            log(f"--overwrite: deleted the earlier output in {output}")
        return None
    if previous is None:
        return None
    refuse_other_run(output, previous, identity)
    return previous


def refuse_other_run(output: str, previous: dict | None, identity: dict) -> None:
    """Raise, naming both values, where `identity` (any of IDENTITY_KEYS) differs from `previous`."""
    if previous and "model_hash" in previous:  # written by this job: what it did not record, it did as before
        previous = {**BEFORE_TEXT_HANDLING, **previous}
    diff = [f"{k} {previous.get(k)!r} there, {identity[k]!r} now" for k in IDENTITY_KEYS
            if previous and k in previous and k in identity and previous.get(k) != identity[k]]
    if diff:
        raise ResumeError(f"--output {output} holds labels from another run ({'; '.join(diff)}): "
                          "pick another --output, or pass --overwrite to replace them")


def start_record(output: str, previous: dict | None, identity: dict, run: dict) -> list[dict]:
    """Write _run.json as the run starts, so that a killed run still leaves who wrote the output (the
    next run checks it). Returns the runs so far, this one last."""
    runs = list((previous or {}).get("runs") or ([_legacy_run(previous)] if previous else []))
    runs.append({**run, "end_time": None})
    io.write_json(output, SIDECAR_NAME, {**(previous or {}), **identity, "runs": runs})
    return runs


def _legacy_run(previous: dict) -> dict:
    """A sidecar from before `runs` existed: its own run, as it recorded it."""
    return {k: previous.get(k) for k in ("start_time", "end_time", "wall_s", "rows_this_run", "device",
                                         "gpu_name", "num_gpus", "num_actors")}
