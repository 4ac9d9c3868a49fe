"""`polytask compare --cells`: a grid run in parts trains only the chosen cells, and the table
shows every cell with finished runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from helpers import tiny_config_dict
from polytask.cli import main
from polytask.compare import select_cells
from polytask.errors import ConfigError


def _grid(folder: Path) -> Path:
    base = tiny_config_dict(folder, **{"train.epochs": 1, "train.progress": False})
    base["data"]["options"] = {"n_train": 64, "n_val": 32, "n_test": 32}
    (folder / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    spec = {
        "name": "parts",
        "output_dir": str(folder / "grids"),
        "base": "base.yaml",
        "seeds": [0],
        "baseline": "stl",
        "cells": {
            "stl": {"model.architecture": "single_task"},
            "hps-equal": {"model.architecture": "hps"},
            "hps-dwa": {"model.architecture": "hps", "balancer.name": "dwa"},
        },
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _trained(grid_dir: Path) -> list[str]:
    return sorted(p.parent.parent.name for p in grid_dir.glob("*/seed-*/results.json"))


def test_a_grid_run_in_parts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = _grid(tmp_path)
    grid_dir = tmp_path / "grids" / "parts"
    assert main(["compare", str(grid), "--quiet", "--cells", "stl"]) == 0
    assert _trained(grid_dir) == ["stl"]
    assert main(["compare", str(grid), "--quiet", "--cells", "hps-d*, stl"]) == 0
    assert _trained(grid_dir) == ["hps-dwa", "stl"]
    out = capsys.readouterr().out
    last = out[[m.start() for m in re.finditer(r"^\| cell +\| seeds", out, re.M)][-1] :]
    table, _, rest = last.partition("\n\n")
    assert "| hps-dwa" in table and "| stl" in table and "hps-equal" not in table
    # the cell not trained yet is listed with its state after the table, not left out
    assert re.search(r"^\| hps-equal +\| not run +\|$", rest, re.M)
    assert main(["compare", str(grid), "--quiet"]) == 0  # the rest
    assert _trained(grid_dir) == ["hps-dwa", "hps-equal", "stl"]


def test_a_pattern_that_matches_nothing_names_the_cells(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = _grid(tmp_path)
    assert main(["compare", str(grid), "--quiet", "--cells", "mtan-*"]) == 2
    err = capsys.readouterr().err
    assert "'mtan-*' matches no cell; the cells are stl, hps-equal, hps-dwa" in err
    assert not (tmp_path / "grids").exists()  # nothing written
    assert select_cells(["a", "b-1", "b-2"], ["b-*", "a"]) == ["a", "b-1", "b-2"]
    with pytest.raises(ConfigError, match="empty pattern"):
        select_cells(["a"], ["a", ""])
