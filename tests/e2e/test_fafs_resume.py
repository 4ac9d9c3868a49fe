"""FAFS across a widening: a run stopped after its network was widened and resumed with
``polytask resume`` ends exactly like an uninterrupted run; the best checkpoint and
``evaluate_run`` load the structure they were saved with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import polytask
from helpers import tiny_config_dict
from polytask.api import evaluate_run
from polytask.cli import main as cli_main
from polytask.errors import ConfigError
from polytask.training import StepEnd
from polytask.training.checkpoint import load_checkpoint


class _Crash(Exception):
    pass


def _config(tmp_path: Path, every: int | None) -> dict[str, Any]:
    return tiny_config_dict(
        tmp_path / "runs",
        **{
            "train.epochs": 3,
            "train.checkpoint_every_steps": every,
            "model.architecture": "fafs",
            "model.options": {"branch_cost": 0.0, "affinity_samples": 64},
            "model.backbone": "mlp",
            "model.backbone_options": {"hidden": [24, 12], "dropout": 0.1},
            "optim.name": "adam",
            "optim.lr": 0.003,
        },
    )


def _records(run_dir: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("time_s")
    return records


@pytest.mark.parametrize("every", [3, None], ids=["step-checkpoints", "epoch-checkpoints"])
def test_resume_across_a_widening_matches_the_uninterrupted_run(
    tmp_path: Path, every: int | None
) -> None:
    config = _config(tmp_path, every)
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    _, results = polytask.train(config, run_dir=full, console=False)

    def crash(info: StepEnd) -> None:
        if info.global_step + 1 == 13:  # epoch 2 (8 steps per epoch), after the first round
            raise _Crash

    with pytest.raises(_Crash):
        polytask.train(config, run_dir=stopped, step_callbacks=[crash], console=False)
    state = load_checkpoint(stopped / "checkpoints" / "last.pt")
    assert state["structure"]["groups"][1] == [["left"], ["right"]]  # widened at epoch 1
    assert state["structure"]["groups"][0] == [["left", "right"]]
    assert cli_main(["resume", str(stopped), "--quiet"]) == 0

    records = _records(full)
    assert records == _records(stopped)
    assert [r["architecture"]["branches"] for r in records] == [
        [[["left", "right"]], [["left"], ["right"]]],
        [[["left"], ["right"]], [["left"], ["right"]]],
        [[["left"], ["right"]], [["left"], ["right"]]],
    ]
    assert [d["layer"] for d in records[-1]["architecture"]["decisions"]] == [1, 0]
    b = json.loads((stopped / "results.json").read_text())
    assert results["test"] == b["test"] and results["selection"] == b["selection"]
    wa = load_checkpoint(full / "checkpoints" / "last.pt")
    wb = load_checkpoint(stopped / "checkpoints" / "last.pt")
    assert wa["structure"] == wb["structure"]
    assert wa["model"].keys() == wb["model"].keys()
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert "layers.0.1.0.weight" in wa["model"]
    log = (stopped / "train.log").read_text()
    assert "fafs: layer 1 of 1" in log and "fafs: layer 0 of 1" in log
    report = (stopped / "report.html").read_text()
    assert "Branches found by widening" in report and "{left} {right}" in report


def test_best_checkpoint_before_a_widening_is_evaluated_with_its_structure(
    tmp_path: Path,
) -> None:
    # the chosen weights are those of epoch 1, whose end widened only the top layer
    config = _config(tmp_path, None)
    config["train"]["selection"] = {"protocol": "best", "metric": "left.accuracy"}
    config["optim"] = {"name": "sgd", "lr": 1e-30}  # nothing changes after epoch 1, chosen
    run, results = polytask.train(config, run_dir=tmp_path / "run", console=False)
    best = load_checkpoint(run.path / "checkpoints" / "best.pt")
    assert results["selection"]["epoch"] == 0
    assert best["structure"]["groups"][1] == [["left"], ["right"]]  # widened at epoch 1's end
    again = evaluate_run(run.path, split="test")
    assert again.metrics == results["test"]["metrics"]


def test_a_gradient_method_stops_clearly_when_nothing_stays_shared(tmp_path: Path) -> None:
    config = _config(tmp_path, None)
    config["balancer"] = {"name": "mgda"}
    with pytest.raises(ConfigError, match="shares no parameter between tasks"):
        polytask.train(config, run_dir=tmp_path / "run", console=False)


@pytest.mark.parametrize(
    "balancer",
    [
        {"name": "moco"},
        {"name": "db_mtl"},
        {"name": "excess_mtl"},
        {"name": "excess_mtl", "options": {"level": "feature"}},
        {"name": "samo", "options": {"method": "moco"}},
    ],
    ids=["moco", "db_mtl", "excess_mtl", "excess_mtl-feature", "samo-moco"],
)
def test_methods_with_state_sized_to_the_shared_parameters_train_on_after_a_widening(
    tmp_path: Path, balancer: dict[str, Any]
) -> None:
    """Widening replaces the shared parameters (here the top layer splits, the bottom one stays
    shared): methods whose state is sized to them (tracked gradients, averages, sums of
    squares) start that state again instead of stopping the run with a shape error."""
    config = _config(tmp_path, None)
    config["train"]["epochs"] = 2
    config["model"]["options"]["widen_every"] = 5  # one widening, after epoch 1
    config["balancer"] = balancer
    run, _ = polytask.train(config, run_dir=tmp_path / "run", console=False)
    last = load_checkpoint(run.path / "checkpoints" / "last.pt")
    assert last["structure"]["groups"][1] == [["left"], ["right"]]  # widened after epoch 1
    assert len(_records(run.path)) == 2
    assert all(
        torch.isfinite(torch.as_tensor(v)).all()
        for v in last["model"].values()
        if v.is_floating_point()
    )
