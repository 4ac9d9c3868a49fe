"""Plain-text / Markdown result tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["format_value", "markdown_table", "results_columns"]


def format_value(
    value: float | None, std: float | None = None, *, decimals: int | None = None
) -> str:
    """Four significant digits (or fixed ``decimals``), with ``± std``; NaN or None as ``-``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if decimals is not None:
        text = f"{round(value, decimals) + 0.0:+.{decimals}f}"
    else:
        text = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    if std is not None and not math.isnan(std):
        text += f" ± {std:.{decimals}f}" if decimals is not None else f" ± {std:.2g}"
    return text


def results_columns(
    higher_is_better: Mapping[str, Mapping[str, bool]],
) -> list[tuple[str, str, str]]:
    """``(task, value, header)`` for every metric value, the header marked with its direction."""
    return [
        (task, value, f"{task} {value} {'↑' if hib else '↓'}")
        for task, values in higher_is_better.items()
        for value, hib in values.items()
    ]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table whose columns are padded to line up in a terminal too."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])
