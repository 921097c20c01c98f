"""The benchmark's catalogue: which settings exist, their letters, what each ratio is measured
against, the defaults, the definitions printed with every result, and `BenchmarkConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent.parent  # adainfer_ray/

SETTINGS = ("hf_prefix_cached", "hf_forward", "hf_forward_last", "engine_full", "engine_full_prefix",
            "exit_fixed_batches", "exit_regrouped", "exit_regrouped_prefix")
REFERENCE = "hf_prefix_cached"  # every headline ratio is against this one
DEFAULT_SETTINGS = SETTINGS
LETTERS = {"hf_prefix_cached": "r", "hf_forward": "a", "hf_forward_last": "a'", "engine_full": "b", "engine_full_prefix": "b'",
           "exit_fixed_batches": "c", "exit_regrouped": "d", "exit_regrouped_prefix": "e"}
# The full-depth setting each early-exit setting is measured against (same prefix handling).
COUNTERPART = {"exit_fixed_batches": "engine_full", "exit_regrouped": "engine_full",
               "exit_regrouped_prefix": "engine_full_prefix"}
DEFAULT_POLICY_DIR = PACKAGE_DIR / "data" / "policies" / "smollm2-135m-sentiment"
DEFAULT_DATA = "../shared/data/sst2/dev.tsv"
# The exit plan shape runs replay: item lengths and exit depths of the final CPU run (README).
DEFAULT_REPLAY = PACKAGE_DIR.parent / "docs" / "benchmark" / "benchmark.json"
DEFAULT_FIT_DATA = "../shared/data/sst2/train.tsv"
QUICK_ITEMS = 8  # --quick: a smoke test, a minute or less with the default model on 2 cores

DEFINITIONS = {
    "items_per_s": "items / wall seconds of one pass over all items (time.perf_counter; CUDA synchronized); "
                   "the median over rounds",
    "speedup_vs_ref": "items_per_s / items_per_s of hf_prefix_cached (r), the reference",
    "speedup_vs_hf, speedup_vs_hf_last": "the same against hf_forward (a) and hf_forward_last (a'), as context",
    "*_paired": "the same ratio taken within each round (settings of one round ran close together), then the "
                "median over rounds; targets are judged on it",
    "speedup_vs_counterpart": "items_per_s / items_per_s of the full-depth setting with the same prefix handling: "
                              "early exit's own contribution",
    "items_per_s_best, speedup_vs_ref_best, realized_fraction_best": "the same from the fastest round of each setting (noise on a shared "
                                            "machine only ever slows a round down)",
    "items_per_cpu_s, speedup_vs_ref_cpu, realized_fraction_cpu": "items per CPU second of this process (time.process_time, all threads), "
                                          "the median round: less sensitive to other processes' load than wall "
                                          "time, but counts threads spinning while they wait",
    "mean_exit_layer": "mean number of decoder layers each item ran before its answer was recorded",
    "ideal_speedup": "sum(flops_full_reuse) / sum(flops_used): the FLOP saving of early exit relative to the "
                     "same setting at full depth (same prefix handling); 1 for full-depth settings",
    "realized_fraction": "(items_per_s / items_per_s of the full-depth counterpart) / ideal_speedup; the "
                         "counterpart of exit_fixed_batches and exit_regrouped is engine_full, of "
                         "exit_regrouped_prefix it is engine_full_prefix; 1 for full-depth settings",
    "accuracy": "share of items whose label equals the gold label",
    "agreement": "share of items whose label equals the reference's (hf_prefix_cached) label on the same token ids",
    "padding_share": "engine settings: share of attention's token slots (B x longest) that were padding; projections and MLP run packed, without padding",
    "peak_mem_mb": "CPU: high-water RSS during the pass minus RSS just before it (Linux: the kernel's VmHWM, "
                   "reset per pass through /proc/self/clear_refs; elsewhere sampled every 5 ms by a thread; freed "
                   "heap is returned to the OS with malloc_trim before each pass), the max over rounds; CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the "
                   "memory allocated before the pass (weights, prefix cache)",
    "achieved_flops_per_s": "FLOPs the setting executed / wall seconds (median round). Executed = analytic "
                            "FLOPs (adainfer_ray.flops, padding excluded) of what actually ran: for hf_prefix_cached the items' "
                            "own tokens through every layer (prefix in the cache) plus the LM head on the last "
                            "position; for hf_forward "
                            "every layer on the whole prompt plus the LM head on every position; for "
                            "hf_forward_last the LM head on the last position only; for exit_fixed_batches "
                            "the exited items carried along until their batch's last item exits; otherwise "
                            "sum(flops_used)",
    "useful_flops_per_s": "sum(flops_used) / wall seconds: only the work each item needed",
    "matmul_flops_per_s": "2 n^3 / t of an n x n matmul (fp32 on CPU, bf16 on CUDA), timed once per round in "
                          "the same alternating run; the median",
    "fraction_of_matmul": "achieved_flops_per_s / matmul_flops_per_s",
}


@dataclass
class BenchmarkConfig:
    data: str = DEFAULT_DATA
    text_column: str = "sentence"
    label_column: str = "label"
    limit: int | None = None
    model: str | None = None
    policy: str = "default"
    task: str = "sentiment"
    device: str = "auto"
    threads: int | None = None
    rounds: int = 3
    warmup: int = 8
    max_batch_tokens: int | None = None  # engine token budget per layer step (B x padded T)
    hf_batch_tokens: int | None = None  # same rule for the padded batches of hf_forward
    max_inflight: int | None = None
    matmul_size: int | None = None
    settings: tuple[str, ...] = SETTINGS
    fit_data: str = DEFAULT_FIT_DATA
    fit_limit: int = 400
    fit_agreement: float = 0.99
    out: str = "benchmark_out"
    shape: str | None = None  # a real model shape with random weights (bench.shapes.SHAPES), exits replayed
    replay: str | None = None  # benchmark.json whose exit_plan a shape run replays (default: the shipped one)
    quick: bool = False
    command: str = ""
    log: bool = True


def plan_settings(requested) -> list[str]:
    """The requested settings plus what their ratios need (the reference, full-depth counterparts),
    in the canonical order."""
    unknown = set(requested) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}: choose from {SETTINGS}")
    wanted = set(requested) | {REFERENCE}
    wanted |= {COUNTERPART[s] for s in wanted if s in COUNTERPART}
    return [s for s in SETTINGS if s in wanted]
