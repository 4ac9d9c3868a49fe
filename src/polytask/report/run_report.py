"""The Markdown report of one run directory."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import yaml

from ..training.rundir import RunDirectory
from .figures import weights_figure
from .plots import plot_run_curves, save_plot
from .tables import (
    MAX_TABLE_WIDTH,
    WIDE_TABLE_TASKS,
    fitted_table,
    format_value,
    markdown_table,
    results_columns,
    table_width,
)

__all__ = [
    "class_rows",
    "class_table",
    "results_table",
    "results_tables",
    "run_title",
    "write_run_report",
]


def _task_means(
    results: dict[str, Any], splits: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """The mean over tasks of every metric value that several tasks share (the summary of a
    table whose per-task columns moved to the long table)."""
    hib: dict[str, dict[str, bool]] = results["higher_is_better"]
    shared: dict[tuple[str, bool], list[str]] = {}
    for task, values in hib.items():
        for value, higher in values.items():
            shared.setdefault((value, higher), []).append(task)
    groups = [(v, h, ts) for (v, h), ts in shared.items() if len(ts) > 1]
    headers = [f"mean {v} over {len(ts)} tasks {'↑' if h else '↓'}" for v, h, ts in groups]
    rows = []
    for split in splits:
        metrics = results[split]["metrics"]
        row = []
        for value, _, tasks in groups:
            found = [metrics[t][value] for t in tasks if metrics[t].get(value) is not None]
            finite = [float(x) for x in found if math.isfinite(float(x))]
            row.append(format_value(statistics.fmean(finite)) if finite else "-")
        rows.append(row)
    return headers, rows


def results_tables(results: dict[str, Any], splits: Sequence[str] = ("test", "val")) -> str:
    """The run's metric values on ``splits``, plus Delta_m when there is one (on test).

    With few tasks, or when it fits in :data:`~polytask.report.tables.MAX_TABLE_WIDTH`
    characters, a table per split with a column per metric value, as always; otherwise (see
    :func:`~polytask.report.tables.fitted_table`) one summary table (a row per split: the
    mean over tasks of every metric value several tasks share, and Delta_m) and the
    per-task values in long format (a row per task and metric value, a column per split).
    """
    hib = results["higher_is_better"]
    auxiliary = results.get("auxiliary") or []
    columns = results_columns(hib, auxiliary)
    dm = results.get("delta_m")
    headers = ["split"] + [h for _, _, h in columns]
    if isinstance(dm, dict):
        arrow = "↑" if dm["higher_is_better"] else "↓"
        headers.append(f"Δm {dm['convention']} {arrow}")
    rows = []
    for split in splits:
        metrics = results[split]["metrics"]
        row = [split] + [format_value(metrics[t][k]) for t, k, _ in columns]
        if isinstance(dm, dict):
            row.append(
                format_value(dm["value"], decimals=2 if dm["convention"] == "metric_mean" else 4)
                if split == "test"
                else "-"
            )
        rows.append(row)
    # the table of each split alone, as the report has always written it
    separate = [
        markdown_table(
            headers if split == "test" or not isinstance(dm, dict) else headers[:-1],
            [row if split == "test" or not isinstance(dm, dict) else row[:-1]],
        )
        for split, row in zip(splits, rows, strict=True)
    ]
    if all(table_width(t) <= MAX_TABLE_WIDTH for t in separate) or len(hib) <= WIDE_TABLE_TASKS:
        return "\n\n".join(separate)
    return fitted_table(
        headers,
        rows,
        keys=1,
        columns=[(f"{t} aux" if t in auxiliary else t, k, hib[t][k]) for t, k, _ in columns],
        summary=_task_means(results, splits),
        wide_tasks=0,
    )


def results_table(results: dict[str, object], split: str = "test") -> str:
    """The run's metric values on ``split``, plus Delta_m when there is one (on test): one
    row with a column per metric value, or with many tasks a summary and the per-task
    values in long format (see :func:`results_tables`)."""
    return results_tables(dict(results), (split,))


#: what the per-class tables say about their rows (a sentence, without its full stop)
CLASS_NOTES = {
    "iou": "Classes sorted by their share of the labelled training pixels, rarest first; "
    "IoU in percent",
    "class_accuracy": "The accuracy on each class's samples (its recall), in percent; "
    "samples: how many of the split's samples have that class",
}


def class_rows(results: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]], str]]:
    """Per task with per-class results, the headers, rows and note of its per-class table
    (test and val): IoU for a segmentation task, classes sorted by their share of labelled
    training pixels; per-class accuracy for a classification task whose metric counts
    classes (``Accuracy(num_classes)``), in class order."""
    tables: dict[str, tuple[list[str], list[list[str]], str]] = {}
    infos = results.get("classes") or {}
    for task in results.get("tasks") or list(results["test"].get("details", {})):
        details = results["test"].get("details", {}).get(task, {})
        labels = _label_rows(details, infos.get(task, {}))
        if labels is not None:
            tables[task] = labels
            continue
        key = next((k for k in CLASS_NOTES if details.get(k) is not None), None)
        if key is None:
            continue
        test = details[key]
        val = results["val"].get("details", {}).get(task, {}).get(key)
        info = infos.get(task, {})
        names = info.get("names") or [str(c) for c in range(len(test))]
        order = list(range(len(test)))
        if key == "iou":
            pixels = info.get("train_pixels")
            total = float(sum(pixels)) if pixels else 0.0
            if pixels and total:
                order.sort(key=lambda c: pixels[c])
            second = "train pixels %"
            column = [
                f"{100.0 * pixels[c] / total:.2f}" if pixels and total else "-" for c in order
            ]
            metric = "IoU"
        else:
            second = "test samples"
            column = [f"{details['samples'][c]:.0f}" for c in order]
            metric = "accuracy"
        headers = ["class", second, f"test {metric} ↑"] + ([f"val {metric} ↑"] if val else [])
        rows = [
            [names[c], extra, format_value(test[c])] + ([format_value(val[c])] if val else [])
            for c, extra in zip(order, column, strict=True)
        ]
        tables[task] = (headers, rows, CLASS_NOTES[key])
    return tables


LABEL_VALUES = {
    "f1": "F1",
    "precision": "precision",
    "recall": "recall",
    "roc_auc": "ROC-AUC",
    "average_precision": "AP",
}
"""The per-label values of a multi-label task's table, in order (those its metric kept)."""


def _label_rows(
    details: dict[str, Any], info: dict[str, Any]
) -> tuple[list[str], list[list[str]], str] | None:
    """The per-label test table of a multi-label task with several labels (its metric's
    ``positives`` and per-label values), or ``None``."""
    positives = details.get("positives")
    if not isinstance(positives, list) or len(positives) < 2 or details.get("f1") is None:
        return None
    names = info.get("names") or [str(i) for i in range(len(positives))]
    keys = [k for k in LABEL_VALUES if details.get(k) is not None]
    headers = ["label", "test positives"] + [f"test {LABEL_VALUES[k]} ↑" for k in keys]
    rows = [
        [str(names[i]), f"{positives[i]:.0f}"] + [format_value(details[k][i]) for k in keys]
        for i in range(len(positives))
    ]
    note = (
        "Each label on its own (the task's values are their unweighted means), in percent; "
        "positives: the split's samples with the label; '-' where a label's test samples "
        "are all of one class"
    )
    return headers, rows, note


def class_table(results: dict[str, Any]) -> str | None:
    """The per-class tables of :func:`class_rows` in Markdown; ``None`` without any."""
    tables = [
        f"Task `{task}`. {note}.\n\n{markdown_table(headers, rows)}"
        for task, (headers, rows, note) in class_rows(results).items()
    ]
    return "\n\n".join(tables) if tables else None


def _get(config: dict[str, Any], section: str, key: str) -> str:
    value = config.get(section, {})
    return str(value.get(key, "?")) if isinstance(value, dict) else "?"


def run_title(run: RunDirectory, config: dict[str, Any]) -> str:
    """The run's name in a report title: its directory's name, with the configuration's name
    first where the directory's does not start with it (a grid's ``demo.hps-equal (seed-0)``)."""
    name, folder = str(config.get("name") or ""), run.path.name
    return folder if not name or folder.startswith(name) else f"{name} ({folder})"


def write_run_report(run: RunDirectory, *, strict: bool = False) -> None:
    """Write ``report.md`` (with ``plots/curves.png`` and, where the balancing method changes
    the task weights, ``plots/weights.png``) and ``report.html`` (see
    :func:`~polytask.report.run_html.write_run_html`; ``strict`` raises a figure's error
    instead of writing it in the figure's place) from what the run directory holds."""
    results = run.read_results()
    records = run.read_metrics()
    hib = results.get("higher_is_better", {}) if results else {}
    curves = plot_run_curves(records, run.plots_dir / "curves.png", hib)
    weights_plot = weights_figure(records)
    weights = (
        None if weights_plot is None else save_plot(weights_plot, run.plots_dir / "weights.png")
    )
    config = run.read_config()
    lines = [f"# Run {run_title(run, config)}", ""]
    if results is None:
        lines += ["Training has not finished: no results yet.", ""]
    else:
        sel = results["selection"]
        chosen = (
            f"epoch {sel['epoch'] + 1}"
            if "epoch" in sel
            else f"mean of epochs {[e + 1 for e in sel['epochs']]}"
        )
        auxiliary = results.get("auxiliary") or []
        lines += [
            f"Tasks: {', '.join(results['tasks'])}. "
            + (
                "Auxiliary (trained and shown, left out of model selection and Δm): "
                f"{', '.join(auxiliary)}. "
                if auxiliary
                else ""
            )
            + f"Architecture `{_get(config, 'model', 'architecture')}`, "
            f"balancing `{_get(config, 'balancer', 'name')}`, data `{_get(config, 'data', 'name')}`.",
            f"Selection: {sel['protocol']} by validation {sel['metric']} ({chosen}). "
            f"Training time {results['train_time_s']:.1f} s.",
            "",
            "## Results",
            "",
            results_tables(results),
            "",
        ]
        dm = results.get("delta_m")
        if dm:
            lines += [f"Δm baseline: {dm['baseline_source']}", ""]
        classes = class_table(results)
        if classes is not None:
            lines += ["## Per class", "", classes, ""]
        lines += ["## Parameters", ""]
        lines += [f"- {k}: {v:,}" for k, v in results["parameters"].items()]
        lines.append("")
    if curves is not None:
        lines += ["## Curves", "", f"![curves]({curves.relative_to(run.path)})", ""]
    if weights is not None:
        lines += ["## Task weights", "", f"![task weights]({weights.relative_to(run.path)})", ""]
    lines += [
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    (run.path / "report.md").write_text("\n".join(lines), encoding="utf-8")
    from .run_html import write_run_html

    write_run_html(run, strict=strict)
