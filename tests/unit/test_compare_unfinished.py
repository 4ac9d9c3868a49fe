"""Grid summaries of unfinished grids: every cell is listed with its state (finished, K/N
seeds, running or interrupted, not run), and means are over the finished seeds only."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from polytask.compare import cell_state, run_state, summarize_grid
from polytask.errors import ConfigError

HIB = {"a": {"accuracy": True}}


def _finished(run: Path, accuracy: float) -> None:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 4}}), encoding="utf-8")
    results = {
        "higher_is_better": HIB,
        "test": {"metrics": {"a": {"accuracy": accuracy}}},
        "train_time_s": 1.0,
        "parameters": {"shared": 10},
    }
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")


def _started(run: Path, epochs_done: int) -> None:
    """A run killed (or still running) after ``epochs_done`` of 4 epochs: no results.json."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 4}}), encoding="utf-8")
    records = "".join(json.dumps({"epoch": e}) + "\n" for e in range(epochs_done))
    (run / "metrics.jsonl").write_text(records, encoding="utf-8")


def _grid(root: Path) -> Path:
    grid = root / "g"
    grid.mkdir()
    spec = {
        "name": "g",
        "seeds": [0, 1, 2],
        "baseline": "stl",
        "cells": {"stl": {}},
        "product": {"arch": {"hps": {}, "mtan": {}}, "method": {"equal": {}, "dwa": {}}},
    }
    (grid / "grid.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    for seed, acc in enumerate((50.0, 52.0, 54.0)):
        _finished(grid / "stl" / f"seed-{seed}", acc)
    # hps-equal: 2 of 3 seeds finished, the third killed after an epoch; its would-be value
    # (99) must not count
    _finished(grid / "hps-equal" / "seed-0", 60.0)
    _finished(grid / "hps-equal" / "seed-1", 64.0)
    _started(grid / "hps-equal" / "seed-2", 1)
    # hps-dwa: one seed started, nothing finished; mtan-equal: seed 1 finished only
    _started(grid / "hps-dwa" / "seed-0", 0)
    _finished(grid / "mtan-equal" / "seed-1", 70.0)
    # mtan-dwa: never started
    return grid


def test_run_and_cell_states(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    assert run_state(grid / "stl" / "seed-0") == "finished"
    assert run_state(grid / "hps-equal" / "seed-2") == "running or interrupted (1/4 epochs)"
    assert run_state(grid / "mtan-dwa" / "seed-0") == "not run"
    assert cell_state({0: "finished", 1: "finished"}) == "finished"
    assert cell_state({0: "not run", 1: "not run"}) == "not run"
    assert (
        cell_state({0: "finished", 1: "not run", 2: "running or interrupted (1/4 epochs)"})
        == "1/3 seeds finished; seed 1: not run; seed 2: running or interrupted (1/4 epochs)"
    )


def test_every_unfinished_cell_is_listed_with_its_state(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    summary = summarize_grid(grid)
    rows = {row["cell"]: row for row in summary["rows"]}
    # the table: cells with a finished seed, means over the finished seeds only
    assert list(rows) == ["stl", "hps-equal", "mtan-equal"]
    assert rows["hps-equal"]["seeds"] == 2 and rows["hps-equal"]["seeds_total"] == 3
    assert rows["hps-equal"]["run_seeds"] == [0, 1]
    assert rows["hps-equal"]["a.accuracy"][0] == pytest.approx(62.0)
    assert rows["mtan-equal"]["a.accuracy"] == (70.0, None)
    assert rows["stl"]["state"] == "finished"
    expected = {
        "hps-equal": "2/3 seeds finished; seed 2: running or interrupted (1/4 epochs)",
        "hps-dwa": "0/3 seeds finished; seed 0: running or interrupted (0/4 epochs); "
        "seed 1: not run; seed 2: not run",
        "mtan-equal": "1/3 seeds finished; seed 0: not run; seed 2: not run",
        "mtan-dwa": "not run",
    }
    assert summary["unfinished"] == expected
    assert summary["cells"]["hps-equal"]["runs"] == {
        "0": "finished",
        "1": "finished",
        "2": "running or interrupted (1/4 epochs)",
    }
    assert summary["cells"]["stl"]["state"] == "finished"

    markdown = (grid / "results.md").read_text(encoding="utf-8")
    assert re.search(r"^\| hps-equal +\| 2/3 +\|", markdown, re.M)
    assert re.search(r"^\| stl +\| 3 +\|", markdown, re.M)  # complete: just the number
    assert "**Unfinished cells** (4 of 5)" in markdown
    for cell, state in expected.items():
        assert re.search(rf"^\| {cell} +\| {re.escape(state)} +\|$", markdown, re.M), cell

    with (grid / "results.csv").open(encoding="utf-8") as f:
        table = {r["cell"]: r for r in csv.DictReader(f)}
    assert list(table) == ["stl", "hps-equal", "mtan-equal", "hps-dwa", "mtan-dwa"]
    assert table["hps-equal"]["state"] == expected["hps-equal"]
    assert float(table["hps-equal"]["a.accuracy"]) == pytest.approx(62.0)
    assert table["mtan-dwa"]["state"] == "not run" and table["mtan-dwa"]["a.accuracy"] == ""
    assert table["stl"]["state"] == "finished"

    saved = json.loads((grid / "results.json").read_text(encoding="utf-8"))
    assert saved["unfinished"] == expected

    html = (grid / "report.html").read_text(encoding="utf-8")
    assert "Unfinished cells" in html and "mtan-dwa" in html and "2/3" in html


def test_a_finished_grid_lists_nothing(tmp_path: Path) -> None:
    grid = tmp_path / "g"
    grid.mkdir()
    spec = {"name": "g", "seeds": [0], "cells": {"x": {}, "y": {}}}
    (grid / "grid.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    _finished(grid / "x" / "seed-0", 10.0)
    _finished(grid / "y" / "seed-0", 20.0)
    summary = summarize_grid(grid)
    assert summary["unfinished"] == {} and summary["unfinished_note"] is None
    assert "Unfinished" not in (grid / "results.md").read_text(encoding="utf-8")


def test_no_finished_run_names_every_state(tmp_path: Path) -> None:
    grid = tmp_path / "g"
    grid.mkdir()
    spec = {"name": "g", "seeds": [0], "cells": {"x": {}, "y": {}}}
    (grid / "grid.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    _started(grid / "x" / "seed-0", 2)
    with pytest.raises(ConfigError, match=r"no finished runs yet \(x: 0/1 seeds finished; "):
        summarize_grid(grid)
