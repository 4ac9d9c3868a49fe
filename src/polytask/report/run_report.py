"""The Markdown report of one run directory."""

from __future__ import annotations

from typing import Any

import yaml

from ..training.rundir import RunDirectory
from .figures import weights_figure
from .plots import plot_run_curves, save_plot
from .tables import format_value, markdown_table, results_columns

__all__ = ["class_rows", "class_table", "results_table", "run_title", "write_run_report"]


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
