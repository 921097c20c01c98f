"""Text formats every report shares: numbers, shares, money, proportions, and the one Markdown table writer.

`n/a` stands wherever a figure is None (not computable); the summary says why elsewhere.
"""

from __future__ import annotations

from adainfer_ray.report.prices import PRICE_CURRENCY


def fmt_n(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:,}" if isinstance(value, (int, float)) else str(value)


def fmt_pct(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def fmt_num(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def fmt_money(value) -> str:
    return "n/a" if value is None else f"{PRICE_CURRENCY} {value:,.2f}"


def fmt_proportion(proportion: dict) -> str:
    if proportion["share"] is None:
        return "n/a (no rows)"
    return (f"{fmt_pct(proportion['share'])} (95% CI {fmt_pct(proportion['ci95_low'])}"
            f" to {fmt_pct(proportion['ci95_high'])}, {fmt_n(proportion['successes'])} of "
            f"{fmt_n(proportion['rows'])} rows)")


def markdown_cell(text) -> str:
    """A value as one Markdown table cell: pipes escaped, line breaks folded."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of one Markdown table (no blank line around it); every report's tables come from here."""
    lines = ["| " + " | ".join(markdown_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows]
