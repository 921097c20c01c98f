"""The calibration report: what each feature mode and threshold would cost in agreement and save.

`write_report(result, folder)` writes
    report.md                   the promise, the chosen policy, and a table per family
    calibration.json            the summary and every (family, threshold) row
    savings_vs_agreement.png    FLOPs saved against agreement with the full model, one line per family
and returns the folder. Rendering only: the numbers come from `calibrate.calibrate`.
"""

from __future__ import annotations

import json
import os

from adainfer_ray.calibrate import CalibrationResult
from adainfer_ray.report.plots import new_figure  # one plot style for every report
from adainfer_ray.report.text import fmt_pct as _pct  # one number format for every report
from adainfer_ray.report.text import markdown_table


def _table(rows: list[dict], has_gold: bool) -> list[str]:
    header = ["threshold", "exits early", "layers skipped", "FLOPs saved", "agreement", "disagreements", "mean loss",
              "p-value", "accepted"] + (["accuracy"] if has_gold else [])
    return markdown_table(header, [
        [f"{r['threshold']:.4f}", _pct(r["exit_early_share"]), _pct(r["layers_skipped"]), _pct(r["flops_saved"]),
         _pct(r["agreement"], 2), r["disagreements"], f"{r['loss']:.4f}", f"{r['p_value']:.3g}",
         "yes" if r["accepted"] else ""] + ([_pct(r["accuracy"], 2)] if has_gold else []) for r in rows])


def _rows_to_show(rows: list[dict], every: int = 10) -> list[dict]:
    """Every `every`-th candidate, plus the last accepted one and its successor (the first failure)."""
    last = max((r["rank"] for r in rows if r["accepted"]), default=-1)
    return [r for r in rows if r["rank"] % every == 0 or r["rank"] in (last, last + 1)]


def _promise_sentence(s: dict) -> str:
    if s.get("promise") == "accuracy":
        return f"early exit's accuracy at most {_pct(s['epsilon'], 2)} below full depth's (gold labels)"
    return f"disagreement with the full model <= {s['epsilon']}"


def render_markdown(result: CalibrationResult) -> str:
    s, meta = result.summary, result.policy.metadata
    has_gold = s["full_depth_accuracy"] is not None
    lines = [
        "# Exit policy calibration",
        "",
        f"Model `{meta.get('model_id', '?')}` ({meta.get('model_hash', '?')}), task `{meta.get('task', '?')}` "
        f"(prompt {meta.get('task_fingerprint', '?')}), input `{meta.get('input', '?')}`.",
        f"Calibration sample: {s['calibration_size']} items, {s['fit_size']} to fit probes and exit rules, "
        f"{s['test_size']} to test thresholds (seed {s['seed']}).",
        f"Promise asked: {_promise_sentence(s)} with probability >= {1 - s['delta']:.3g}. "
        f"One rule was chosen on the fit part among the candidates below (feature modes {', '.join(s['modes'])}, "
        f"`{s['score']}` scores, with and without history as listed; the simplest whose saving is within one "
        f"bootstrap standard error of the best) and only its thresholds were tested, "
        f"at the whole delta {s['delta']:.3g}"
        + (f": the test accepts up to {_pct(s['tolerated_disagreement'], 2)} disagreement." if s.get("tolerated_disagreement") is not None else "."),
        "",
        "| candidate | history | best rule on the fit part | min_layer | FLOPs saved on the fit part | chosen |",
        "|---|---|---|---|---|---|",
        *[f"| {c['mode']} | {'yes' if c['history'] else 'no'} | `{c['rule']}` | {c['min_layer']} | "
          f"{_pct(c['fit_flops_saved']) if c['fit_flops_saved'] is not None else 'none tolerated'} | "
          f"{'**yes**' if c.get('chosen') else ''} |"
          for c in s.get("candidates", [])],
        "",
        "**Result.** " + s["message"],
        "",
    ]
    if s["guaranteed"]:
        chosen = (f"Chosen: features `{s['features']}`, rule `{s['rule']}`, min_layer {s['min_layer']}, "
                  f"threshold {s['threshold']:.4f}")
        if has_gold:
            chosen += (f"; accuracy on the test part {_pct(s['accuracy'], 2)} "
                       f"vs {_pct(s['full_depth_accuracy'], 2)} at full depth")
        lines += [chosen + ".", ""]
    if has_gold:
        lines += ["## The paper's criterion (no guarantee)", "",
                  "For the chosen rule, the threshold with the most layers skipped whose accuracy on the test part is at most "
                  "1 point below full depth "
                  f"({_pct(s['full_depth_accuracy'], 2)} on {s['gold_items']} items). Chosen and measured on the same "
                  "items, so optimistic.", ""]
        lines += markdown_table(["mode", "threshold", "layers skipped", "FLOPs saved", "agreement", "accuracy"], [
            [mode] + ["—"] * 5 if r is None else
            [mode, f"{r['threshold']:.4f}", _pct(r["layers_skipped"]), _pct(r["flops_saved"]), _pct(r["agreement"], 2),
             _pct(r["accuracy"], 2)] for mode, r in s["paper_criterion"].items()])
        lines.append("")
    lines += ["## The chosen rule's thresholds", "",
              "Candidate thresholds from the most conservative down (every 10th shown, plus the last accepted "
              "and the first failure; calibration.json has them all). Shares are means over the test part; "
              "FLOPs saved is against a full-depth run that also reuses the prompt prefix.", ""]
    for mode in dict.fromkeys(r["mode"] for r in result.rows):
        mode_rows = [r for r in result.rows if r["mode"] == mode]
        lines += [f"### {mode}: `{mode_rows[0]['rule']}`, min_layer {mode_rows[0]['min_layer']}", ""]
        lines += _table(_rows_to_show(mode_rows), has_gold) + [""]
    lines += ["![FLOPs saved against agreement](savings_vs_agreement.png)", ""]
    return "\n".join(lines)


def plot_savings(result: CalibrationResult, path: str) -> None:
    s = result.summary
    fig, ax = new_figure(7.0, 4.5)
    for mode in dict.fromkeys(r["mode"] for r in result.rows):
        rows = [r for r in result.rows if r["mode"] == mode]
        label = f"{mode}: {rows[0]['rule']}, min_layer {rows[0]['min_layer']}"
        line, = ax.plot([100 * r["agreement"] for r in rows], [100 * r["flops_saved"] for r in rows], label=label)
        acc = [r for r in rows if r["accepted"]]
        if acc:
            ax.plot(100 * acc[-1]["agreement"], 100 * acc[-1]["flops_saved"], "o", color=line.get_color())
    ax.axvline(100 * (1 - s["epsilon"]), color="grey", ls="--", lw=1, label=f"1 - epsilon = {1 - s['epsilon']:.3g}")
    ax.set_xlabel("agreement with the full model on the test part (%)")
    ax.set_ylabel("FLOPs saved by exiting (%)")
    ax.set_xlim(max(50.0, 100 * min(r["agreement"] for r in result.rows)), 100.2)
    ax.set_title("Savings against agreement (dots: last threshold accepted by Learn-then-Test)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)


def write_report(result: CalibrationResult, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write(render_markdown(result))
    with open(os.path.join(folder, "calibration.json"), "w") as f:
        json.dump({"summary": result.policy.metadata, "rows": result.rows}, f, indent=1)
    plot_savings(result, os.path.join(folder, "savings_vs_agreement.png"))
    return folder
