"""The Markdown report of one run directory."""

from __future__ import annotations

from typing import Any

import yaml

from ..training.rundir import RunDirectory
from .figures import weights_figure
from .plots import plot_run_curves, save_plot
from .tables import format_value, markdown_table, results_columns

__all__ = ["class_rows", "class_table", "results_table", "write_run_report"]


def results_table(results: dict[str, object], split: str = "test") -> str:
    """One row of the run's metric values on ``split``, plus Delta_m when there is one."""
    hib = results["higher_is_better"]
    assert isinstance(hib, dict)
    columns = results_columns(hib)
    block = results[split]
    assert isinstance(block, dict)
    metrics = block["metrics"]
    headers = ["split"] + [h for _, _, h in columns]
    row = [split] + [format_value(metrics[t][k]) for t, k, _ in columns]
    dm = results.get("delta_m")
    if isinstance(dm, dict) and split == "test":
        arrow = "↑" if dm["higher_is_better"] else "↓"
        headers.append(f"Δm {dm['convention']} {arrow}")
        row.append(
            format_value(dm["value"], decimals=2 if dm["convention"] == "metric_mean" else 4)
        )
    return markdown_table(headers, [row])


def class_rows(results: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per segmentation task with per-class results: the headers and rows of its per-class
    IoU table (test and val), classes sorted by their share of labelled training pixels."""
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    for task, info in (results.get("classes") or {}).items():
        test = results["test"].get("details", {}).get(task, {}).get("iou")
        if test is None:
            continue
        val = results["val"].get("details", {}).get(task, {}).get("iou")
        pixels = info.get("train_pixels")
        names = info.get("names") or [str(c) for c in range(len(test))]
        total = float(sum(pixels)) if pixels else 0.0
        order = list(range(len(test)))
        if pixels and total:
            order.sort(key=lambda c: pixels[c])
        headers = ["class", "train pixels %", "test IoU ↑"] + (["val IoU ↑"] if val else [])
        rows = []
        for c in order:
            share = f"{100.0 * pixels[c] / total:.2f}" if pixels and total else "-"
            row = [names[c], share, format_value(test[c])]
            if val:
                row.append(format_value(val[c]))
            rows.append(row)
        tables[task] = (headers, rows)
    return tables


def class_table(results: dict[str, Any]) -> str | None:
    """Per-class IoU on test and val of every segmentation task with per-class results,
    classes sorted by their share of labelled training pixels; ``None`` without any."""
    tables = [
        f"Task `{task}`:\n\n{markdown_table(headers, rows)}"
        for task, (headers, rows) in class_rows(results).items()
    ]
    return "\n\n".join(tables) if tables else None


def _get(config: dict[str, Any], section: str, key: str) -> str:
    value = config.get(section, {})
    return str(value.get(key, "?")) if isinstance(value, dict) else "?"


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
    lines = [f"# Run {run.path.name}", ""]
    if results is None:
        lines += ["Training has not finished: no results yet.", ""]
    else:
        sel = results["selection"]
        chosen = (
            f"epoch {sel['epoch'] + 1}"
            if "epoch" in sel
            else f"mean of epochs {[e + 1 for e in sel['epochs']]}"
        )
        lines += [
            f"Tasks: {', '.join(results['tasks'])}. Architecture `{_get(config, 'model', 'architecture')}`, "
            f"balancing `{_get(config, 'balancer', 'name')}`, data `{_get(config, 'data', 'name')}`.",
            f"Selection: {sel['protocol']} by validation {sel['metric']} ({chosen}). "
            f"Training time {results['train_time_s']:.1f} s.",
            "",
            "## Results",
            "",
            results_table(results, "test"),
            "",
            results_table(results, "val"),
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
