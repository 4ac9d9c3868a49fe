"""Tiny runs for the file system, locking and run-directory tests: a finished reference run,
an interrupted one (stopped mid-epoch after a step checkpoint), and exact comparisons."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from helpers import tiny_config_dict
from polytask.training.checkpoint import load_checkpoint

#: 256 samples / batch 32 = 8 steps an epoch, 2 epochs; a checkpoint every 3 steps
OVERRIDES: dict[str, Any] = {"train.checkpoint_every_steps": 3}
STOP_AT = 11  # global step 11: epoch 2, after the checkpoint at step 9


class Stop(Exception):
    """Raised by a step callback: the run stops as if the process had died there."""


def config_dict(output_dir: Path, **overrides: Any) -> dict[str, Any]:
    return tiny_config_dict(output_dir, **{**OVERRIDES, **overrides})


def write_config(folder: Path, **overrides: Any) -> Path:
    """A recipe file ``folder/tiny.yaml`` whose runs go to ``folder/runs``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config_dict(folder / "runs", **overrides)), encoding="utf-8")
    return path


def train_finished(run_dir: Path, **overrides: Any) -> Path:
    from polytask.api import train

    train(config_dict(run_dir.parent, **overrides), run_dir=run_dir, console=False)
    return run_dir


def train_interrupted(run_dir: Path, stop_at: int = STOP_AT, **overrides: Any) -> Path:
    """A run stopped at ``stop_at`` (its last checkpoint is the one before)."""
    from polytask.api import train

    def stop(info: Any) -> None:
        if info.global_step + 1 == stop_at:
            raise Stop

    try:
        train(
            config_dict(run_dir.parent, **overrides),
            run_dir=run_dir,
            step_callbacks=[stop],
            console=False,
        )
    except Stop:
        pass
    else:
        raise AssertionError("the run was not stopped")
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert not (run_dir / "results.json").exists()
    return run_dir


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def records(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        record.pop("time_s")
        out.append(record)
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """Bit for bit the same results, records and final weights (wall times aside)."""
    ra = json.loads((a / "results.json").read_text(encoding="utf-8"))
    rb = json.loads((b / "results.json").read_text(encoding="utf-8"))
    for key in ("val", "test", "selection", "tasks", "delta_m"):
        assert ra.get(key) == rb.get(key), key
    assert records(a) == records(b)
    for name in ("last.pt", "best.pt"):
        wa = load_checkpoint(a / "checkpoints" / name)["model"]
        wb = load_checkpoint(b / "checkpoints" / name)["model"]
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (name, key)
