"""Reports of runs and grids with 2, 14 and 40 tasks (one binary task per label of a
multi-label data set): tables and log lines of bounded width, legends inside their figures,
and every task still named in the CSV, JSON and HTML.

The runs and grids are fabricated (``metrics.jsonl`` and ``results.json`` written by hand):
nothing is trained.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import tiny_config_dict
from polytask.compare import summarize_grid
from polytask.report import figures
from polytask.report.run_report import results_table, write_run_report
from polytask.report.tables import (
    LOG_LINE_WIDTH,
    MAX_TABLE_WIDTH,
    WIDE_TABLE_TASKS,
    epoch_log_lines,
    fitted_table,
    markdown_table,
    table_width,
)
from polytask.training.rundir import RunDirectory

#: the 40 CelebA attributes: task names of realistic length
CELEBA = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]
SIZES = [2, 14, 40]
#: every metric value of a task: (name, higher is better)
VALUES = [("accuracy", True), ("f1", True)]


def tasks_of(n: int) -> list[str]:
    return CELEBA[:n]


def fake_record(tasks: list[str], epoch: int, rng: random.Random, *, test: bool) -> dict[str, Any]:
    """A metrics.jsonl record as the trainer writes it, with gradient diagnostics."""
    metrics = {t: {v: rng.uniform(0.5, 1.0) for v, _ in VALUES} for t in tasks}
    record: dict[str, Any] = {
        "epoch": epoch,
        "lr": 0.01,
        "train": {
            "loss": {t: rng.uniform(0.1, 1.0) / (epoch + 1) for t in tasks},
            "weight": {t: rng.uniform(0.5, 1.5) for t in tasks},
        },
        "val": {"losses": {t: rng.uniform(0.1, 1.0) for t in tasks}, "metrics": metrics},
        "score": rng.uniform(0.5, 1.0),
        "balancing": {
            "grad_norm": {t: rng.uniform(0.1, 3.0) for t in tasks},
            "cosine": {
                t: {u: 1.0 if t == u else rng.uniform(-0.5, 0.9) for u in tasks} for t in tasks
            },
        },
    }
    if test:
        record["test"] = {"metrics": {t: dict(v) for t, v in metrics.items()}}
    return record


def fake_results(tasks: list[str], rng: random.Random, *, delta_m: bool) -> dict[str, Any]:
    def block() -> dict[str, Any]:
        return {"metrics": {t: {v: rng.uniform(0.5, 1.0) for v, _ in VALUES} for t in tasks}}

    results: dict[str, Any] = {
        "name": "celeba",
        "tasks": tasks,
        "higher_is_better": {t: dict(VALUES) for t in tasks},
        "test": block(),
        "val": block(),
        "selection": {"protocol": "best", "metric": "score", "epoch": 0},
        "train_time_s": rng.uniform(10, 100),
        "parameters": {"shared": 12345, "heads": 678},
    }
    if delta_m:
        results["delta_m"] = {
            "value": rng.uniform(-5, 5),
            "convention": "metric_mean",
            "higher_is_better": False,
            "baseline_source": "a fabricated baseline",
        }
    return results


def fake_run(path: Path, n: int, epochs: int, *, seed: int = 0) -> RunDirectory:
    """A finished run directory of ``n`` tasks and ``epochs`` epochs (nothing trained)."""
    rng = random.Random(seed)
    tasks = tasks_of(n)
    config = tiny_config_dict(path.parent, name="celeba", **{"balancer.name": "pcgrad"})
    run = RunDirectory.create(path, config)
    for epoch in range(epochs):
        run.append_metrics(fake_record(tasks, epoch, rng, test=epoch == epochs - 1))
    run.write_results(fake_results(tasks, rng, delta_m=True))
    return run


@pytest.fixture(autouse=True)
def close_figures() -> Iterator[None]:
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def table_lines(text: str) -> list[str]:
    """The lines of the Markdown tables in ``text``."""
    return [line for line in text.splitlines() if line.startswith("|")]


# -- tables -----------------------------------------------------------------------------------


def test_a_few_tasks_keep_the_wide_table() -> None:
    headers = ["split", "a x ↑", "b x ↑", "Δm ↓"]
    rows = [["test", "1", "2", "+0.50"]]
    columns = [("a", "x", True), ("b", "x", True)]
    assert fitted_table(headers, rows, keys=1, columns=columns) == markdown_table(headers, rows)


@pytest.mark.parametrize("n", SIZES)
def test_run_tables_are_bounded_and_name_every_task(tmp_path: Path, n: int) -> None:
    run = fake_run(tmp_path / "run", n, epochs=3)
    write_run_report(run, strict=True)
    report = (run.path / "report.md").read_text(encoding="utf-8")
    results = run.read_results()
    assert results is not None
    printed = results_table(results, "test")  # what `polytask train` prints
    for text in (report, printed):
        lines = table_lines(text)
        assert lines
        if n > WIDE_TABLE_TASKS:  # a few tasks keep the table they always had, however wide
            assert max(len(line) for line in lines) <= MAX_TABLE_WIDTH, text
        for task in tasks_of(n):
            assert f"| {task} " in text or f" {task} accuracy ↑ " in text
    if n == 2:  # as it always was: a column per metric value, a table per split
        assert "| split | Bald accuracy" not in report
        assert report.count("| split |") == 2
        assert "5_o_Clock_Shadow accuracy ↑" in report
    else:  # the summary, then a row per task and metric value
        assert "mean accuracy over" in report and "| task" in report
    page = (run.path / "report.html").read_text(encoding="utf-8")
    for task in tasks_of(n):
        assert f"{task} accuracy ↑" in page and f"{task} f1 ↑" in page
    assert 'class="figure-error"' not in page
    from PIL import Image

    for name in ("curves.png", "weights.png"):
        with Image.open(run.plots_dir / name) as image:
            assert min(image.size) > 100
    assert '<div class="table-scroll"><table>' in page and "overflow-x: auto" in page


def fake_grid(root: Path, n: int, cells: list[str], seeds: list[int]) -> Path:
    """A grid directory of finished fabricated runs (every cell, every seed)."""
    grid_dir = root / "celeba"
    spec = {
        "name": "celeba",
        "output_dir": str(root),
        "seeds": seeds,
        "baseline": cells[0],
        "cells": {c: {"model.architecture": "hps"} for c in cells},
    }
    grid_dir.mkdir(parents=True)
    (grid_dir / "grid.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    for i, cell in enumerate(cells):
        for seed in seeds:
            rng = random.Random(100 * i + seed)
            run = grid_dir / cell / f"seed-{seed}"
            run.mkdir(parents=True)
            config = tiny_config_dict(root, name=f"celeba.{cell}", seed=seed)
            (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
            results = fake_results(tasks_of(n), rng, delta_m=False)
            (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return grid_dir


@pytest.mark.parametrize("n", SIZES)
def test_grid_tables_are_bounded_and_name_every_task(tmp_path: Path, n: int) -> None:
    cells = ["single_task", "hps-equal", "hps-pcgrad", "mmoe-uncertainty", "cross_stitch-dwa"]
    grid_dir = fake_grid(tmp_path, n, cells, [0, 1])
    summary = summarize_grid(grid_dir)
    markdown = (grid_dir / "results.md").read_text(encoding="utf-8")
    for text in (summary["table"], markdown):
        lines = table_lines(text)
        if n <= WIDE_TABLE_TASKS:  # as it always was: one wide table
            assert text.count("| cell ") == 1
        else:
            assert max(len(line) for line in lines) <= MAX_TABLE_WIDTH, text
            assert "Δm % (metric_mean) ↓" in text and "mean rank ↓" in text
        for task in tasks_of(n):
            assert task in text
    with (grid_dir / "results.csv").open(encoding="utf-8") as f:
        header = next(csv.reader(f))
    for task in tasks_of(n):
        assert f"{task}.accuracy" in header and f"{task}.f1_std" in header
    rows = json.loads((grid_dir / "results.json").read_text(encoding="utf-8"))["rows"]
    assert all(f"{t}.f1" in rows[0] for t in tasks_of(n))
    page = (grid_dir / "report.html").read_text(encoding="utf-8")
    for task in tasks_of(n):
        assert f"{task} accuracy ↑" in page
    assert 'class="figure-error"' not in page


def test_table_width_before_and_after() -> None:
    """With 40 tasks the wide table would be thousands of characters wide."""
    tasks = tasks_of(40)
    columns = [(t, v, h) for t in tasks for v, h in VALUES]
    headers = ["cell", "seeds"] + [f"{t} {v} ↑" for t, v, _ in columns] + ["mean rank ↓"]
    rows = [[f"cell-{i}", "2"] + ["0.9123 ± 0.0012"] * len(columns) + ["1.50"] for i in range(8)]
    assert table_width(markdown_table(headers, rows)) > 1500
    fitted = fitted_table(headers, rows, keys=2, columns=columns)
    assert table_width("\n".join(table_lines(fitted))) <= MAX_TABLE_WIDTH


# -- the per-epoch log line -----------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_the_epoch_log_line_is_bounded(n: int) -> None:
    record = fake_record(tasks_of(n), 4, random.Random(n), test=False)
    lines = epoch_log_lines(record, 10)
    if n == 2:  # as it always was: every value on one line
        assert len(lines) == 1
        assert lines[0].startswith("epoch 5/10 | train 5_o_Clock_Shadow=")
        assert "| val 5_o_Clock_Shadow.accuracy=" in lines[0]
        assert lines[0].endswith(f"| score={record['score']:.4g}")
    else:
        assert all(len(line) <= LOG_LINE_WIDTH for line in lines), lines
        text = "\n".join(lines)
        assert text.startswith("epoch 5/10 | score=")
        assert "train loss mean=" in text and "accuracy mean=" in text and "f1 mean=" in text
        worst = min(record["val"]["metrics"], key=lambda t: record["val"]["metrics"][t]["f1"])
        assert f"lowest {worst}=" in text


def test_a_long_log_line_wraps_into_bounded_lines() -> None:
    tasks = [f"task_with_a_rather_long_name_number_{i}" for i in range(20)]
    record = fake_record(tasks, 0, random.Random(0), test=False)
    for name in ("auroc", "precision", "recall", "balanced_accuracy"):  # one task each
        record["val"]["metrics"][tasks[0]][name] = 0.5
    lines = epoch_log_lines(record, 3, max_width=80)
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines), lines
    assert all(line.startswith("    ") for line in lines[1:])


# -- figures ----------------------------------------------------------------------------------


def legends_inside(plot: figures.Plot) -> int:
    """Draw the figure; every legend's box must lie within the figure's. Returns how many."""
    fig = plot.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    found = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    for legend in found:
        extent = legend.get_window_extent(renderer)
        assert extent.x0 >= box.x0 - 1 and extent.y0 >= box.y0 - 1, (extent, box)
        assert extent.x1 <= box.x1 + 1 and extent.y1 <= box.y1 + 1, (extent, box)
    return len(found)


def epoch_ticks_are_whole(plot: figures.Plot) -> None:
    for ax in plot.figure.axes:
        if ax.get_xlabel() == "epoch":
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks


def run_figures(n: int, epochs: int) -> dict[str, Callable[[], figures.Plot | None]]:
    rng = random.Random(n)
    tasks = tasks_of(n)
    records = [fake_record(tasks, e, rng, test=e == epochs - 1) for e in range(epochs)]
    hib = {t: dict(VALUES) for t in tasks}
    units = ["conv1", "conv2", "conv3"]
    stitch = [
        {
            **r,
            "architecture": {
                key: {u: {t: rng.uniform(0, 1) for t in tasks} for u in units}
                for key in ("alpha_S", "alpha_D")
            },
        }
        for r in records
    ]
    import numpy as np

    k = 2 * n
    alphas = {u: np.eye(k) + 0.1 for u in units}
    betas = {t: np.full(3, 1 / 3) for t in tasks}
    gates = {f"gate/{t}": np.full((4, 3), 1 / 3) for t in tasks}
    improvement = {
        c: {t: rng.uniform(-5, 5) for t in tasks} for c in ("single_task", "hps", "mmoe", "mtan")
    }
    return {
        "curves": lambda: figures.curves_figure(records, hib),
        "weights": lambda: figures.weights_figure(records),
        "grad_norm": lambda: figures.grad_norm_figure(records),
        "cosine": lambda: figures.cosine_figure(records),
        "cross_stitch": lambda: figures.cross_stitch_evolution_figure(stitch),
        "sluice": lambda: figures.sluice_figure(alphas, betas, ["l1", "l2", "l3"], tasks),
        "gates": lambda: figures.gate_figure({"task gates": (gates, ["e0", "e1", "e2"])}),
        "tradeoff": lambda: figures.tradeoff_figure(improvement, "single_task"),
    }


@pytest.mark.parametrize(("n", "epochs"), [(2, 1), (2, 3), (14, 1), (14, 3), (40, 2)])
def test_every_legend_lies_inside_its_figure(n: int, epochs: int) -> None:
    for name, build in run_figures(n, epochs).items():
        plot = build()
        assert plot is not None, name
        legends_inside(plot)
        epoch_ticks_are_whole(plot)
        if name == "curves":
            assert set(plot.data["train_loss"]) == set(tasks_of(n))
        if name == "cosine" and n > figures.COSINE_PAIR_TASKS:
            assert len(plot.data["pairs"]) == n * (n - 1) // 2  # every pair still in the data


def test_a_single_epoch_is_one_whole_tick() -> None:
    plot = figures.weights_figure([fake_record(tasks_of(14), 0, random.Random(0), test=True)])
    assert plot is not None
    ax = plot.figure.axes[0]
    plot.figure.canvas.draw()
    assert list(ax.get_xticks()) == [1]
    assert ax.get_xlim() == (0.0, 2.0)
    assert ax.get_lines()[0].get_markersize() >= 5


def test_many_series_get_distinct_styles() -> None:
    plot = figures.weights_figure(
        [fake_record(tasks_of(40), e, random.Random(e), test=False) for e in range(2)]
    )
    assert plot is not None
    lines = plot.figure.axes[0].get_lines()
    styles = {(tuple(line.get_color()), line.get_linestyle()) for line in lines}
    assert len(styles) == 40
