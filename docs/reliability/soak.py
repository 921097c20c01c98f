"""The load drill (issue 19): real rows, the default model, the two-node local cluster, a model actor
SIGKILLed every --kill-every seconds; then the whole cluster (head included) SIGKILLed mid-run,
started again, and the same command resubmitted. It checks rows in = rows out, each id once, one
run identity in _run.json, and records memory (driver and actors, peak RSS) and throughput over time.

    flock /tmp/adainfer-ray.lock python docs/reliability/soak.py --rows 20000      # hours on 2 cores
    flock /tmp/adainfer-ray.lock python docs/reliability/soak.py --rows 2400 --files 60 --kill-every 60

Writes docs/reliability/soak-<rows>.json. Needs ../shared/data/sst2/train.tsv (or --tsv).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCAL_SH = os.path.join(ROOT, "cluster", "local.sh")


def write_corpus(tsv: str, folder: str, rows: int, files: int) -> int:
    """`rows` SST-2 sentences (cycled if asked for more) as `files` Parquet files with unique ids."""
    import csv

    with open(tsv) as f:
        texts = [r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    os.makedirs(folder, exist_ok=True)
    per = -(-rows // files)
    for k in range(files):
        ids = range(k * per, min(rows, (k + 1) * per))
        pq.write_table(pa.table({"id": [f"s{i}" for i in ids], "text": [texts[i % len(texts)] for i in ids]}),
                       os.path.join(folder, f"part-{k:03d}.parquet"))
    return rows


def cluster(state: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", LOCAL_SH, *args], env={**os.environ, "ADAINFER_CLUSTER_STATE": state},
                          capture_output=True, text=True, timeout=300)


def start_cluster(state: str, cpus: int) -> dict:
    r = cluster(state, "start", "--nodes", "2", "--num-cpus", str(cpus), "--port", str(free_port()),
                "--dashboard-port", str(free_port()))
    if r.returncode:
        sys.exit(r.stdout + r.stderr)
    return dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in cluster(state, "env").stdout.splitlines())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids(pattern: str) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()]


def processes() -> list[tuple[int, int, str]]:
    rows = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()
    return [(int(r.split(None, 2)[0]), int(r.split(None, 2)[1]), r.split(None, 2)[2]) for r in rows if len(r.split(None, 2)) == 3]


def model_actors(state: str) -> list[int]:
    """This cluster's model actors: MapWorker processes whose parent is one of its raylets (other
    clusters on this machine have theirs)."""
    procs = processes()
    raylets = {pid for pid, _, args in procs if "raylet" in args and f"{state}/ray/" in args}
    return [pid for pid, ppid, args in procs if ppid in raylets and "MapWorker" in args]


def drivers(out: str) -> list[int]:
    """The job's driver (not `ray job submit`, whose command line also names it)."""
    return [pid for pid, _, args in processes() if "jobs/classify.py" in args and f"--output {out}" in args
            and "job submit" not in args]


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return 0.0


def rows_written(out: str) -> int:
    total = 0
    for path in glob.glob(os.path.join(out, "*.parquet")):
        try:
            total += pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 - a file still being written
            pass
    return total


def submit(state: str, exports: dict, args: list[str]) -> subprocess.Popen:
    cmd = ["ray", "job", "submit", "--working-dir", ROOT, "--", "python", "jobs/classify.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **exports, "ADAINFER_CLUSTER_STATE": state},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def watch(job, state: str, out: str, kill_every: float, stop_at_rows: int | None, samples: list, kills: list,
          started: float) -> bool:
    """Sample every 5 s; SIGKILL one model actor every `kill_every` s; SIGKILL the whole cluster once
    `stop_at_rows` rows are written (returns True then). Returns False when the job ended by itself."""
    last_kill = time.time()
    while job.poll() is None:
        time.sleep(5)
        actors, driver = model_actors(state), drivers(out)
        samples.append({"t_s": round(time.time() - started, 1), "rows": rows_written(out),
                        "driver_rss_mb": round(sum(rss_mb(p) for p in driver), 1) if driver else None,
                        "actor_rss_mb": [round(rss_mb(p), 1) for p in actors]})
        if stop_at_rows is not None and samples[-1]["rows"] >= stop_at_rows:
            # The whole cluster at once, head included, and the job's driver with it (it runs on the head
            # node, but its command line does not name the node's temp dir).
            for p in drivers(out) + model_actors(state) + pids(f"{state}/ray/"):
                subprocess.run(["kill", "-KILL", str(p)])
            kills.append({"t_s": samples[-1]["t_s"], "what": "whole cluster", "rows": samples[-1]["rows"]})
            job.kill()
            return True
        if kill_every and time.time() - last_kill >= kill_every and actors:
            victim = max(actors)  # the youngest: the actor nearest its block's end keeps its work
            subprocess.run(["kill", "-KILL", str(victim)])
            kills.append({"t_s": samples[-1]["t_s"], "what": f"model actor pid {victim}", "rows": samples[-1]["rows"]})
            last_kill = time.time()
    return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--files", type=int, default=500, help="input files; each is one block, so a kill costs at most "
                   "rows/files rows of work per actor")
    p.add_argument("--kill-every", type=float, default=60.0, help="seconds between model-actor kills (0: none)")
    p.add_argument("--stop-cluster-at", type=float, default=0.6, help="share of rows at which the whole cluster dies")
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs per node")
    p.add_argument("--tsv", default=os.path.join(ROOT, "..", "shared", "data", "sst2", "train.tsv"))
    p.add_argument("--record", default=None)
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="soak-")
    corpus, out = os.path.join(work, "in"), os.path.join(work, "out")
    n = write_corpus(a.tsv, corpus, a.rows, a.files)
    args = ["--input", corpus, "--output", out, "--actors", "2", "--batch-size", "64"]
    samples, kills, phases = [], [], []
    state = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    started = time.time()
    for phase, stop_at in (("first submit", int(a.stop_cluster_at * n)), ("resubmit after the cluster died", None)):
        exports = start_cluster(state, a.cpus)
        job = submit(state, exports, args)
        killed = watch(job, state, out, a.kill_every, stop_at, samples, kills, started)
        log = job.communicate()[0] if not killed else ""
        phases.append({"phase": phase, "ended_s": round(time.time() - started, 1), "rc": job.returncode,
                       "cluster_killed": killed, "log_tail": log[-1500:]})
        cluster(state, "stop")
    table = pa.concat_tables([pq.read_table(f, columns=["id", "error"]) for f in glob.glob(os.path.join(out, "*.parquet"))])
    ids = table.column("id").to_pylist()
    side = json.load(open(os.path.join(out, "_run.json")))
    rate = [(s["t_s"], s["rows"]) for s in samples]
    record = {
        "command": " ".join(sys.argv), "rows_in": n, "rows_out": len(ids), "unique_ids": len(set(ids)),
        "each_id_once": len(ids) == n == len(set(ids)), "error_rows": len(ids) - table.column("error").null_count,
        "runs_in_sidecar": len(side["runs"]), "resumed_rows": side.get("resumed_rows"),
        "rows_this_run": side.get("rows_this_run"), "one_identity": len({r.get("model_hash") for r in side["runs"]} - {None}) <= 1,
        "driver_peak_rss_mb": max((s["driver_rss_mb"] or 0) for s in samples),
        "actor_peak_rss_mb": max((max(s["actor_rss_mb"]) if s["actor_rss_mb"] else 0) for s in samples),
        "kills": kills, "phases": phases, "rows_over_time": rate, "samples": samples,
    }
    path = a.record or os.path.join(os.path.dirname(os.path.abspath(__file__)), f"soak-{n}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k not in ("samples", "rows_over_time", "phases")}, indent=1))
    return 0 if record["each_id_once"] and record["error_rows"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
