"""Label health: whether the labels a run wrote look like labels at all, gold labels or not.

A prompt or a model that does not fit the task shows first in the label distribution: a label the
model (almost) never answers, one label taking nearly every row, or, with gold labels, an accuracy
no better than always answering the most common gold label. `label_health` reads the run summary's
counters (labels written; full-depth labels on the audit sample; gold labels) and says so plainly,
with what to try; the job's summary, `_run.json` and the cost report all show its figures.
"""

from __future__ import annotations

from adainfer_ray.report.text import fmt_n, fmt_pct
from adainfer_ray.stats import ratio

MIN_ROWS = 20            # fewer labeled rows than this say nothing about a distribution
RARE_SHARE = 0.01        # a label below this share of the rows is "(almost) never predicted"
DOMINANT_SHARE = 0.95    # one label above this share "takes nearly every row"
BASELINE_MARGIN = 0.02   # accuracy within this of always answering the most common gold label is "near" it

ADVICE = ("try few-shot demonstrations with --demos FILE (a few rows of each label), another --template "
          "that names the labels, or another --model")


def shares(counts: dict[str, int], labels: list[str]) -> dict[str, float | None]:
    """Each of `labels` (the task's, in its order, and any other label counted) as a share of all counts."""
    total = sum(counts.values())
    return {label: ratio(counts.get(label, 0), total) for label in list(labels) + [x for x in counts if x not in labels]}


def label_health(summary: dict, labels: list[str] | None) -> dict:
    """The label distribution of the labels written and at full depth on the audit sample, the most
    common gold label's share (the accuracy of always answering it), and plain warnings."""
    labels = list(labels or summary["label_counts"])
    written, full = summary["label_counts"], summary.get("full_depth_label_counts") or {}
    gold = summary.get("gold_label_counts") or {}
    majority = max(gold, key=gold.get) if gold else None
    out = {
        "labels": labels,
        "written": {"rows": sum(written.values()), "shares": shares(written, labels)},
        "full_depth_audit": {"rows": sum(full.values()), "shares": shares(full, labels)},
        "majority_gold_label": majority,
        "majority_gold_share": ratio(gold[majority], sum(gold.values())) if majority else None,
        "warnings": [],
    }
    out["warnings"] = _warnings(out, summary)
    return out


def _warnings(health: dict, summary: dict) -> list[str]:
    warnings = []
    written, full = health["written"], health["full_depth_audit"]
    if written["rows"] >= MIN_ROWS and len(health["labels"]) > 1:
        rare = [label for label in health["labels"] if (written["shares"].get(label) or 0) < RARE_SHARE]
        if rare:
            at_full = "" if not full["rows"] else (
                f"; at full depth on the {fmt_n(full['rows'])} audited rows: "
                + ", ".join(f"{label} {fmt_pct(full['shares'].get(label) or 0)}" for label in rare))
            warnings.append(f"label health: {', '.join(rare)} {'was' if len(rare) == 1 else 'were'} (almost) never "
                            f"predicted (under {fmt_pct(RARE_SHARE, 0)} of {fmt_n(written['rows'])} rows{at_full}): "
                            f"the model may not understand this label; {ADVICE}")
        top = max(written["shares"], key=lambda label: written["shares"][label] or 0)
        if (written["shares"][top] or 0) > DOMINANT_SHARE:
            warnings.append(f"label health: {top} takes {fmt_pct(written['shares'][top])} of {fmt_n(written['rows'])} "
                            f"rows: unless the corpus really is that one-sided, the prompt leans to one answer; {ADVICE}")
    accuracy = summary["gold_accuracy"]
    baseline = health["majority_gold_share"]
    if accuracy["rows"] >= MIN_ROWS and baseline is not None and accuracy["share"] <= baseline + BASELINE_MARGIN:
        warnings.append(f"label health: accuracy on gold labels ({fmt_pct(accuracy['share'])}) is "
                        f"{'below' if accuracy['share'] < baseline else 'about'} that of always answering the most "
                        f"common gold label, {health['majority_gold_label']} ({fmt_pct(baseline)}): check that the "
                        f"label names match the gold labels, and {ADVICE}")
    return warnings


def distribution_text(health: dict) -> str:
    """One line: each label's share of the labels written, and at full depth on the audit sample."""
    def line(part):
        return ", ".join(f"{label} {fmt_pct(share)}" for label, share in part["shares"].items() if share is not None)

    text = f"labels written: {line(health['written'])}"
    if health["full_depth_audit"]["rows"]:
        text += f" (full depth on {fmt_n(health['full_depth_audit']['rows'])} audited rows: {line(health['full_depth_audit'])})"
    return text
