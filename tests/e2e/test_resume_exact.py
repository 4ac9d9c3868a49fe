"""A run killed mid-epoch (SIGKILL) and resumed ends exactly like an uninterrupted run."""

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
import torch

from helpers import tiny_config_dict
from polytask.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    from polytask.api import train

    config = json.loads(sys.argv[1])
    kill_at = int(sys.argv[2])

    def kill(info):
        if info.global_step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no atexit: a real crash

    train(config, run_dir=sys.argv[3], step_callbacks=[kill], console=False)
    """
)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for r in records:
        r.pop("time_s")
    return records


@pytest.mark.parametrize(
    "checkpoint_every_steps", [3, None], ids=["step-checkpoints", "epoch-checkpoints"]
)
def test_killed_and_resumed_run_matches_uninterrupted_run(
    tmp_path: Path, checkpoint_every_steps: int | None
) -> None:
    config = tiny_config_dict(
        tmp_path / "runs",
        **{
            "train.epochs": 3,
            "train.checkpoint_every_steps": checkpoint_every_steps,
            # dropout in the heads' trunk: the random state must be restored too
            "model.backbone": "mlp",
            "model.backbone_options": {"hidden": [32, 16], "dropout": 0.2},
            "data.options.label_fraction": 0.7,
        },
    )
    # 256 samples / 32 = 8 steps per epoch; die at global step 13 = epoch 2, step 5
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    full, killed = tmp_path / "full", tmp_path / "killed"

    done = _run([str(script), json.dumps(config), "0", str(full)], tmp_path)
    assert done.returncode == 0, done.stderr

    crash = _run([str(script), json.dumps(config), "13", str(killed)], tmp_path)
    assert crash.returncode == -signal.SIGKILL, crash.stderr
    assert not (killed / "results.json").exists()
    state = load_checkpoint(killed / "checkpoints" / "last.pt")
    if checkpoint_every_steps == 3:
        assert (state["epoch"], state["step_in_epoch"]) == (1, 4)  # global step 12
    else:
        assert (state["epoch"], state["step_in_epoch"]) == (1, 0)

    resumed = _run(["-m", "polytask", "resume", str(killed), "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    a = json.loads((full / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert a["test"] == b["test"]
    assert a["val"] == b["val"]
    assert a["selection"] == b["selection"]
    assert _records(full) == _records(killed)
    wa = load_checkpoint(full / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(killed / "checkpoints" / "last.pt")["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
