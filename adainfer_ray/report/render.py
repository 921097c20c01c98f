"""The report's layout and its renderers: `report_sections` lays the report out once, as `Section`s;
`render_markdown`, `render_html` and `terminal_summary` print it.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field

from adainfer_ray.report.text import (fmt_money, fmt_n, fmt_num, fmt_pct, fmt_proportion,
                                      markdown_table)
from adainfer_ray.report.verdict import drift_sentence

@dataclass
class Section:
    """One part of the report, printed the same way in Markdown and HTML."""
    title: str
    paragraphs: list[str] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None
    bullets: list[str] = field(default_factory=list)
    image: str | None = None  # a PNG file name in the output folder


def headline(report: dict) -> str:
    run, cost = report["run"], report["cost"]
    text = (f"{fmt_n(run['rows'])} rows; early exit saved {fmt_pct(run['exit_saved_share_same_prefix'])} of the FLOPs "
            f"of full depth with the same prefix handling (mean exit layer {fmt_num(run['mean_exit_layer'])} of "
            f"{fmt_n(run['num_layers'])}); prefix reuse, on its own line, saved {fmt_pct(run['prefix_saved_share'])} "
            "of the no-reuse FLOPs")
    if cost["saved_gpu_hours"] is not None:
        how = "measured" if cost["full_depth_source"] == "measured_full_depth_run" else "estimated"
        if cost["saved_cost"] is not None:
            text += (f"; cost {fmt_money(cost['run_cost'])} instead of {fmt_money(cost['full_depth_cost'])} at full "
                     f"depth ({how}), {fmt_money(cost['saved_cost'])} ({fmt_pct(cost['saved_share'])}) saved")
        else:
            text += (f"; {fmt_num(cost['run_gpu_hours'], 3)} device-hours instead of "
                     f"{fmt_num(cost['full_depth_gpu_hours'], 3)} at full depth ({how}), {fmt_pct(cost['saved_share'])} saved")
    return text + "."


def report_sections(report: dict) -> list[Section]:
    """The report's layout, once, for both renderers."""
    run, cost, throughput = report["run"], report["cost"], report["run"]["throughput"]
    sections = [Section("Summary", paragraphs=[headline(report)], bullets=[
        f"Inputs: {', '.join(run['inputs'])} ({run['files']} Parquet files)",
        f"Model: {throughput['model'] or 'n/a'}; policy: {throughput['policy'] or 'n/a'}; "
        f"device: {throughput['device'] or 'n/a'}; GPUs: {fmt_n(throughput['num_gpus'])}",
        f"Price: {fmt_money(cost['price_per_gpu_hour'])} per hour of {cost['gpu']} "
        f"({cost['price_source'] or report['price_source']})",
    ])]
    verdict = run.get("verdict") or {}
    if verdict.get("message"):
        sections.append(Section("Promise and audit", paragraphs=[verdict.get("promise") or "", verdict["message"]]))
    if run.get("drift"):
        sections.append(Section("The run acted on its audit", paragraphs=[drift_sentence(run["drift"])]))
    sections.append(Section("Rows", table=(["figure", "value"], [
        ["rows", fmt_n(run["rows"])],
        ["error rows", f"{fmt_n(run['error_rows'])} ({fmt_pct(run['error_share'])})"],
        ["labelled rows", fmt_n(run["labelled_rows"])],
        ["rows without error or label", fmt_n(run["unlabelled_rows"])],
        ["truncated rows", fmt_n(run["truncated_rows"])],
        ["mean prompt tokens", fmt_num(run["mean_tokens"], 1)],
        ["wall time", "n/a" if throughput["wall_s"] is None else f"{throughput['wall_s']:,.1f} s"],
        ["rows/s (run sidecar)", fmt_num(throughput["rows_per_s"])],
    ]), paragraphs=[] if throughput["available"] else
        [f"Throughput and cost are not available: {throughput['unavailable_reason']}."]))
    sections.append(Section("Compute saved", table=(["figure", "value"], [
        ["mean exit layer", f"{fmt_num(run['mean_exit_layer'])} of {fmt_n(run['num_layers'])}"],
        ["share of layers skipped (pruning ratio)", fmt_pct(run["layers_skipped_share"])],
        ["early exit: share of FLOPs saved vs full depth with the same prefix handling",
         fmt_pct(run["exit_saved_share_same_prefix"])],
        ["prefix reuse: share of the no-reuse FLOPs saved", fmt_pct(run["prefix_saved_share"])],
        ["both, vs full depth without prefix reuse", fmt_pct(run["flops_saved_share"])],
        ["mean per-row compute saved (unweighted)", fmt_pct(run["mean_compute_saved"])],
        ["FLOPs used / full depth", f"{run['flops_used']:.4g} / {run['flops_full']:.4g}"],
    ]), paragraphs=["FLOP shares are weighted by each row's FLOPs; early exit is measured against full "
                    "depth with the run's own prefix handling (its real saving), prefix reuse against no reuse; "
                    "the pruning ratio is the mean over rows."]))
    sections.append(_cost_section(cost))
    sections.append(Section("Quality", bullets=[
        f"Agreement with the full model on audited rows: {fmt_proportion(run['audit_agreement'])}",
        f"Accuracy against gold labels: {fmt_proportion(run['gold_accuracy'])}"
        + (f"; {fmt_n(run['gold_accuracy']['rows_without_label'])} rows with a gold label have "
           "no prediction" if run["gold_accuracy"]["rows_without_label"] else ""),
    ], paragraphs=["Intervals are 95% Wilson score intervals."]))
    sections.append(_label_health_section(run))
    sections.append(Section("Savings by label", table=(
        ["label", "rows", "share", "mean exit layer", "layers skipped", "FLOPs saved",
         "by early exit", "by prefix reuse"],
        [[str(label), fmt_n(figures["rows"]), fmt_pct(run["label_shares"][label]),
          fmt_num(figures["mean_exit_layer"]), fmt_pct(figures["layers_skipped_share"]),
          fmt_pct(figures["flops_saved_share"]), fmt_pct(figures["exit_saved_share"]),
          fmt_pct(figures["prefix_saved_share"])]
         for label, figures in run["savings_by_label"].items()]),
        image=report["plots"]["savings_by_label"]))
    total_exits = sum(run["exit_layer_counts"]) or 1
    sections.append(Section("Exit depth", table=(["exit layer", "rows", "share"], [
        [str(layer), fmt_n(n), fmt_pct(n / total_exits)]
        for layer, n in enumerate(run["exit_layer_counts"], start=1)]),
        image=report["plots"]["exit_depth"]))
    sections.append(Section("Cumulative savings", image=report["plots"]["cumulative_savings"],
                            paragraphs=["Share of rows (y) that saved at least a given share of "
                                        "their own full-depth FLOPs (x), in 1% bins."]))
    if report.get("compare"):
        sections.append(_compare_section(report))
    if run["warnings"]:
        sections.append(Section("Warnings", bullets=list(run["warnings"])))
    return sections


def _label_health_section(run: dict) -> Section:
    """The label distribution, written and at full depth on the audit sample, and what looks wrong."""
    health = run.get("label_health") or {"labels": [], "written": {"shares": {}}, "full_depth_audit": {"shares": {}},
                                         "warnings": []}
    gold = run.get("gold_label_counts") or {}
    gold_rows = sum(gold.values())
    rows = [[str(label), fmt_pct(health["written"]["shares"].get(label)),
             fmt_pct(health["full_depth_audit"]["shares"].get(label)),
             fmt_pct(gold.get(label, 0) / gold_rows) if gold_rows else "n/a"]
            for label in health["written"]["shares"]]
    return Section("Label health", table=(["label", "share written", "share at full depth (audit)", "share of gold labels"],
                                          rows),
                   paragraphs=[] if health["warnings"] else ["No sign of a label the model ignores or favours."],
                   bullets=list(health["warnings"]))


def _cost_section(cost: dict) -> Section:
    if cost["run_gpu_hours"] is None:
        return Section("Cost", paragraphs=[f"Not available: {cost['unavailable_reason']}."])
    missing = [f"Full depth not available: {cost['unavailable_reason']}."] \
        if cost["unavailable_reason"] else []
    rows = [
        ["run as it was", fmt_num(cost["run_gpu_hours"], 3), fmt_money(cost["run_cost"])],
        [f"same run at full depth, same prefix handling ({cost['full_depth_source'] or 'n/a'})",
         fmt_num(cost["full_depth_gpu_hours"], 3), fmt_money(cost["full_depth_cost"])],
        [f"saved by early exit ({fmt_pct(cost['saved_share'])})", fmt_num(cost["saved_gpu_hours"], 3),
         fmt_money(cost["saved_cost"])],
    ]
    if cost["saved_gpu_hours_by_prefix"] is not None:
        rows.append(["saved by prefix reuse (separately, vs no reuse)", fmt_num(cost["saved_gpu_hours_by_prefix"], 3),
                     fmt_money(cost["saved_cost_by_prefix"])])
    return Section("Cost", table=(["", "device-hours", "cost"], rows),
                   paragraphs=missing + ["Assumptions:"], bullets=list(cost["assumptions"]))


def _compare_section(report: dict) -> Section:
    run, cost = report["run"], report["cost"]
    other, other_cost = report["compare"]["run"], report["compare"]["cost"]
    joined = report["compare"]["joined"]

    def side_by_side(name, figure):
        return [name, figure(run, cost), figure(other, other_cost)]

    table = (["", "--input", "--compare"], [
        side_by_side("inputs", lambda r, c: ", ".join(r["inputs"])),
        side_by_side("policy", lambda r, c: str(r["throughput"]["policy"] or "n/a")),
        side_by_side("rows", lambda r, c: fmt_n(r["rows"])),
        side_by_side("error rows", lambda r, c: fmt_n(r["error_rows"])),
        side_by_side("mean exit layer", lambda r, c: fmt_num(r["mean_exit_layer"])),
        side_by_side("share of FLOPs saved", lambda r, c: fmt_pct(r["flops_saved_share"])),
        side_by_side("rows/s", lambda r, c: fmt_num(r["throughput"]["rows_per_s"])),
        side_by_side("run cost", lambda r, c: fmt_money(c["run_cost"])),
        ["accuracy against gold (joined rows)", fmt_proportion(joined["gold_accuracy_run"]),
         fmt_proportion(joined["gold_accuracy_compare"])],
    ])
    return Section("Compare", table=table, paragraphs=[
        "The two runs joined by id. Accuracy is over the joined rows where both runs have a "
        "label and a gold label exists, so both columns grade the same rows."], bullets=[
        f"Matched rows: {fmt_n(joined['matched_rows'])}; only in --input: "
        f"{fmt_n(joined['rows_only_in_run'])}; only in --compare: {fmt_n(joined['rows_only_in_compare'])}"
        f"; duplicate ids: {fmt_n(joined['duplicate_ids_run'])} / {fmt_n(joined['duplicate_ids_compare'])}",
        f"Label agreement: {fmt_proportion(joined['label_agreement'])}",
        f"Throughput ratio (--input rows/s / --compare rows/s): {fmt_num(joined['throughput_ratio'])}"
        + (f" ({joined['throughput_ratio_reason']})" if joined["throughput_ratio_reason"] else ""),
    ])


def render_markdown(report: dict) -> str:
    lines = ["# Early-exit cost report", "", f"Generated {report['generated_at']}.", ""]
    for section in report_sections(report):
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.bullets:
            lines += [f"- {bullet}" for bullet in section.bullets] + [""]
        if section.table:
            lines += markdown_table(*section.table) + [""]
        if section.image:
            lines += [f"![{section.title}]({section.image})", ""]
    return "\n".join(lines)


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; }
"""


def render_html(report: dict, out_dir: str) -> str:
    """A self-contained page: the PNGs from out_dir are embedded as base64 data URIs."""
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
             "<title>Early-exit cost report</title>", f"<style>{HTML_STYLE}</style></head><body>",
             "<h1>Early-exit cost report</h1>", f"<p>Generated {e(report['generated_at'])}.</p>"]
    for section in report_sections(report):
        parts.append(f"<h2>{e(section.title)}</h2>")
        parts += [f"<p>{e(paragraph)}</p>" for paragraph in section.paragraphs]
        if section.bullets:
            parts.append("<ul>" + "".join(f"<li>{e(b)}</li>" for b in section.bullets) + "</ul>")
        if section.table:
            header, rows = section.table
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        if section.image:
            with open(os.path.join(out_dir, section.image), "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            parts.append(f"<img alt='{e(section.title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def terminal_summary(report: dict, out_dir: str | None = None) -> str:
    run, cost = report["run"], report["cost"]
    lines = [headline(report),
             f"errors: {fmt_n(run['error_rows'])}; mean exit layer {fmt_num(run['mean_exit_layer'])} of "
             f"{fmt_n(run['num_layers'])}; layers skipped {fmt_pct(run['layers_skipped_share'])}; "
             f"rows/s {fmt_num(run['throughput']['rows_per_s'])}",
             f"audit agreement: {fmt_proportion(run['audit_agreement'])}"]
    if cost["run_gpu_hours"] is None:
        lines.append(f"cost: n/a ({cost['unavailable_reason']})")
    elif cost["run_cost"] is None:
        lines.append(f"cost: no price ({cost['price_source']}); run {fmt_num(cost['run_gpu_hours'], 4)} device-hours, "
                     f"full depth {fmt_num(cost['full_depth_gpu_hours'], 4)} "
                     f"({cost['full_depth_source'] or cost['unavailable_reason']})")
    else:
        lines.append(f"cost at {fmt_money(cost['price_per_gpu_hour'])}/hour of {cost['gpu']}: run "
                     f"{fmt_money(cost['run_cost'])}, full depth with the same prefix handling "
                     f"{fmt_money(cost['full_depth_cost'])} ({cost['full_depth_source'] or cost['unavailable_reason']}), "
                     f"saved {fmt_money(cost['saved_cost'])}")
    if report.get("compare"):
        joined = report["compare"]["joined"]
        lines.append(f"compare: label agreement {fmt_proportion(joined['label_agreement'])}; "
                     f"throughput ratio {fmt_num(joined['throughput_ratio'])}")
    if out_dir:
        lines.append(f"report: {os.path.join(out_dir, 'report.md')}, report.html, summary.json")
    return "\n".join(lines)

