"""A grid with ``decathlon_score: true``: each cell scored as Rebuffi et al. 2017 define it.

The expected scores are computed here from the paper's formula, by hand, not with
``polytask.metrics.decathlon_score``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from polytask.compare import summarize_grid

HIB = {"a": {"accuracy": True}, "b": {"accuracy": True}}
#: cell -> per seed (a accuracy, b accuracy)
RUNS = {
    "single_task": [(90.0, 80.0), (80.0, 80.0)],  # mean errors 15 and 20: E_max 30 and 40
    "hps": [(85.0, 70.0), (100.0, 90.0)],
    "bad": [(60.0, 50.0), (65.0, 55.0)],  # errors beyond E_max: 0 points
}


def _paper_score(acc_a: float, acc_b: float) -> float:
    total = 0.0
    for acc, e_max in ((acc_a, 2 * 15.0), (acc_b, 2 * 20.0)):
        error = 100.0 - acc
        total += 1000.0 * max(0.0, (e_max - error) / e_max) ** 2
    return total


def _grid(root: Path, *, score: bool) -> Path:
    grid = root / "g"
    grid.mkdir()
    spec = {
        "name": "g",
        "seeds": [0, 1],
        "baseline": "single_task",
        "decathlon_score": score,
        "cells": {c: {"model.architecture": "hps"} for c in RUNS},
    }
    (grid / "grid.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    for cell, seeds in RUNS.items():
        for seed, (acc_a, acc_b) in enumerate(seeds):
            run = grid / cell / f"seed-{seed}"
            run.mkdir(parents=True)
            results = {
                "higher_is_better": HIB,
                "test": {"metrics": {"a": {"accuracy": acc_a}, "b": {"accuracy": acc_b}}},
                "train_time_s": 1.0,
                "parameters": {"shared": 10},
            }
            (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return grid


def test_every_cell_gets_the_papers_score_per_seed(tmp_path: Path) -> None:
    grid = _grid(tmp_path, score=True)
    summary = summarize_grid(grid)
    rows = {row["cell"]: row for row in summary["rows"]}
    for cell, seeds in RUNS.items():
        expected = [_paper_score(a, b) for a, b in seeds]
        assert rows[cell]["decathlon_seeds"] == pytest.approx(expected)
        assert rows[cell]["decathlon"][0] == pytest.approx(sum(expected) / 2)
    # the baseline's own mean accuracies would score 250 per task; its seeds straddle that
    assert rows["bad"]["decathlon"][0] == 0.0
    assert "decathlon score ↑" in (grid / "results.md").read_text(encoding="utf-8")
    with (grid / "results.csv").open(encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    hps = next(r for r in table if r["cell"] == "hps")
    assert float(hps["decathlon"]) == pytest.approx(rows["hps"]["decathlon"][0])
    assert "decathlon score" in (grid / "report.html").read_text(encoding="utf-8")


def test_without_the_option_there_is_no_score(tmp_path: Path) -> None:
    grid = _grid(tmp_path, score=False)
    summary = summarize_grid(grid)
    assert all("decathlon" not in row for row in summary["rows"])
    assert "decathlon" not in (grid / "results.md").read_text(encoding="utf-8")


def test_the_grid_report_is_written_with_the_summary_and_shows_the_verdict(
    tmp_path: Path,
) -> None:
    grid = _grid(tmp_path, score=True)
    summary = summarize_grid(grid)
    assert summary["html"] == str(grid / "report.html")
    page = (grid / "report.html").read_text(encoding="utf-8")
    # hps: Δm +6.25 % and -15.07 % on the two seeds, ahead on average by less than the spread
    assert "'hps'" in summary["verdict"]
    assert "by less than the standard deviation" in summary["verdict"]
    assert "Verdict." in page and "by less than the standard deviation" in page
