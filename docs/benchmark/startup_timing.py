"""Where the fixed cost of `python jobs/classify.py` goes, one piece at a time (issue 13, point 3).

    PYTHONPATH=$PWD python docs/benchmark/startup_timing.py [--out docs/benchmark/startup.json]

Each import is timed in a fresh interpreter (import cost depends on what is already loaded); the
job's own steps (model folder, fingerprint, tokenizer, model load, prefix cache, first batch) are
timed in one process in the order an actor runs them; `ray.init` is timed in fresh interpreters
with and without the dashboard. Seconds of wall time; the machine's load average is recorded.
"""

import argparse
import json
import os
import subprocess
import sys
import time

IMPORTS = ["torch", "transformers", "ray", "ray.data", "adainfer_ray.job"]
RAY_INIT = {
    "ray.init() (the job's call)": "ray.init(log_to_driver=True)",
    "ray.init(include_dashboard=False)": "ray.init(log_to_driver=True, include_dashboard=False)",
}


def in_fresh_python(code: str) -> float | str:
    """Runs `code` in a new interpreter; it prints the seconds it measured (or its error's last line)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    if out.returncode:
        return "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:300]
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="startup_timing.json")
    parser.add_argument("--items", type=int, default=64, help="items in the first batch")
    args = parser.parse_args()
    res = {"loadavg_before": os.getloadavg(), "imports_s": {}, "ray_init_s": {}, "actor_s": {}}
    for mod in IMPORTS:
        res["imports_s"][mod] = in_fresh_python(
            f"import time; t = time.perf_counter(); import {mod}; print(time.perf_counter() - t)")
    for name, call in RAY_INIT.items():
        res["ray_init_s"][name] = in_fresh_python(
            "import time, ray; t = time.perf_counter(); " + call + "; dt = time.perf_counter() - t; "
            "ray.shutdown(); print(dt)")

    import torch
    from transformers import AutoTokenizer

    from adainfer_ray.bench import read_labeled
    from adainfer_ray.engine import EarlyExitEngine
    from adainfer_ray.models import load_model, model_fingerprint, resolve_model_dir
    from adainfer_ray.policy import ExitPolicy
    from adainfer_ray.prompts import PromptEncoder, make_task
    from adainfer_ray.bench import DEFAULT_POLICY_DIR

    from adainfer_ray.job.cluster import threads_per_actor

    torch.set_num_threads(threads_per_actor(len(os.sched_getaffinity(0)), 1))  # a lone CPU actor's threads
    a = res["actor_s"]

    def timed(name, fn):
        t = time.perf_counter()
        value = fn()
        a[name] = time.perf_counter() - t
        return value

    model_dir = timed("resolve_model_dir (default: converted GGUF in the cache)", lambda: resolve_model_dir(None))
    timed("model_fingerprint (sha256 of the weights; preflight and every actor each do it)",
          lambda: model_fingerprint(model_dir))
    timed("AutoTokenizer.from_pretrained (preflight loads it, then every actor again)",
          lambda: AutoTokenizer.from_pretrained(model_dir))
    lm = timed("load_model (config, weights, tokenizer, fingerprint)", lambda: load_model(None, "cpu"))
    policy = timed("ExitPolicy.load", lambda: ExitPolicy.load(DEFAULT_POLICY_DIR))
    task = make_task("sentiment")
    enc = PromptEncoder(task, lm.tokenizer, lm.max_context)
    texts, _ = read_labeled("../shared/data/sst2/dev.tsv", limit=args.items)
    e = timed(f"tokenise {args.items} items", lambda: enc.encode(texts))
    eng = timed("EarlyExitEngine (prefix cache: one pass of the prefix)",
                lambda: EarlyExitEngine(lm, enc.label_token_ids, policy, e.prefix_ids))
    timed(f"first classify of {args.items} items (cold)", lambda: eng.classify(e.item_ids))
    timed(f"second classify of {args.items} items (warm)", lambda: eng.classify(e.item_ids))
    res["loadavg_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
