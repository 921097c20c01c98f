"""Measure every speedup in one process against the strongest plain baseline.

`run_benchmark(BenchmarkConfig(...))` loads one model, one exit policy and one labeled data set,
then times these settings on exactly the same token ids (the few-shot prefix + each item's tokens),
all batched by the engine's own rule (`engine.length_batches`):

    hf_prefix_cached       (r)  THE REFERENCE: the model's own `forward`, the shared prefix computed
                                once as `past_key_values` and expanded per batch, `logits_to_keep=1`:
                                what a careful transformers user writes
    hf_forward             (a)  context: `forward` on prefix + item, logits for every position
    hf_forward_last        (a') context: the same with `logits_to_keep=1`
    engine_full            (b)  our layer-by-layer engine, full depth, no prefix reuse
    engine_full_prefix     (b') (b) with the shared prefix computed once and reused
    exit_fixed_batches     (c)  early exit, a batch runs until its last item exits
    exit_regrouped         (d)  early exit with depth regrouping
    exit_regrouped_prefix  (e)  (d) plus shared-prefix reuse: what the job runs

The headline is (e) vs (r). Early exit's own contribution is (e) vs (b') (same prefix handling);
prefix reuse's is (b') vs (b). Every setting is warmed up, then run for R rounds in alternating
order (forward, reverse, ...); items/s is the median over rounds and every ratio is also taken
within each round ("paired"), then the median. With `shape`, the models are random-weight models
of real shapes and the exit depths are replayed from a real policy's run.

    settings.py   the catalogue: SETTINGS, letters, counterparts, defaults, DEFINITIONS, BenchmarkConfig
    workload.py   the model, the policy (the job's resolution, or `--policy fit` through
                  `calibrate.calibrate`) and the token ids every setting runs on
    shapes.py     random-weight models of real shapes, exit depths replayed
    baselines.py  the runner of each setting: HFForward (plain transformers), the engine recorded/replayed
    measure.py    PeakMemory, matmul_rate, the machine, the timed rounds, executed FLOPs
    run.py        run_benchmark: workload -> runners -> timed rounds -> figures and targets
    render.py     write_results: benchmark.json and benchmark.md
"""

from adainfer_ray.bench.render import markdown, results_table, robust_table, write_results
from adainfer_ray.bench.run import run_benchmark, summarize, targets
from adainfer_ray.bench.settings import (COUNTERPART, DEFAULT_DATA, DEFAULT_FIT_DATA, DEFAULT_POLICY_DIR,
                                         DEFAULT_REPLAY, DEFINITIONS, LETTERS, QUICK_ITEMS, REFERENCE, SETTINGS,
                                         BenchmarkConfig, plan_settings)
from adainfer_ray.bench.shapes import SHAPES
from adainfer_ray.bench.workload import read_labeled
from adainfer_ray.policy import PolicyError

__all__ = ["BenchmarkConfig", "COUNTERPART", "DEFAULT_DATA", "DEFAULT_FIT_DATA", "DEFAULT_POLICY_DIR", "DEFAULT_REPLAY",
           "DEFINITIONS", "LETTERS", "PolicyError", "QUICK_ITEMS", "REFERENCE", "SETTINGS", "SHAPES", "markdown",
           "plan_settings", "read_labeled", "results_table", "robust_table", "run_benchmark", "summarize", "targets",
           "write_results"]
