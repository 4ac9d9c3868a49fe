"""SIGTERM, SIGHUP and SIGINT stop a run at a safe point: exit 128 + signal, one line naming
the signal and the resume command, no traceback; the resumed run equals an uninterrupted one
bit for bit. A second signal stops at once, and the run still resumes exactly.

The signals come from the plugin data set ``faulty_table`` (FAULTY_TABLE_SIGNALS: sent when
the training split has served so many samples, so at a known step), or from this test once
the log shows the first epoch's line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # imported by the optimizers: once here, not in every fork
import yaml
from cli_harness import SRC, Result, run_cli

import polytask.report
from polytask.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs POSIX signals")

PLUGIN = Path(__file__).with_name("faulty_table.py")
# 96 samples in batches of 16: 6 steps per epoch, 3 epochs
RECIPE: dict[str, Any] = {
    "name": "signals",
    "seed": 0,
    "plugins": ["faulty_table"],
    "data": {"name": "faulty_table", "batch_size": 16, "options": {"n_train": 96}},
    "model": {
        "architecture": "hps",
        "backbone": "mlp",
        # dropout: the random state must be restored too
        "backbone_options": {"hidden": [16], "dropout": 0.2},
    },
    "optim": {"lr": 0.01},
    "train": {"epochs": 3, "progress": False, "deterministic": True},
}
STEP = 16  # samples served per training step


def _no_report(run: Any) -> None:
    """The run report (figures: seconds per run) is not what these tests look at."""


@pytest.fixture(autouse=True)
def _fast_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(polytask.report, "write_run_report", _no_report)


def _project(root: Path, **train: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(PLUGIN, root / PLUGIN.name)
    recipe = json.loads(json.dumps(RECIPE))
    recipe["output_dir"] = str(root / "runs")
    recipe["train"].update(train)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULTY_TABLE_")}
    env.update(extra)
    return env


def _summary(run: Path) -> dict[str, Any]:
    results = json.loads((run / "results.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("time_s")
    weights = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    return {
        "results": {k: results[k] for k in ("val", "test", "selection")},
        "records": records,
        "weights": weights,
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["results"] == b["results"]
    assert a["records"] == b["records"]
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run (checkpoint frequency does not change what a run computes)."""
    root = tmp_path_factory.mktemp("reference")
    recipe = _project(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(polytask.report, "write_run_report", _no_report)
        done = run_cli("train", recipe, "--quiet", "--run-dir", root / "run", env=_env())
    assert done.code == 0, done.err
    return _summary(root / "run")


def _assert_stopped(result: Result, code: int, name: str, *fragments: str) -> str:
    assert not result.hung, result.err[-2000:]
    assert "Traceback" not in result.err, result.err[-4000:]
    assert result.code == code, f"exit code {result.code}, stderr:\n{result.err[-2000:]}"
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    line = lines[0]
    assert line.startswith("polytask: stopped") and f"by {name}" in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def _position(run: Path) -> tuple[int, int]:
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    return int(state["epoch"]), int(state["step_in_epoch"])


@pytest.mark.parametrize(
    ("signame", "every", "at_sample", "position"),
    [
        # epoch 2, step 3 is loading: it finishes, then a checkpoint at the stop
        ("SIGHUP", 2, 8 * STEP + 3, (1, 3)),
        # no step checkpoints: the end of epoch 1 stands, epoch 2's steps are trained again
        ("SIGTERM", None, 8 * STEP + 3, (1, 0)),
        # before any checkpoint: one is written at the stop (epoch 1, step 1)
        ("SIGTERM", None, 3, (0, 1)),
        ("SIGINT", 4, 15 * STEP + 1, (2, 4)),
    ],
    ids=["sighup-step-checkpoints", "sigterm-epoch-checkpoints", "sigterm-first-step", "sigint"],
)
def test_a_signal_mid_epoch_stops_at_the_step_and_resume_is_exact(
    tmp_path: Path,
    reference: dict[str, Any],
    signame: str,
    every: int | None,
    at_sample: int,
    position: tuple[int, int],
) -> None:
    recipe = _project(tmp_path, checkpoint_every_steps=every)
    run = tmp_path / "run"
    env = _env(FAULTY_TABLE_SIGNALS=f"{at_sample}:{signame}")
    stopped = run_cli("train", recipe, "--quiet", "--run-dir", run, env=env)
    code = 128 + int(getattr(signal, signame))
    _assert_stopped(stopped, code, signame, f"`polytask resume {run}`")
    assert not (run / "results.json").exists()
    assert _position(run) == position
    log = (run / "train.log").read_text()
    assert f"stopped by {signame}" in log

    resumed = run_cli("resume", run, "--quiet", env=_env())
    assert resumed.code == 0, resumed.err
    _assert_same(_summary(run), reference)


def test_a_second_signal_stops_at_once_and_the_last_checkpoint_resumes_exactly(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    recipe = _project(tmp_path, checkpoint_every_steps=2)
    run = tmp_path / "run"
    # both while step 9 (epoch 2, step 3) loads: the second interrupts the stop
    env = _env(FAULTY_TABLE_SIGNALS=f"{8 * STEP + 3}:SIGTERM,{8 * STEP + 4}:SIGTERM")
    stopped = run_cli("train", recipe, "--quiet", "--run-dir", run, env=env)
    line = _assert_stopped(stopped, 143, "SIGTERM", "at once", f"`polytask resume {run}`")
    assert "last checkpoint" in line
    assert _position(run) == (1, 2)  # the periodic checkpoint at global step 8
    assert not list((run / "checkpoints").glob(".*.tmp"))
    resumed = run_cli("resume", run, "--quiet", env=_env())
    assert resumed.code == 0, resumed.err
    _assert_same(_summary(run), reference)


def test_sigterm_to_a_fresh_process_group_after_the_first_epoch_line(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    """As a scheduler does: SIGTERM to the whole process group, loader workers included
    (they leave the stop to the main process)."""
    recipe = _project(tmp_path)
    run = tmp_path / "run"
    env = _env(FAULTY_TABLE_SLOW="0.01", PYTHONPATH=str(SRC))  # about 1 s per epoch
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "polytask",
            "train",
            str(recipe),
            "--run-dir",
            str(run),
            "data.num_workers=2",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, for killpg
    )
    deadline = time.monotonic() + 60
    log = run / "train.log"
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and "epoch 1/3" in log.read_text():
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    # the console log (stderr without --quiet) ends with the warning, then the one line
    last = err.strip().splitlines()[-1]
    assert last.startswith("polytask: stopped by SIGTERM; ") and f"`polytask resume {run}`" in last
    assert not (run / "results.json").exists()
    assert _position(run) == (1, 0)  # the end of epoch 1 stands
    resumed = run_cli("resume", run, "--quiet", env=_env())
    assert resumed.code == 0, resumed.err
    _assert_same(_summary(run), reference)


def test_compare_stops_the_grid_and_goes_on(tmp_path: Path, reference: dict[str, Any]) -> None:
    recipe = _project(tmp_path, checkpoint_every_steps=3)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "name": "signals-grid",
                "output_dir": str(tmp_path / "runs"),
                "base": recipe.name,
                "seeds": [0],
                "cells": {"equal": {"balancer.name": "equal"}, "rlw": {"balancer.name": "rlw"}},
            }
        ),
        encoding="utf-8",
    )
    env = _env(FAULTY_TABLE_SIGNALS=f"{10 * STEP + 1}:SIGTERM")
    stopped = run_cli("compare", grid, "--quiet", env=env)
    cell = tmp_path / "runs" / "signals-grid" / "equal" / "seed-0"
    _assert_stopped(stopped, 143, "SIGTERM", f"`polytask compare {grid}`", str(cell))
    assert _position(cell) == (1, 5)
    assert not (tmp_path / "runs" / "signals-grid" / "rlw").exists()
    again = run_cli("compare", grid, "--quiet", env=_env())
    assert again.code == 0, again.err
    _assert_same(_summary(cell), reference)
    assert (tmp_path / "runs" / "signals-grid" / "rlw" / "seed-0" / "results.json").is_file()


def test_handlers_are_restored_after_the_command(tmp_path: Path) -> None:
    from helpers import tiny_config_dict
    from polytask.cli import main

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    # a built-in data set: a plugin imported here would stay registered in this process
    config = tiny_config_dict(tmp_path / "runs", **{"train.epochs": 1})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(recipe), "--quiet", "--run-dir", str(tmp_path / "run")]) == 0
    after = {s: signal.getsignal(s) for s in before}
    assert after == before
