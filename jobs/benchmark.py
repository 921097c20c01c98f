"""Measure every speedup in one run: `python jobs/benchmark.py` (from the repository root).

Times, on the same token ids and in one process, in alternating order after a warm-up:
(r) the reference, transformers with the shared prefix cached (past_key_values) and
logits_to_keep=1; as context (a) plain transformers forward (a': logits_to_keep=1); (b) our engine
at full depth (b': with shared-prefix reuse), (c) early exit with fixed batches, (d) early exit
with depth regrouping, (e) (d) plus shared-prefix reuse; and a large matmul for the machine's rate.
Writes benchmark.json and benchmark.md into --out. Argument parsing only; the work is in
`adainfer_ray.bench`. On CUDA it uses the GPU (bf16) and says so. `--shape NAME` runs the same
settings on a random-weight model of a real shape with exit depths replayed from a real run.
"""

import argparse
import os
import shlex
import sys

try:
    import adainfer_ray  # noqa: F401
except ImportError:  # run from a checkout without installing: put the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adainfer_ray import bench


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python jobs/benchmark.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", default=bench.DEFAULT_DATA,
                        help="labeled TSV/CSV with a header (SST-2 dev by default; read relative to the "
                             "current directory)")
    parser.add_argument("--text-column", default="sentence", help="column holding the text")
    parser.add_argument("--label-column", default="label",
                        help="column holding the gold label: an index into the task's labels, or a label name")
    parser.add_argument("--limit", type=int, default=None,
                        help=f"use only the first N rows of --data (default: %(default)s = all rows; --quick: {bench.QUICK_ITEMS})")
    parser.add_argument("--task", default="sentiment", help="built-in prompt task (few-shot prefix + template)")
    parser.add_argument("--model", default=None,
                        help="model: a local Hugging Face folder or an fsspec URI (default: %(default)s = the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--policy", default="default",
                        help="exit policy: `default` (the shipped adainfer_ray/data/policies/"
                             "smollm2-135m-sentiment; an error if it is missing), a policy folder, or `fit` "
                             "(calibrate one on --fit-data now, as classify --calibrate does, and save it under --out)")
    parser.add_argument("--fit-data", default=bench.DEFAULT_FIT_DATA,
                        help="with --policy fit: labeled data to calibrate the policy on (never the "
                             "evaluation data)")
    parser.add_argument("--fit-limit", type=int, default=400,
                        help="with --policy fit: how many --fit-data rows to trace (--quick: at most 40)")
    parser.add_argument("--fit-agreement", type=float, default=0.99,
                        help="with --policy fit: agreement with the full-depth answer the policy must keep "
                             "(calibrate's epsilon = 1 - this, tested on the held-out half of the fit items)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: %(default)s = the cores this process may use: what "
                             "jobs/classify.py gives its one CPU actor per node)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds per setting, in alternating order; items/s is the median "
                             "(--quick: 1)")
    parser.add_argument("--warmup", type=int, default=8,
                        help="items each setting runs once before timing (--quick: 1)")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="engine token budget per layer step (batch x longest prompt) (default: %(default)s = "
                             "the engine's: 2048 on CPU, 16384 on CUDA)")
    parser.add_argument("--hf-batch-tokens", type=int, default=None,
                        help="token budget per padded batch of the plain-transformers settings, same rule "
                             "(default: %(default)s = --max-batch-tokens, for a fair comparison)")
    parser.add_argument("--max-inflight", type=int, default=None,
                        help="engine: most items in flight at once under regrouping (default: %(default)s = all)")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="n of the n x n matmul timed for the machine's rate (default: %(default)s = 2048 "
                             "fp32 on CPU, 8192 bf16 on CUDA)")
    parser.add_argument("--settings", nargs="+", default=list(bench.SETTINGS), choices=bench.SETTINGS,
                        metavar="SETTING",
                        help="settings to time (the reference hf_prefix_cached and the full-depth counterparts "
                             f"of early-exit settings are always added); choices: {' '.join(bench.SETTINGS)}")
    parser.add_argument("--shape", default=None, choices=sorted(bench.SHAPES),
                        help="instead of --model/--data/--policy: a random-weight model of this real shape (bf16 "
                             "on CUDA), item lengths and exit depths replayed from --replay")
    parser.add_argument("--replay", default=None,
                        help="with --shape: a benchmark.json whose exit_plan to replay (default: %(default)s = "
                             "docs/benchmark/benchmark.json, the README's CPU run)")
    parser.add_argument("--out", default="benchmark_out/", help="folder for benchmark.json and benchmark.md")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test for CI: {bench.QUICK_ITEMS} items unless --limit, 1 round, 1 warm-up item "
                             "(checks that it runs and writes sane numbers, not how fast)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python jobs/benchmark.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    cfg = bench.BenchmarkConfig(
        data=args.data, text_column=args.text_column, label_column=args.label_column, limit=args.limit,
        model=args.model, policy=args.policy, task=args.task, device=args.device, threads=args.threads,
        rounds=args.rounds, warmup=args.warmup, max_batch_tokens=args.max_batch_tokens,
        hf_batch_tokens=args.hf_batch_tokens, max_inflight=args.max_inflight, matmul_size=args.matmul_size,
        settings=tuple(args.settings), fit_data=args.fit_data, fit_limit=args.fit_limit,
        fit_agreement=args.fit_agreement, out=args.out, shape=args.shape, replay=args.replay, quick=args.quick,
        command=command.strip())
    try:
        result = bench.run_benchmark(cfg)
    except (bench.PolicyError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    jpath, mpath = bench.write_results(result, args.out)
    print()
    print(bench.results_table(result))
    print(f"\nmatmul {result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
