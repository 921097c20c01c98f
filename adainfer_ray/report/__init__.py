"""Cost reports from the Parquet output of `jobs/classify.py`.

Users run early exit to save money; this package is how they see, and show, what was saved.
It is a leaf of `adainfer_ray`: it imports nothing from it but `schema` and `stats`, and never
torch or ray, so reports run anywhere pyarrow runs. Reading order for a newcomer:

    outputs.py   finding the data: `find_parquet_files`, `read_sidecar`, `iter_batches` (fsspec)
    summary.py   one run in bounded memory: `RunSummary`, `summarize_throughput`, `summarize_run`
    verdict.py   what the audit says of the promise (`run_verdict`) and the job's end-of-run summary
                 (`job_summary`)
    prices.py    device prices (`DEVICE_PRICES`, `resolve_price`)
    cost.py      money: `estimate_cost` turns the measured throughput into device-hours and currency
    compare.py   two runs side by side: `compare_runs`, a bounded-memory join by `id`
    plots.py     the PNGs, in one style (`new_figure`)
    text.py      number formats and the one Markdown table writer (`markdown_table`), shared with
                 the calibration report and the benchmark
    render.py    `report_sections` lays the report out once; `render_markdown`, `render_html` and
                 `terminal_summary` print it
    here         `build_report` (every figure) and `write_report` (everything, with summary.json)

Conventions in `summary.json` (stable snake_case names; `null` means "not computable", and a
`*_reason` or `warnings` entry says why):

- `*_share` values are fractions in [0, 1] (printed as percentages in the report).
- FLOP shares (`flops_saved_share`, `exit_saved_share`, `prefix_saved_share`) are weighted by
  `flops_full`: they answer "what share of the full-depth compute did this run not spend".
  `mean_compute_saved` is the unweighted mean over rows.
- `exit_layer_counts[k - 1]` is the number of rows that stopped after layer k (k = 1..num_layers).
- Error rows (`error` not null) count in `rows`, `error_rows`, `truncated_rows` and
  `gold_accuracy.rows_without_label`, and in no other figure.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

from adainfer_ray.report.compare import ROWS_PER_BUCKET, compare_runs
from adainfer_ray.report.cost import estimate_cost
from adainfer_ray.report.outputs import BATCH_ROWS, find_parquet_files, iter_batches, read_sidecar
from adainfer_ray.report.plots import PLOT_FILES, rows_saving_at_least, write_plots
from adainfer_ray.report.prices import (DEFAULT_GPU, DEFAULT_PRICE_PER_GPU_HOUR, DEFAULT_PRICE_SOURCE,
                                        DEVICE_PRICES, PRICE_CURRENCY, resolve_price)
from adainfer_ray.report.render import headline, render_html, render_markdown, report_sections, terminal_summary
from adainfer_ray.report.summary import RunSummary, is_full_depth, summarize_run, summarize_throughput
from adainfer_ray.report.verdict import job_summary, run_verdict
from adainfer_ray.stats import lower_bound, upper_bound, wilson_interval

__all__ = [
    "BATCH_ROWS", "DEFAULT_GPU", "DEFAULT_PRICE_PER_GPU_HOUR", "DEFAULT_PRICE_SOURCE", "DEVICE_PRICES",
    "PLOT_FILES", "PRICE_CURRENCY", "REPORT_VERSION", "ROWS_PER_BUCKET", "RunSummary", "build_report",
    "compare_runs", "estimate_cost", "find_parquet_files", "headline", "is_full_depth", "iter_batches",
    "job_summary", "lower_bound", "read_sidecar", "render_html", "render_markdown", "report_sections",
    "resolve_price", "rows_saving_at_least", "run_verdict", "summarize_run", "summarize_throughput",
    "terminal_summary", "upper_bound", "wilson_interval", "write_plots", "write_report",
]

REPORT_VERSION = 1


def build_report(inputs: list[str], price_per_gpu_hour=None,
                 gpu: str | None = None, compare: list[str] | None = None,
                 rows_per_bucket: int = ROWS_PER_BUCKET) -> dict:
    """All figures, as written to summary.json (without the plot file names)."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    compare = [compare] if isinstance(compare, str) else compare
    run = summarize_run(inputs)
    other = summarize_run(compare) if compare else None
    full_depth_run = other if other is not None and is_full_depth(other) else None
    price_source = "the run's own device" if price_per_gpu_hour is None else "given on the command line"
    report = {
        "report_version": REPORT_VERSION,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "price_source": price_source,
        "run": run,
        "cost": estimate_cost(run, price_per_gpu_hour, gpu, full_depth_run),
        "compare": None,
    }
    if other is not None:
        report["compare"] = {
            "run": other,
            "cost": estimate_cost(other, price_per_gpu_hour, gpu),
            "joined": compare_runs(inputs, compare, run, other, rows_per_bucket),
        }
    return report


def write_report(inputs: list[str], out_dir: str,
                 price_per_gpu_hour=None, gpu: str | None = None,
                 compare: list[str] | None = None, rows_per_bucket: int = ROWS_PER_BUCKET) -> dict:
    """Write report.md, report.html, the PNGs and summary.json into out_dir (a local folder)."""
    report = build_report(inputs, price_per_gpu_hour, gpu, compare, rows_per_bucket)
    os.makedirs(out_dir, exist_ok=True)
    report["plots"] = write_plots(report["run"], out_dir)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render_markdown(report))
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(render_html(report, out_dir))
    return report
