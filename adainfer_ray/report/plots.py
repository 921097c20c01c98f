"""The plots, in one style: `new_figure` (matplotlib's Figure API, constrained layout, 100 dpi).

Every PNG of the package, the calibration report's included, starts from `new_figure` and ends
with `figure.savefig(path)`, so sizes, resolution and layout match across reports.
"""

from __future__ import annotations

import os

import numpy as np

PLOT_FILES = {
    "exit_depth": "exit_depth_histogram.png",
    "savings_by_label": "savings_by_label.png",
    "cumulative_savings": "cumulative_savings.png",
}
MAX_LABELS_PLOTTED = 25


def new_figure(width: float = 7.0, height: float = 4.0):
    """A (figure, axes) pair in the house style; save it with `figure.savefig(path)`."""
    # matplotlib is imported here, not at the top: summaries need no plotting library, and the
    # object-oriented Figure API needs no global backend (it renders with Agg in savefig).
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure, figure.subplots()


def plot_exit_depth(summary: dict, path: str) -> None:
    """Bar chart: rows per exit layer, with the mean exit layer marked."""
    figure, axes = new_figure()
    counts = summary["exit_layer_counts"]
    axes.bar(range(1, len(counts) + 1), counts, color="#4c72b0")
    if summary["mean_exit_layer"] is not None:
        axes.axvline(summary["mean_exit_layer"], color="#c44e52", linestyle="--",
                     label=f"mean exit layer {summary['mean_exit_layer']:.2f}")
        axes.legend()
    axes.set_xlabel(f"exit layer (of {summary['num_layers'] or '?'})")
    axes.set_ylabel("rows")
    axes.set_title("Exit-depth histogram")
    figure.savefig(path)


def plot_savings_by_label(summary: dict, path: str) -> None:
    """Stacked horizontal bars: share of full-depth FLOPs saved per label, by early exit and by
    prefix reuse (the most frequent labels first)."""
    labels = list(summary["savings_by_label"])[:MAX_LABELS_PLOTTED]
    exit_shares = [summary["savings_by_label"][l]["exit_saved_share"] or 0.0 for l in labels]
    prefix_shares = [summary["savings_by_label"][l]["prefix_saved_share"] or 0.0 for l in labels]
    figure, axes = new_figure(7.0, max(2.5, 0.35 * len(labels) + 1.5))
    positions = np.arange(len(labels))
    axes.barh(positions, exit_shares, color="#4c72b0", label="early exit")
    axes.barh(positions, prefix_shares, left=exit_shares, color="#dd8452", label="prefix reuse")
    axes.set_yticks(positions, labels=[str(l) for l in labels])
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("share of full-depth FLOPs saved")
    axes.set_title("Savings by label" + (f" (top {MAX_LABELS_PLOTTED})"
                                         if len(summary["savings_by_label"]) > len(labels) else ""))
    axes.legend(loc="lower right")
    figure.savefig(path)


def rows_saving_at_least(histogram: list[int]) -> list[float]:
    """From a saved-share histogram: the share of rows that saved at least each bin's lower edge."""
    counts = np.asarray(histogram, dtype=np.float64)
    total = counts.sum()
    if not total:
        return [0.0] * len(counts)
    return (counts[::-1].cumsum()[::-1] / total).tolist()


def plot_cumulative_savings(summary: dict, path: str) -> None:
    """Curves: share of rows that saved at least x of their full-depth compute, for x in [0, 1].

    Reads the fixed-bin histograms of the summary, so it costs nothing extra at 10 million rows.
    """
    histogram = summary["saved_share_histogram"]
    edges = histogram["bin_edges"][:-1]
    figure, axes = new_figure()
    for name, text, color in (("compute_saved", "total", "#55a868"),
                              ("exit_saved", "early exit", "#4c72b0"),
                              ("prefix_saved", "prefix reuse", "#dd8452")):
        axes.step(edges, rows_saving_at_least(histogram[name]), where="post", label=text, color=color)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("share of the row's full-depth FLOPs saved, at least")
    axes.set_ylabel("share of rows")
    axes.set_title("Cumulative savings")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path)


def write_plots(summary: dict, out_dir: str) -> dict[str, str]:
    """Write the three PNGs into out_dir; return {plot name: file name}."""
    plot_exit_depth(summary, os.path.join(out_dir, PLOT_FILES["exit_depth"]))
    plot_savings_by_label(summary, os.path.join(out_dir, PLOT_FILES["savings_by_label"]))
    plot_cumulative_savings(summary, os.path.join(out_dir, PLOT_FILES["cumulative_savings"]))
    return dict(PLOT_FILES)

