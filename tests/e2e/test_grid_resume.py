"""A grid killed in the middle of a cell (SIGKILL) resumes where it stopped: finished runs are
not retrained, the interrupted run resumes from its checkpoint, and the tables equal those of
an uninterrupted grid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import snapshot, tiny_config_dict

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

# Runs the grid; the Trainer of run KILL_CELL / seed 1 kills the whole process at KILL_STEP.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import polytask.compare as compare

    grid, kill_cell, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    Original = compare.Trainer

    def trainer(components, run, **kwargs):
        t = Original(components, run, **kwargs)
        if run.path.parent.name == kill_cell and run.path.name == "seed-1":
            def kill(info):
                if info.global_step + 1 == kill_step:
                    os.kill(os.getpid(), signal.SIGKILL)  # a real crash: nothing cleans up
            t.step_callbacks.append(kill)
        return t

    compare.Trainer = trainer
    compare.run_grid(grid, console=True)
    """
)


def _grid(folder: Path, name: str) -> Path:
    base = tiny_config_dict(folder, **{"train.checkpoint_every_steps": 3})
    base["data"]["options"] = {"n_train": 160, "n_val": 64, "n_test": 64}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    spec = {
        "name": name,
        "output_dir": str(folder / "grids"),
        "base": "base.yaml",
        "seeds": [0, 1],
        "baseline": "stl",
        "cells": {
            "stl": {"model.architecture": "single_task"},
            "hps": {"model.architecture": "hps", "balancer.name": "dwa"},
        },
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=600
    )


def _table(grid_dir: Path) -> list[dict[str, Any]]:
    rows = json.loads((grid_dir / "results.json").read_text(encoding="utf-8"))["rows"]
    for row in rows:
        row.pop("time_s")  # wall time is the one thing a resumed run cannot reproduce
    return rows


def test_grid_killed_mid_cell_resumes_to_the_same_table(tmp_path: Path) -> None:
    whole = _grid(tmp_path / "whole", "g")
    done = _python("-m", "polytask", "compare", str(whole))
    assert done.returncode == 0, done.stderr

    killed = _grid(tmp_path / "killed", "g")
    # 160 samples / batch 32 = 5 steps an epoch; step 8 is in epoch 2, after a checkpoint at 6
    crash = _python("-c", KILLER, str(killed), "hps", "8")
    assert crash.returncode == -signal.SIGKILL, crash.stderr
    grid_dir = tmp_path / "killed" / "grids" / "g"
    finished = {
        (c, s)
        for c in ("stl", "hps")
        for s in (0, 1)
        if (grid_dir / c / f"seed-{s}" / "results.json").exists()
    }
    assert finished == {("stl", 0), ("stl", 1), ("hps", 0)}
    assert (grid_dir / "hps" / "seed-1" / "checkpoints" / "last.pt").exists()
    before = {run: snapshot(grid_dir / run[0] / f"seed-{run[1]}") for run in finished}

    again = _python("-m", "polytask", "compare", str(killed))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished earlier") == 3
    assert "[4/4] [hps seed 1] resuming" in again.stdout
    assert "training ->" not in again.stdout
    for (cell, seed), snap in before.items():  # finished runs untouched
        assert snapshot(grid_dir / cell / f"seed-{seed}") == snap
    assert _table(grid_dir) == _table(tmp_path / "whole" / "grids" / "g")
