"""The grid report on a hand-made grid directory whose numbers are known."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml

from polytask.metrics.delta_m import Baseline
from polytask.report import figures
from polytask.report.grid_html import task_improvements, write_grid_html

HIB = {"x": {"acc": True}, "y": {"err": False}}
BASE = {"x": {"acc": 50.0}, "y": {"err": 2.0}}
#: cell -> (architecture, balancer, x.acc, y.err); names deliberately unlike the setups
CELLS: dict[str, tuple[str, str, float, float]] = {
    "base": ("single_task", "equal", 50.0, 2.0),
    "mystery": ("hps", "equal", 55.0, 2.2),  # x +10 %, y -10 %
    "other": ("hps", "dwa", 60.0, 1.8),  # x +20 %, y +10 %: dominates mystery and base
    "third": ("mmoe", "equal", 45.0, 1.6),  # x -10 %, y +20 %
}


def make_grid(root: Path, *, rank: bool = True) -> Path:
    grid = root / "g"
    spec = {
        "name": "g",
        "seeds": [0, 1],
        "baseline": "base",
        "protocol": "a <made-up> protocol",
        "cells": {c: {"model.architecture": a} for c, (a, _, _, _) in CELLS.items()},
    }
    grid.mkdir(parents=True)
    (grid / "grid.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    Baseline(values=BASE, higher_is_better=HIB, source="hand-made").save(grid / "baseline.json")
    rows = []
    for i, (cell, (arch, balancer, acc, err)) in enumerate(CELLS.items()):
        for seed in (0, 1):
            run = grid / cell / f"seed-{seed}"
            run.mkdir(parents=True)
            config = {"model": {"architecture": arch}, "balancer": {"name": balancer}}
            (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
            results = {"higher_is_better": HIB, "test": {"metrics": {"x": {"acc": acc}}}}
            (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
            (run / "report.html").write_text("<html></html>", encoding="utf-8")
        dm = -100 * ((acc - 50) / 50 - (err - 2) / 2) / 2
        row: dict[str, Any] = {
            "cell": cell,
            "seeds": 2,
            "x.acc": [acc, 1.0],
            "y.err": [err, None],
            "delta_m": [dm, 0.5],
            "delta_m_seeds": [dm - 0.5, dm + 0.5],
            "time_s": [10.0 * (i + 1), 1.0],
            "parameters": 1000 * (i + 1),
        }
        if rank:
            row["mean_rank"] = 1.0 + i
        rows.append(row)
    summary = {
        "grid": "g",
        "protocol": spec["protocol"],
        "rows": rows,
        "note": "Test split, <mean> & std.",
        "baseline": "hand-made",
        "per_class": None,
    }
    (grid / "results.json").write_text(json.dumps(summary), encoding="utf-8")
    return grid


def test_task_improvements_are_signed_relative_changes() -> None:
    baseline = Baseline(values=BASE, higher_is_better=HIB, source="s")
    rows = [{"cell": c, "x.acc": [a, 0.0], "y.err": [e, 0.0]} for c, (_, _, a, e) in CELLS.items()]
    got = task_improvements(rows, baseline)
    expected = {"base": (0, 0), "mystery": (10, -10), "other": (20, 10), "third": (-10, 20)}
    for cell, (x, y) in expected.items():
        assert got[cell]["x"] == pytest.approx(x) and got[cell]["y"] == pytest.approx(y)


def test_pareto_front_keeps_exactly_the_non_dominated_points() -> None:
    points = {"base": [0, 0], "mystery": [10, -10], "other": [20, 10], "third": [-10, 20]}
    assert figures.pareto_front(points) == ["other", "third"]
    assert figures.pareto_front({"a": [1, 1], "b": [1, 1]}) == ["a", "b"]  # ties dominate nothing
    assert figures.pareto_front({"a": [1, 2], "b": [1, 3]}) == ["b"]


def test_tradeoff_figure_plots_the_improvements_and_marks_the_front() -> None:
    improvement = {"base": {"x": 0.0, "y": 0.0}, "other": {"x": 20.0, "y": 10.0}}
    plot = figures.tradeoff_figure(improvement, "base")
    plt.close(plot.figure)
    assert plot.data["improvement"] == {"base": [0.0, 0.0], "other": [20.0, 10.0]}
    assert plot.data["pareto"] == ["other"]


def test_tradeoff_labels_join_cells_that_would_overprint_and_name_every_cell_once() -> None:
    improvement = {
        "base": {"x": 0.0, "y": 0.0},
        "cs-equal": {"x": 30.1, "y": 19.8},
        "cs-dwa": {"x": 29.9, "y": 19.8},  # 0.2 apart on a span of 44: one label
        "hps": {"x": -14.0, "y": -20.9},
        "mtan": {"x": 13.4, "y": 13.9},  # 3.5 apart from mtan-dwa in y (8 % of 40.7): apart
        "mtan-dwa": {"x": 12.1, "y": 10.4},
    }
    plot = figures.tradeoff_figure(improvement, "base")
    texts = [t.get_text() for t in plot.figure.axes[0].texts]
    plt.close(plot.figure)
    assert sorted(texts) == sorted(["base", "cs-equal, cs-dwa", "hps", "mtan", "mtan-dwa"])


def test_a_crowded_tradeoff_names_only_the_front_and_the_baseline() -> None:
    improvement = {"base": {"x": 0.0, "y": 0.0}}
    improvement |= {f"c{i}": {"x": float(i), "y": float(-i)} for i in range(1, 14)}
    improvement["best"] = {"x": 20.0, "y": 5.0}  # dominates every other cell
    plot = figures.tradeoff_figure(improvement, "base")
    texts = sorted(t.get_text() for t in plot.figure.axes[0].texts)
    plt.close(plot.figure)
    assert plot.data["pareto"] == ["best"]
    assert texts == ["base", "best"]


def test_delta_m_figure_sorts_best_first_with_the_rows_numbers() -> None:
    plot = figures.delta_m_figure(
        ["a", "b", "c"],
        [1.0, -2.0, 0.0],
        [0.5, None, 0.1],
        higher_is_better=False,
        unit="%",
        baseline="c",
        seeds={"a": [0.5, 1.5]},
    )
    plt.close(plot.figure)
    assert plot.data["cells"] == ["b", "c", "a"]
    np.testing.assert_array_equal(plot.data["mean"], [-2.0, 0.0, 1.0])
    np.testing.assert_array_equal(plot.data["std"], [0.0, 0.1, 0.5])


def test_grid_report_reads_setups_from_the_runs_not_the_cell_names(tmp_path: Path) -> None:
    grid = make_grid(tmp_path)
    page = write_grid_html(grid, strict=True).read_text(encoding="utf-8")
    page = page.replace('<td class="text">', "<td>")  # text cells are only aligned left
    for section in ("results", "delta-m", "trade-off", "robustness", "cost", "runs"):
        assert f'<section id="{section}">' in page
    assert 'class="figure-error"' not in page
    assert page.count("<img ") == 4  # Δm, trade-off, robustness, cost
    # the table names each cell's architecture and balancer from its config.yaml
    assert "<td>mystery</td><td>hps</td><td>equal</td>" in page
    assert "<td>other</td><td>hps</td><td>dwa</td>" in page
    # robustness: only hps has two balancers; spread of its mean Δm
    dm = {c: -100 * ((a - 50) / 50 - (e - 2) / 2) / 2 for c, (_, _, a, e) in CELLS.items()}
    spread = abs(dm["mystery"] - dm["other"])
    assert f"<td>hps</td><td>2</td><td>+{spread:.2f}</td>" in page
    assert "<td>mmoe</td><td>2</td>" not in page
    # mean rank from the summary, links to every run's report, escaped strings
    assert "mean rank ↓" in page and "<td>3.00</td>" in page
    assert page.count('href="mystery/seed-') == 2 * 2  # results table and run list
    assert "a &lt;made-up&gt; protocol" in page and "&lt;mean&gt; &amp; std" in page
    assert "http://" not in page and "https://" not in page


def test_grid_report_without_mean_rank_or_seeds_still_renders(tmp_path: Path) -> None:
    grid = make_grid(tmp_path, rank=False)
    summary = json.loads((grid / "results.json").read_text(encoding="utf-8"))
    for row in summary["rows"]:
        del row["delta_m_seeds"]
    (grid / "results.json").write_text(json.dumps(summary), encoding="utf-8")
    page = write_grid_html(grid, strict=True).read_text(encoding="utf-8")
    assert "mean rank" not in page
    assert page.count("<img ") == 4
