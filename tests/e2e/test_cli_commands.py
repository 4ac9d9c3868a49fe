"""The ``polytask`` commands on tiny settings: train, eval, resume, report, list, compare.

Each command runs in-process through :func:`polytask.cli.main` (the same code path as the
console script), on MultiDigits with a few hundred samples, two epochs and a two-layer CNN.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from polytask.balancing import BALANCERS
from polytask.cli import main
from polytask.data import DATASETS
from polytask.metrics import METRICS
from polytask.models import ARCHITECTURES, BACKBONES, HEADS
from polytask.models.regularizers import REGULARIZERS
from polytask.report.tables import format_value

#: Deliberately large: the command-line overrides below must shrink it.
RECIPE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {"name": "multidigits", "options": {"n_train": 4000, "n_val": 1000, "n_test": 1000}},
    "model": {
        "architecture": "hps",
        "backbone": "small_cnn",
        "backbone_options": {"channels": [32, 32, 32]},
    },
    "train": {"epochs": 10, "device": "cpu"},
}

TINY = [
    "train.epochs=2",
    "data.options.n_train=300",
    "data.options.n_val=100",
    "data.options.n_test=100",
    "model.backbone_options.channels=[8,8]",
    "train.progress=false",
]


# -- helpers ------------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run ``polytask ARGS`` in-process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def cli_captured(*args: object) -> tuple[int, str, str]:
    """Like :func:`cli`, for module-scoped fixtures (which cannot use ``capsys``)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under ``root`` with its content hash, size and modification time."""
    state: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            state[rel] = "dir"
        else:
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[rel] = (digest, st.st_size, st.st_mtime_ns)
    return state


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


# -- train ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_yaml(tmp_path_factory.mktemp("recipe") / "recipe.yaml", RECIPE)


@pytest.fixture(scope="module")
def trained(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``polytask train`` of the recipe with the TINY overrides."""
    output_dir = tmp_path_factory.mktemp("train") / "runs"
    code, out, err = cli_captured("train", recipe, *TINY, f"output_dir={output_dir}")
    assert code == 0, err
    return {"output_dir": output_dir, "out": out, "err": err}


@pytest.fixture(scope="module")
def run_dir(trained: dict[str, Any]) -> Path:
    (line,) = [x for x in trained["out"].splitlines() if x.startswith("run directory: ")]
    return Path(line.removeprefix("run directory: "))


def test_train_creates_a_run_directory(trained: dict[str, Any], run_dir: Path) -> None:
    assert run_dir.parent == trained["output_dir"]
    assert run_dir.name.startswith("tiny-")
    assert [p.name for p in trained["output_dir"].iterdir()] == [run_dir.name]
    for name in [
        "config.yaml",
        "meta.json",
        "metrics.jsonl",
        "train.log",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "results.json",
        "report.md",
        "plots/curves.png",
    ]:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "plots" / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    meta = read_json(run_dir / "meta.json")
    assert {"created", "python", "torch", "polytask"} <= set(meta)


def test_train_records_the_resolved_configuration(trained: dict[str, Any], run_dir: Path) -> None:
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert config["name"] == "tiny"
    assert config["output_dir"] == str(trained["output_dir"])
    assert config["train"]["epochs"] == 2
    assert config["train"]["progress"] is False
    assert config["data"]["options"] == {"n_train": 300, "n_val": 100, "n_test": 100}
    assert config["model"]["backbone_options"] == {"channels": [8, 8]}
    assert config["optim"]["lr"] == 1e-3  # a default, written out in full


def test_train_writes_one_metrics_record_per_epoch(run_dir: Path) -> None:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [0, 1]
    for record in records:
        assert set(record["train"]["loss"]) == {"left", "right"}
        assert set(record["val"]["metrics"]) == {"left", "right"}
        # the selection metric is the sum of the validation losses
        assert record["score"] == pytest.approx(sum(record["val"]["losses"].values()))


def test_train_results_follow_the_selection(run_dir: Path) -> None:
    results = read_json(run_dir / "results.json")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = min(records, key=lambda r: r["score"])
    assert results["tasks"] == ["left", "right"]
    assert results["selection"] == {"protocol": "best", "metric": "loss", "epoch": best["epoch"]}
    # val is re-evaluated on the best checkpoint: the epoch's own record
    assert results["val"]["losses"] == pytest.approx(best["val"]["losses"], rel=1e-5)
    for task in ("left", "right"):
        accuracy = results["test"]["metrics"][task]["accuracy"]
        assert 0 <= accuracy <= 100
    assert results["higher_is_better"] == {"left": {"accuracy": True}, "right": {"accuracy": True}}


def test_train_prints_the_test_table(trained: dict[str, Any], run_dir: Path) -> None:
    results = read_json(run_dir / "results.json")
    header, sep, row = table_lines(trained["out"])
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "split",
        "left accuracy ↑",
        "right accuracy ↑",
    ]
    assert set(sep) <= {"|", "-"}
    test = results["test"]["metrics"]
    expected = [
        "test",
        format_value(test["left"]["accuracy"]),
        format_value(test["right"]["accuracy"]),
    ]
    assert [c.strip() for c in row.strip("|").split("|")] == expected
    assert trained["out"].splitlines()[-1] == f"run directory: {run_dir}"


def test_train_logs_epochs_to_stderr_and_train_log(trained: dict[str, Any], run_dir: Path) -> None:
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    for text in (trained["err"], log):
        assert "epoch 1/2" in text
        assert "epoch 2/2" in text
        assert "finished: results in" in text
    assert "Traceback" not in trained["err"]


def test_train_report(run_dir: Path) -> None:
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert report.startswith(f"# Run {run_dir.name}\n")
    assert "## Results" in report
    assert "![curves](plots/curves.png)" in report
    assert "## Configuration" in report
    assert "channels:" in report


# -- eval, resume, report --------------------------------------------------------------------


@pytest.mark.parametrize("split", ["test", "val"])
def test_eval_reproduces_the_results(
    capsys: pytest.CaptureFixture[str], run_dir: Path, split: str
) -> None:
    results = read_json(run_dir / "results.json")
    before = snapshot(run_dir)
    code, out, err = cli(capsys, "eval", run_dir, "--split", split, "--json")
    assert code == 0, err
    evaluated = json.loads(out)
    assert set(evaluated["metrics"]) == {"left", "right"}
    for task, values in results[split]["metrics"].items():
        assert evaluated["metrics"][task] == pytest.approx(values, rel=1e-6)
    assert evaluated["losses"] == pytest.approx(results[split]["losses"], rel=1e-5)
    assert snapshot(run_dir) == before  # evaluating writes nothing


def test_eval_prints_a_table(capsys: pytest.CaptureFixture[str], run_dir: Path) -> None:
    results = read_json(run_dir / "results.json")
    code, out, _ = cli(capsys, "eval", run_dir)
    assert code == 0
    rows = {
        tuple(c.strip() for c in line.strip("|").split("|")[:2]): line.split("|")[3].strip()
        for line in table_lines(out)[2:]
    }
    test = results["test"]
    for task in ("left", "right"):
        assert rows[(task, "accuracy")] == format_value(test["metrics"][task]["accuracy"])
        assert rows[(task, "loss")] == format_value(test["losses"][task])
    assert "test (best)" in table_lines(out)[0]


def test_resume_finishes_an_interrupted_run(
    capsys: pytest.CaptureFixture[str], run_dir: Path, tmp_path: Path
) -> None:
    """A run stopped after its last epoch's checkpoint but before its results."""
    run = shutil.copytree(run_dir, tmp_path / run_dir.name)
    original = read_json(run / "results.json")
    (run / "results.json").unlink()
    (run / "report.md").unlink()
    checkpoints = snapshot(run / "checkpoints")
    code, out, err = cli(capsys, "resume", run, "--quiet")
    assert code == 0, err
    resumed = read_json(run / "results.json")
    assert resumed["selection"] == original["selection"]
    for split in ("val", "test"):
        for task, values in original[split]["metrics"].items():
            assert resumed[split]["metrics"][task] == pytest.approx(values)
    assert (run / "report.md").is_file()
    assert snapshot(run / "checkpoints") == checkpoints  # no epoch was trained again
    assert "| test" in out


def test_report_rewrites_the_report(
    capsys: pytest.CaptureFixture[str], run_dir: Path, tmp_path: Path
) -> None:
    run = shutil.copytree(run_dir, tmp_path / run_dir.name)
    original = (run / "report.md").read_text(encoding="utf-8")
    (run / "report.md").write_text("stale\n", encoding="utf-8")
    (run / "plots" / "curves.png").unlink()
    reports = ("report.md", "report.html", "plots")
    untouched = {k: v for k, v in snapshot(run).items() if not k.startswith(reports)}
    code, out, err = cli(capsys, "report", run)
    assert code == 0, err
    assert out.splitlines() == [f"written: {run / 'report.md'}", f"written: {run / 'report.html'}"]
    assert (run / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert (run / "report.md").read_text(encoding="utf-8") == original
    assert (run / "plots" / "curves.png").read_bytes().startswith(b"\x89PNG")
    after = snapshot(run)
    assert {k: after[k] for k in untouched} == untouched


# -- list and help --------------------------------------------------------------------------


def test_list_prints_the_registries(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "list")
    assert code == 0
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    expected = {
        "architectures": ARCHITECTURES,
        "backbones": BACKBONES,
        "heads": HEADS,
        "task regularizers": REGULARIZERS,
        "balancing methods": BALANCERS,
        "data sets": DATASETS,
        "metrics": METRICS,
    }
    assert set(lines) == set(expected)
    for title, registry in expected.items():
        assert lines[title].split(", ") == registry.names()
    assert {"hps", "single_task"} <= set(lines["architectures"].split(", "))
    assert "multidigits" in lines["data sets"].split(", ")


def test_python_m_polytask_help(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "polytask", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: polytask")
    for command in ("train", "resume", "eval", "compare", "report", "list"):
        assert f"    {command} " in proc.stdout


# -- compare ---------------------------------------------------------------------------------


def _grid_spec(output_dir: Path, hps_cell: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "g",
        "output_dir": str(output_dir),
        "base": "recipe.yaml",  # relative to the grid file
        "config": {o.split("=")[0]: yaml.safe_load(o.split("=")[1]) for o in TINY[:-1]},
        "seeds": [0],
        "baseline": "stl",
        "delta_m": "metric_mean",
        "cells": {"stl": {"model.architecture": "single_task"}, "hps": hps_cell},
    }


def _write_grid(folder: Path, output_dir: Path, hps_cell: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_yaml(folder / "recipe.yaml", RECIPE)
    return write_yaml(folder / "grid.yaml", _grid_spec(output_dir, hps_cell))


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``polytask compare`` of a 2-cell x 1-seed grid."""
    root = tmp_path_factory.mktemp("grid")
    path = _write_grid(root, root / "grids", {"model.architecture": "hps"})
    code, out, err = cli_captured("compare", path, "train.progress=false")
    assert code == 0, err
    return {"path": path, "dir": root / "grids" / "g", "out": out}


def test_compare_trains_every_cell_and_writes_tables(grid: dict[str, Any]) -> None:
    grid_dir = grid["dir"]
    assert "[stl seed 0] training ->" in grid["out"]
    assert "[hps seed 0] training ->" in grid["out"]
    for name in ("grid.yaml", "results.md", "results.csv", "results.json", "baseline.json"):
        assert (grid_dir / name).is_file(), name
    for cell in ("stl", "hps"):
        run = grid_dir / cell / "seed-0"
        assert (run / "results.json").is_file()
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        assert config["name"] == f"g.{cell}"
        assert config["train"]["epochs"] == 2
        assert config["train"]["progress"] is False  # the command-line override
    config = yaml.safe_load((grid_dir / "stl" / "seed-0" / "config.yaml").read_text())
    assert config["model"]["architecture"] == "single_task"


def test_compare_prints_a_table_with_delta_m(grid: dict[str, Any]) -> None:
    lines = table_lines(grid["out"])
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["cell", "seeds", "left accuracy ↑", "right accuracy ↑"]
    assert header[4].startswith("Δm % (metric_mean)")
    rows = {r[0]: r for r in ([c.strip() for c in x.strip("|").split("|")] for x in lines[2:])}
    assert set(rows) == {"stl", "hps"}
    assert float(rows["stl"][4]) == 0  # the baseline against itself
    summary = {row["cell"]: row for row in read_json(grid["dir"] / "results.json")["rows"]}
    assert float(rows["hps"][4]) == pytest.approx(summary["hps"]["delta_m"][0], abs=0.0051)
    assert "Δm against cell 'stl'" in grid["out"]
    assert (grid["dir"] / "results.md").read_text(encoding="utf-8").count("| stl") == 1


def test_compare_delta_m_against_the_baseline_cell(grid: dict[str, Any]) -> None:
    grid_dir = grid["dir"]
    stl = read_json(grid_dir / "stl" / "seed-0" / "results.json")["test"]["metrics"]
    hps = read_json(grid_dir / "hps" / "seed-0" / "results.json")["test"]["metrics"]
    baseline = read_json(grid_dir / "baseline.json")
    assert baseline["values"] == stl
    assert baseline["higher_is_better"] == {"left": {"accuracy": True}, "right": {"accuracy": True}}
    # metric_mean: -100 * mean over metrics of (M - B) / B for higher-is-better metrics
    expected = (
        -100 * sum((hps[t]["accuracy"] - stl[t]["accuracy"]) / stl[t]["accuracy"] for t in stl) / 2
    )
    summary = read_json(grid_dir / "results.json")
    rows = {row["cell"]: row for row in summary["rows"]}
    assert rows["hps"]["delta_m"][0] == pytest.approx(expected)
    assert rows["stl"]["delta_m"][0] == 0
    with (grid_dir / "results.csv").open(encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    by_cell = {r["cell"]: r for r in table}
    assert math.isclose(float(by_cell["hps"]["delta_m"]), expected, rel_tol=1e-9)
    assert float(by_cell["stl"]["left.accuracy"]) == stl["left"]["accuracy"]


def test_compare_again_trains_nothing(
    capsys: pytest.CaptureFixture[str], grid: dict[str, Any]
) -> None:
    grid_dir = grid["dir"]
    cells = {cell: snapshot(grid_dir / cell) for cell in ("stl", "hps")}
    code, out, err = cli(capsys, "compare", grid["path"], "train.progress=false")
    assert code == 0, err
    assert "training ->" not in out
    assert out.count("finished earlier") == 2
    assert table_lines(out) == table_lines(grid["out"])
    for cell, before in cells.items():
        assert snapshot(grid_dir / cell) == before, f"cell {cell} was touched"


def test_report_of_a_grid_directory(
    capsys: pytest.CaptureFixture[str], grid: dict[str, Any]
) -> None:
    code, out, err = cli(capsys, "report", grid["dir"])
    assert code == 0, err
    assert table_lines(out) == table_lines(grid["out"])
    assert f"written: {grid['dir'] / 'results.md'}" in out
    assert f"written: {grid['dir'] / 'report.html'}" in out
    assert (grid["dir"] / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def _changed_grid(grid: dict[str, Any], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the trained grid and a grid file whose cell 'hps' now has another learning rate."""
    grids = tmp_path / "grids"
    shutil.copytree(grid["dir"], grids / "g")
    path = _write_grid(tmp_path / "spec", grids, {"model.architecture": "hps", "optim.lr": 0.01})
    return path, grids / "g"


def test_compare_cell_trained_with_another_configuration(
    capsys: pytest.CaptureFixture[str], grid: dict[str, Any], tmp_path: Path
) -> None:
    path, grid_dir = _changed_grid(grid, tmp_path)
    cells = {cell: snapshot(grid_dir / cell) for cell in ("stl", "hps")}
    code, _, err = cli(capsys, "compare", path, "train.progress=false", "--quiet")
    assert code == 2
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("polytask: error:")]
    assert str(grid_dir / "hps" / "seed-0") in line
    assert "another configuration than cell 'hps'" in line
    assert "give the grid a new name or remove" in line
    for cell, before in cells.items():
        assert snapshot(grid_dir / cell) == before, f"cell {cell} was touched"


def test_compare_cell_mismatch_overwrites_nothing(
    capsys: pytest.CaptureFixture[str], grid: dict[str, Any], tmp_path: Path
) -> None:
    path, grid_dir = _changed_grid(grid, tmp_path)
    before = snapshot(grid_dir)
    code, _, _ = cli(capsys, "compare", path, "train.progress=false", "--quiet")
    assert code == 2
    assert snapshot(grid_dir) == before
