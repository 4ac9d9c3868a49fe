"""Plain-text / Markdown result tables."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

__all__ = [
    "LOG_LINE_WIDTH",
    "MAX_TABLE_WIDTH",
    "WIDE_TABLE_TASKS",
    "epoch_log_lines",
    "fitted_table",
    "format_value",
    "markdown_table",
    "results_columns",
    "table_width",
    "task_table",
]


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
    auxiliary: Collection[str] = (),
) -> list[tuple[str, str, str]]:
    """``(task, value, header)`` for every metric value, the header marked with its direction
    (and ``aux`` for the ``auxiliary`` tasks, which no comparison counts)."""
    return [
        (task, value, f"{task} {value} {'↑' if hib else '↓'}{' aux' if task in auxiliary else ''}")
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


#: the widest Markdown / terminal table the reports write when there are many tasks (characters)
MAX_TABLE_WIDTH = 120
#: up to this many tasks a results table keeps one column per metric value however wide it is
#: (the NYUv2 and Cityscapes tables), as it always has
WIDE_TABLE_TASKS = 3


def table_width(table: str) -> int:
    """The length of the longest line of ``table`` (any text)."""
    return max((len(line) for line in table.splitlines()), default=0)


def _direction(hib: bool | None) -> str:
    return "" if hib is None else " ↑" if hib else " ↓"


def task_table(
    columns: Sequence[tuple[str, str, bool | None]],
    names: Sequence[str],
    values: Sequence[Sequence[str]],
    *,
    max_width: int = MAX_TABLE_WIDTH,
) -> list[str]:
    """Per-task values in long format: a row per ``(task, metric value, higher is better)``
    of ``columns`` and a column per name (a split, a cell); ``values[i][j]`` is name ``i``'s
    value in column ``j``. Where the names do not fit in ``max_width`` characters they are
    spread over several tables (each with the task and metric columns), at least one name
    in each."""
    keys = [[task, f"{value}{_direction(hib)}"] for task, value, hib in columns]
    key_width = sum(
        max(len(h), *(len(k[i]) for k in keys)) + 3 for i, h in enumerate(("task", "metric"))
    )
    widths = [
        max(len(n), *(len(v[j]) for j in range(len(columns)))) + 3
        for n, v in zip(names, values, strict=True)
    ]
    chunks: list[list[int]] = [[]]
    used = key_width + 1
    for i, w in enumerate(widths):
        if chunks[-1] and used + w > max_width:
            chunks.append([])
            used = key_width + 1
        chunks[-1].append(i)
        used += w
    return [
        markdown_table(
            ["task", "metric", *(names[i] for i in chunk)],
            [[*k, *(values[i][j] for i in chunk)] for j, k in enumerate(keys)],
        )
        for chunk in chunks
    ]


def fitted_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    keys: int,
    columns: Sequence[tuple[str, str, bool | None]],
    summary: tuple[Sequence[str], Sequence[Sequence[str]]] | None = None,
    max_width: int = MAX_TABLE_WIDTH,
    wide_tasks: int = WIDE_TABLE_TASKS,
) -> str:
    """A results table whose width stays within ``max_width`` characters however many tasks.

    ``headers`` are ``keys`` columns naming a row (the first names it: a split, a cell),
    then a column per entry of ``columns`` (``(task, metric value, higher is better)``),
    then summary columns (Delta_m, mean rank, ...). With at most ``wide_tasks`` tasks, or
    when it fits, this is :func:`markdown_table` of it. Otherwise the per-task columns
    move out: a table of the key and summary columns (and the extra ``summary`` columns,
    one list of cells per row) comes first, then the per-task values in long format
    (:func:`task_table`: a row per task and metric value, a column per row name).
    """
    wide = markdown_table(headers, rows)
    tasks = len(dict.fromkeys(t for t, _, _ in columns))
    if tasks <= wide_tasks or table_width(wide) <= max_width:
        return wide
    end = keys + len(columns)
    extra_headers, extra_rows = summary if summary is not None else ([], [[] for _ in rows])
    short_headers = [*headers[:keys], *extra_headers, *headers[end:]]
    blocks = []
    if len(short_headers) > keys:
        blocks.append(
            markdown_table(
                short_headers,
                [[*r[:keys], *e, *r[end:]] for r, e in zip(rows, extra_rows, strict=True)],
            )
        )
    per_task = task_table(
        columns, [r[0] for r in rows], [list(r[keys:end]) for r in rows], max_width=max_width
    )
    blocks.append(
        f"Per task ({tasks} tasks, {len(columns)} metric values"
        + (f", in {len(per_task)} tables" if len(per_task) > 1 else "")
        + "):"
    )
    blocks += per_task
    return "\n\n".join(blocks)


#: the widest per-epoch log line (without the logger's time stamp) when there are many tasks
LOG_LINE_WIDTH = 120


def _spread(values: Mapping[str, float], fmt: str) -> str:
    """``mean=M, highest T=V, lowest T=V`` over the finite values (``mean=nan`` without)."""
    finite = {t: float(v) for t, v in values.items() if v is not None and math.isfinite(v)}
    if not finite:
        return "mean=nan"
    high = max(finite, key=lambda t: finite[t])
    low = min(finite, key=lambda t: finite[t])
    mean = sum(finite.values()) / len(finite)
    return (
        f"mean={mean:{fmt}} over {len(values)} tasks, highest {high}={finite[high]:{fmt}}, "
        f"lowest {low}={finite[low]:{fmt}}"
    )


def _wrap(pieces: Sequence[str], max_width: int, indent: str = "    ") -> list[str]:
    """``pieces`` joined by `` | `` into lines of at most ``max_width`` characters, each
    line after the first indented; a piece too long for a line alone is wrapped at spaces."""
    import textwrap

    lines: list[str] = []
    for piece in pieces:
        prefix = indent if lines else ""
        if lines and len(lines[-1]) + 3 + len(piece) <= max_width:
            lines[-1] += " | " + piece
        elif len(prefix) + len(piece) <= max_width:
            lines.append(prefix + piece)
        else:
            lines += textwrap.wrap(
                piece,
                max_width,
                initial_indent=prefix,
                subsequent_indent=indent,
                break_long_words=True,
            )
    return lines


def epoch_log_lines(
    record: Mapping[str, Any],
    epochs: int,
    *,
    max_width: int = LOG_LINE_WIDTH,
    wide_tasks: int = WIDE_TABLE_TASKS,
) -> list[str]:
    """The log line of a finished epoch (a ``metrics.jsonl`` record): every task's training
    loss, every validation metric value and the selection score.

    With at most ``wide_tasks`` tasks, or when it fits in ``max_width`` characters, that is
    one line, as it always was. Otherwise the losses and each metric value that several
    tasks share are summarised (mean, and the tasks with the highest and lowest value;
    every value is in ``metrics.jsonl``), and what is still too long continues on indented
    lines of at most ``max_width`` characters.
    """
    head = f"epoch {record['epoch'] + 1}/{epochs}"
    losses: Mapping[str, float] = record["train"]["loss"]
    val: Mapping[str, Mapping[str, float]] = record["val"]["metrics"]
    score = f"score={record['score']:.4g}"
    full = " | ".join(
        [
            head,
            "train " + " ".join(f"{t}={v:.4f}" for t, v in losses.items()),
            "val "
            + " ".join(f"{t}.{k}={v:.4g}" for t, vals in val.items() for k, v in vals.items()),
            score,
        ]
    )
    if len(losses) <= wide_tasks or len(full) <= max_width:
        return [full]
    by_metric: dict[str, dict[str, float]] = {}
    for task, values in val.items():
        for name, value in values.items():
            by_metric.setdefault(name, {})[task] = value
    metric_pieces = [
        f"val {name} {_spread(values, '.4g')}"
        if len(values) > 1
        else f"val {next(iter(values))}.{name}={next(iter(values.values())):.4g}"
        for name, values in by_metric.items()
    ]
    return _wrap([head, score, f"train loss {_spread(losses, '.4f')}", *metric_pieces], max_width)
