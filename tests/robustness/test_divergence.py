"""A diverging run stops with exit code 3, never saves a non-finite checkpoint, and says
what to do (start a new run with a lower learning rate: resuming repeats the divergence)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cli_harness import assert_refused, run_cli, write

from helpers import tiny_config_dict
from polytask.training.checkpoint import load_checkpoint
from polytask.training.trainer import Trainer


def _non_finite(obj: Any, name: str = "") -> list[str]:
    if isinstance(obj, torch.Tensor):
        finite = not obj.is_floating_point() or bool(torch.isfinite(obj).all())
        return [] if finite else [name]
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in _non_finite(v, f"{name}.{k}")]
    if isinstance(obj, list | tuple):
        return [n for i, v in enumerate(obj) for n in _non_finite(v, f"{name}[{i}]")]
    return []


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    config = tiny_config_dict(tmp_path / "runs", **{"train.epochs": 3})
    return write(tmp_path / "recipe.yaml", yaml.safe_dump(config))


def test_batchnorm_statistics_that_diverge_are_never_checkpointed(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    optimizer_step = Trainer._optimizer_step

    def diverging(self: Trainer) -> None:
        optimizer_step(self)
        if self.state.epoch >= 1:  # the second epoch: the running variance overflows
            for name, buffer in self.c.model.named_buffers():
                if name.endswith("running_var"):
                    buffer.fill_(math.inf)

    monkeypatch.setattr(Trainer, "_optimizer_step", diverging)  # inherited by the fork
    result = run_cli("train", recipe, "--quiet", cwd=tmp_path)
    message = assert_refused(
        result,
        "running_var holds NaN or infinite values",
        "keeps its last good checkpoint",
        "resuming it repeats the divergence",
        "Start a new run with a lower optim.lr (this run: 0.01)",
        "optim.lr=0.001",
        code=3,
    )
    assert "Traceback" not in message
    (run,) = (tmp_path / "runs").iterdir()
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 1  # the end of the first epoch, before the divergence
    assert _non_finite(last) == []
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert _non_finite(best) == []


def test_a_loss_that_becomes_nan_names_the_remedy(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    optimizer_step = Trainer._optimizer_step

    def diverging(self: Trainer) -> None:
        optimizer_step(self)
        if self.state.epoch >= 1:
            with torch.no_grad():
                for p in self.c.model.parameters():
                    p.fill_(math.nan)

    monkeypatch.setattr(Trainer, "_optimizer_step", diverging)
    result = run_cli("train", recipe, "--quiet", cwd=tmp_path)
    assert_refused(
        result,
        "the loss of task(s)",
        "at epoch 2, step 2",
        "keeps its last good checkpoint",
        "Start a new run with a lower optim.lr",
        code=3,
    )
    (run,) = (tmp_path / "runs").iterdir()
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and _non_finite(last) == []


def test_a_learning_rate_far_too_high_writes_no_checkpoint(recipe: Path, tmp_path: Path) -> None:
    result = run_cli("train", recipe, "optim.name=sgd", "optim.lr=1e6", "--quiet", cwd=tmp_path)
    assert_refused(
        result,
        "holds NaN or infinite values" if "holds" in result.err else "the loss of task(s)",
        "no checkpoint had been written yet",
        "optim.lr=100000",
        code=3,
    )
    (run,) = (tmp_path / "runs").iterdir()
    assert not (run / "checkpoints" / "last.pt").exists()
    for path in run.rglob("*.pt"):
        assert _non_finite(load_checkpoint(path)) == [], path
