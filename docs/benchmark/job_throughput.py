"""The job's rows/s against its own engine's items/s on the same rows (issue 13, point 3).

    PYTHONPATH=$PWD flock /tmp/adainfer-cpu.lock python docs/benchmark/job_throughput.py \
        --input ../shared/data/sst2/train.tsv --text-column sentence --label-column label --limit 2000 \
        --out docs/benchmark/job_throughput.json

(a) engine, in this process: the rows the job reads (io.read_rows, the job's reader and ids), the
    actor's own PromptEncoder and EarlyExitEngine (the shipped default policy), the job's batch size
    (rows per actor call), torch threads (what plan_resources gives one CPU actor: every core) and
    audit sample (job.sampling.audit_mask at the job's audit rate). One batch warms up, then one timed
    pass: items/s of `engine.classify` alone, and with the actor's tokenising.
(b) job: `python jobs/classify.py` on the same rows, in a fresh process, as a user runs it; rows/s
    over the command's wall time (Python start to exit, as timed here), over the run's own wall_s
    (_run.json: command start to output written), and over the labeling part (from the first
    actor's model loaded to the last batch labeled, from the run's timeline).

Both with the default audit and with `--audit-fraction 0 --audit-rows 0`: audited rows run on to
full depth, so the audit costs the layers early exit skipped, in both (a) and (b) alike. Seconds
of wall time; the load average is recorded before and after.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AUDITS = {"default audit": [], "no audit": ["--audit-fraction", "0", "--audit-rows", "0"]}


def job_rows(cfg):
    """The rows the job labels, read as it reads them (the preflight's input check, the job's
    one per-file reader): ids, texts, in input order, after --limit."""
    import pyarrow as pa

    from adainfer_ray.job.config import check_input
    from adainfer_ray.job.dataset import read_file

    checked = check_input(cfg)
    tables = [t for f, r in zip(checked.files, checked.roots)
              for t in read_file(f, r, checked.format, cfg, checked.present["--id-column"])]
    table = pa.concat_tables(tables).slice(0, cfg.limit)
    ok = [e is None for e in table.column("input_error").to_pylist()]
    return ([i for i, k in zip(table.column("id").to_pylist(), ok) if k],
            [t for t, k in zip(table.column("text").to_pylist(), ok) if k])


def engine_items_per_s(cfg, ids, texts, threads: int) -> dict:
    import torch

    from adainfer_ray.job.actor import Classifier
    from adainfer_ray.job.sampling import audit_mask, corpus_audit_rate

    torch.set_num_threads(threads)
    actor = Classifier.from_config(cfg, threads=threads)  # model, encoder, engine and policy as the actor has them
    out = {}
    for name, flags in AUDITS.items():
        rate = corpus_audit_rate(cfg, len(ids)) if not flags else 0.0
        audit = audit_mask(ids, rate, cfg.seed)
        batches = [slice(i, i + cfg.batch_size) for i in range(0, len(ids), cfg.batch_size)]
        warm = actor.encoder.encode(texts[batches[0]])
        actor.engine.classify(warm.item_ids, audit[batches[0]])  # warm-up: first-call costs are the job's start-up
        encode_s = classify_s = 0.0
        exit_layers = []
        for b in batches:
            t = time.perf_counter()
            enc = actor.encoder.encode(texts[b])
            encode_s += time.perf_counter() - t
            t = time.perf_counter()
            res = actor.engine.classify(enc.item_ids, audit[b])
            classify_s += time.perf_counter() - t
            exit_layers.append(res["exit_layer"])
        n = len(ids)
        out[name] = {"rows": n, "audit_rate": rate, "audited_rows": int(audit.sum()),
                     "classify_s": classify_s, "encode_s": encode_s, "items_per_s": n / classify_s,
                     "items_per_s_with_tokenising": n / (classify_s + encode_s),
                     "mean_exit_layer": float(np.concatenate(exit_layers).mean())}
        print(name, json.dumps(out[name]), flush=True)
    return out


def job_run(args, flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "jobs/classify.py", "--input", args.input, "--text-column", args.text_column,
               "--limit", str(args.limit), "--output", os.path.join(tmp, "out"), *flags]
        if args.label_column:
            cmd += ["--label-column", args.label_column]
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        command_s = time.perf_counter() - t
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
        with open(os.path.join(tmp, "out", "_run.json")) as f:
            side = json.load(f)
    timeline = side["runs"][-1]["timeline"]
    labeling_s = timeline["last_labels_s"] - timeline["actor_ready_s"]
    rows = side["rows_this_run"]
    return {"command": " ".join(["python"] + cmd[1:]).replace(os.path.join(tmp, "out"), "OUT"),
            "rows": rows, "audit_rate": side["audit_rate"], "command_s": command_s, "wall_s": side["wall_s"],
            "labeling_s": labeling_s, "engine_s": side["engine_s"], "first_labels_s": side["first_labels_s"],
            "timeline": timeline, "rows_per_s_command": rows / command_s, "rows_per_s_wall": rows / side["wall_s"],
            "rows_per_s_labeling": rows / labeling_s,
            "mean_exit_layer": side["summary"]["mean_exit_layer"], "summary_line": r.stdout.strip().splitlines()[-2]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--input", default="../shared/data/sst2/train.tsv")
    p.add_argument("--text-column", default="sentence")
    p.add_argument("--label-column", default="label")
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--out", default="job_throughput.json")
    p.add_argument("--skip-engine", action="store_true", help="job runs only")
    p.add_argument("--skip-job", action="store_true", help="engine only")
    args = p.parse_args()

    from adainfer_ray.job.cluster import threads_per_actor
    from adainfer_ray.job.config import JobConfig

    cfg = JobConfig(input=args.input, text_column=args.text_column, label_column=args.label_column, limit=args.limit)
    threads = threads_per_actor(len(os.sched_getaffinity(0)), 1)  # what plan_resources gives a lone CPU actor
    res = {"loadavg_before": os.getloadavg(), "input": args.input, "limit": args.limit, "threads": threads,
           "batch_size": cfg.batch_size, "engine": {}, "job": {}}
    if not args.skip_engine:
        ids, texts = job_rows(cfg)
        res["engine"] = engine_items_per_s(cfg, ids, texts, threads)
    if not args.skip_job:
        for name, flags in AUDITS.items():
            run = res["job"][name] = job_run(args, flags)
            if name in res["engine"]:
                engine = res["engine"][name]["items_per_s"]
                run["vs_engine"] = {k: run[k] / engine for k in
                                    ("rows_per_s_command", "rows_per_s_wall", "rows_per_s_labeling")}
            print(name, json.dumps(run), flush=True)
    res["loadavg_after"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
