"""Output: the result as benchmark.json and as benchmark.md (tables through the report's one
Markdown table writer, `report.text.markdown_table`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from adainfer_ray.bench.settings import COUNTERPART
from adainfer_ray.report.text import markdown_table


def _fmt_rate(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} "


def _x(r: dict, key: str) -> str:
    return f"{r[key]:.2f}x" if r.get(key) is not None else "—"


RESULTS_HEADER = ["setting", "items/s", "vs (r), paired", "vs (r)", "vs (a)", "early exit's own: vs full depth, paired",
                  "mean exit layer", "ideal speedup", "realised, paired", "accuracy", "agreement with (r)", "padding",
                  "peak mem MB", "achieved FLOP/s", "of matmul"]
ROBUST_HEADER = ["setting", "items/s, best round", "vs (r), best", "realised, best", "items per CPU-s", "vs (r), CPU",
                 "realised, CPU", "seconds per round"]


def _share(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}%}"


def _settings_table(result: dict, header: list[str], cells) -> str:
    """A Markdown table with one row per setting: its letter and name, then cells(figures, is_early_exit)."""
    rows = [[f"({r['letter']}) `{s}`", *cells(r, s in COUNTERPART)] for s, r in result["settings"].items()]
    return "\n".join(markdown_table(header, rows))


def _result_cells(r: dict, exitish: bool) -> list[str]:
    return [f"{r['items_per_s']:.2f}", f"**{_x(r, 'speedup_vs_ref_paired')}**", _x(r, "speedup_vs_ref"),
            _x(r, "speedup_vs_hf"), f"{r['speedup_vs_counterpart_paired']:.2f}x vs `{r['counterpart']}`" if exitish else "—",
            f"{r['mean_exit_layer']:.2f}", f"{r['ideal_speedup']:.2f}x" if exitish else "—",
            f"{r['realized_fraction_paired']:.0%}" if exitish else "—", _share(r.get("accuracy"), 1),
            f"{r['agreement']:.1%}", _share(r.get("padding_share"), 0), f"{r['peak_mem_mb']:.0f}",
            f"{_fmt_rate(r['achieved_flops_per_s'])}FLOP/s", f"{r['fraction_of_matmul']:.0%}"]


def _robust_cells(r: dict, exitish: bool) -> list[str]:
    return [f"{r['items_per_s_best']:.2f}", f"{r['speedup_vs_ref_best']:.2f}x",
            f"{r['realized_fraction_best']:.0%}" if exitish else "—", f"{r['items_per_cpu_s']:.2f}",
            f"{r['speedup_vs_ref_cpu']:.2f}x", f"{r['realized_fraction_cpu']:.0%}" if exitish else "—",
            ", ".join(f"{x:.1f}" for x in r["seconds_per_round"])]


def results_table(result: dict) -> str:
    """One row per setting: rates, ratios against (r) and the counterpart, quality, memory, FLOP/s."""
    return _settings_table(result, RESULTS_HEADER, _result_cells)


def robust_table(result: dict) -> str:
    """The same runs seen through the fastest round and through CPU time (load-robust views)."""
    return _settings_table(result, ROBUST_HEADER, _robust_cells)


def markdown(result: dict) -> str:
    m, d, b = result["machine"], result["data"], result["batching"]
    where = (f"{m.get('gpu')} ({m.get('gpu_memory_gb')} GB), CUDA, {result['model']['dtype']}"
             if m["device"].startswith("cuda") else
             f"{m.get('cpu')}, {m['threads']} torch thread{'s' if m['threads'] != 1 else ''} on {m['cpu_count']} cores, {m.get('memory_gb', '?')} GB, "
             f"CPU, {result['model']['dtype']}")
    t = result["targets"]
    tl = [f"- `{k}`: paired {v['paired']:.2f} (goal {v['goal']}) — **{'met' if v['met'] else 'missed'}**"
          f"; ratio of medians {v['value']:.2f}"
          + (f"; agreement with (r) {v['agreement']:.1%}" if "agreement" in v else "") for k, v in t.items()]
    defs = "\n".join(f"- **{k}**: {v}" for k, v in result["definitions"].items())
    model = f"`{result['model']['id']}`" + (f" (shape `{result['model']['shape']}`, random weights, exit depths "
                                             f"replayed)" if result["model"].get("shape") else "")
    return f"""# Benchmark: early exit and shared-prefix reuse vs transformers with a cached prefix

Command: `{result['command']}`

Machine: {where}; torch {m['torch']}, transformers {m.get('transformers', '?')}, Python {m['python']}, {m['platform']}.
Load average before/after the timed rounds: {m.get('loadavg_before')} / {m.get('loadavg_after')} (the machine is shared;
alternating order and within-round ratios make the ratios fair, absolute rates are noisy).
Measured matmul rate ({result['matmul']['n']}x{result['matmul']['n']} {result['matmul']['dtype']}, median over rounds):
**{_fmt_rate(result['matmul_flops_per_s'])}FLOP/s**.

Data: {d['items']} items of `{d['path']}` ({d['task']}), few-shot prefix {d['prefix_tokens']} tokens, items
{d['mean_item_tokens']:.1f} tokens on average (max {d['max_item_tokens']}). Model {model}
({result['model']['layers']} layers). Exit policy: {result['policy']['source']} ({result['policy']['features']}
features, threshold {result['policy']['threshold']:.4g}).

Timing: {result['warmup_items']} warm-up items per setting, then {result['rounds']} round(s), {result['order']};
items/s is the median round; "paired" ratios are taken within each round, then the median.

{results_table(result)}

Load-robust views of the same runs: the fastest round of each setting (other processes only ever slow
a round down) and CPU seconds of this process (`time.process_time`, all threads):

{robust_table(result)}

Batching: every setting cuts its items, sorted by length, into batches of at most {b['max_batch_tokens']} padded tokens
(B x longest sequence it runs: the item's own tokens where the prefix is cached or reused, prefix + item otherwise;
`engine.length_batches`, the rule the engine applies to every layer step), hf settings {b['hf_batch_tokens']}
(mean batch {b['hf_mean_batch_size']:.1f} prompts). In-flight cap: {b['max_inflight'] or 'none (all items)'}.
Setup (model already loaded; building runners and the prefix caches): {result['prefix_cache_and_setup_s']:.2f} s, not
included in any setting's time.

## Settings

- (r) `hf_prefix_cached`, **the reference**: the model's own `forward` with the few-shot prefix computed once
  (`past_key_values`), expanded to each batch (`DynamicCache(ddp_cache_data=...)`), the items' own tokens
  left-padded after it (attention mask: prefix, pads, item; position ids continue after the prefix),
  `logits_to_keep=1`. What a careful transformers user writes.
- (a) `hf_forward`: `forward` on prefix + item, left-padded, `use_cache=False`, the LM head on every position
  (`model(**batch).logits[:, -1]`). (a') `hf_forward_last`: the same with `logits_to_keep=1`. Context only.
- (b) `engine_full`: our engine, full depth, no prefix reuse. (b') `engine_full_prefix`: with the prefix's keys and
  values computed once and reused.
- (c) `exit_fixed_batches`: early exit, a batch runs until its last item exits (exited items carried along).
- (d) `exit_regrouped`: early exit with depth regrouping. (e) `exit_regrouped_prefix`: (d) plus prefix reuse, what
  the job runs. Early exit's own contribution: (e) vs (b'); prefix reuse's: (b') vs (b).

## Targets (judged on the paired ratio)

{chr(10).join(tl)}

## Definitions

{defs}
"""


def write_results(result: dict, out: str) -> tuple[Path, Path]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    jpath, mpath = folder / "benchmark.json", folder / "benchmark.md"
    jpath.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    mpath.write_text(markdown(result))
    return jpath, mpath


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x)}")
