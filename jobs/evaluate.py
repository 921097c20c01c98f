"""Measure exit policies on labeled data: `python jobs/evaluate.py --input FILE --label-column label`.

Runs each policy with every item audited (after it stops, it runs on to full depth), so one pass
gives both the early-exit answer and the full model's answer. Prints and writes (JSON + markdown)
one row per policy: accuracy at full depth, accuracy with early exit, agreement with the full
model, share of layers skipped, share of FLOPs saved, mean exit layer. Never evaluate on the data
a policy was calibrated on.

Takes the same input and task flags as jobs/calibrate.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

try:
    import adainfer_ray  # noqa: F401
except ImportError:  # run from a checkout without installing: put the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # jobs/calibrate.py: the shared input flags
from calibrate import add_input_args, read_labeled_texts, task_from_args  # noqa: E402

from adainfer_ray import calibrate as cal  # noqa: E402
from adainfer_ray.policy import ExitPolicy  # noqa: E402


def resolve_policy(spec: str, model_id: str, task_name: str) -> ExitPolicy:
    """`default` (the shipped policy for this model and task), `full`, or a policy folder."""
    if spec == "full":
        return ExitPolicy.full_depth()
    if spec == "default":
        path = cal.shipped_policy_path(model_id, task_name)
        if path is None:
            raise SystemExit(f"no shipped policy for model {model_id} and task {task_name}: pass a folder")
        return ExitPolicy.load(path)
    return ExitPolicy.load(spec)


def render_markdown(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "",
             "| policy | guarantee | items | accuracy, full depth | accuracy, early exit | agreement with full model "
             "| layers skipped | FLOPs saved by exiting | mean exit layer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = lambda x, d=1: "—" if x is None else f"{100 * x:.{d}f}%"  # noqa: E731
        lines.append(f"| {r['policy']} | {r['guarantee']} | {r['items']} | {pct(r['accuracy_full'])} | "
                     f"{pct(r['accuracy_exit'])} | {pct(r['agreement'])} | {pct(r['layers_skipped'])} | "
                     f"{pct(r['flops_saved_vs_reuse'])} | {r['mean_exit_layer']:.1f} / {r['num_layers']} |")
    lines += ["", "FLOPs saved by exiting: against a full-depth run that also reuses the few-shot prefix (the "
              "classify job's own `exit_saved` column divides the same saving by the no-reuse reference "
              "instead; both are in the JSON)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python jobs/evaluate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_input_args(parser)
    parser.add_argument("--policy", nargs="+", default=["default"],
                        help="policies to measure: `default` (shipped for the model and task), `full`, or folders")
    parser.add_argument("--out", default="docs/results/evaluation", help="folder for evaluation.json and evaluation.md")
    parser.add_argument("--title", default=None, help="heading of the markdown table (default: input and task)")
    args = parser.parse_args(argv)

    import torch

    from adainfer_ray.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    task = task_from_args(args)
    texts, gold, _ = read_labeled_texts(args, task)
    lm = load_model(args.model, device=args.device)
    rows = []
    for spec in args.policy:
        policy = resolve_policy(spec, lm.model_id, task.name)
        print(f"evaluating policy {spec} on {len(texts)} items...")
        row = cal.evaluate(lm, task, policy, texts, gold, chunk=args.batch_size)
        meta = policy.metadata
        row["policy"] = spec
        row["guarantee"] = (f"eps {meta['epsilon']}, delta {meta['delta']} ({meta.get('features')}, "
                            f"{meta.get('calibration_size')} items)" if meta.get("guaranteed") else
                            "none (full depth)" if policy.never_exits else "none")
        row["policy_metadata"] = meta
        rows.append(row)
    title = args.title or f"{task.name} on {args.input} ({len(texts)} items)"
    md = render_markdown(rows, title)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "evaluation.json"), "w") as f:
        json.dump({"input": args.input, "task": task.to_dict(), "model": lm.model_id, "model_hash": lm.model_hash,
                   "command": shlex.join(["python", "jobs/evaluate.py"] + (argv if argv is not None else sys.argv[1:])),
                   "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "evaluation.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
