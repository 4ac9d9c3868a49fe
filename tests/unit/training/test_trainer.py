"""The trainer: missing labels, divergence, selection protocols, precision, multi-input."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from helpers import tiny_config_dict
from polytask.api import train
from polytask.balancing.base import BALANCERS, BackwardContext, LossWeighting
from polytask.config import load_config, to_dict
from polytask.data.base import DATASETS, DataBundle
from polytask.data.tensor import TensorMTLDataset
from polytask.errors import TrainingDiverged
from polytask.losses import CrossEntropyLoss
from polytask.metrics.classification import Accuracy
from polytask.tasks import Task
from polytask.training.build import build_components
from polytask.training.checkpoint import load_checkpoint
from polytask.training.rundir import RunDirectory
from polytask.training.trainer import Trainer

SEEN_LOSS_KEYS: list[tuple[str, ...]] = []


class RecordingEqual(LossWeighting):
    """Equal weighting that records which tasks each step's losses cover."""

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        SEEN_LOSS_KEYS.append(tuple(losses))
        return {t: torch.ones(()) for t in losses}


def _classification(name: str) -> Task:
    return Task(name=name, loss=CrossEntropyLoss(), metrics={"accuracy": Accuracy}, output_dim=3)


def unlabelled_b(n: int = 64) -> DataBundle:
    """Task ``a`` always labelled, task ``b`` never labelled in training."""
    g = torch.Generator().manual_seed(0)

    def split(labelled_b: bool) -> TensorMTLDataset:
        x = torch.randn(n, 1, 12, 12, generator=g)
        targets = {
            "a": torch.randint(0, 3, (n,), generator=g),
            "b": torch.randint(0, 3, (n,), generator=g),
        }
        mask = {"a": torch.ones(n, dtype=torch.bool), "b": torch.full((n,), labelled_b)}
        return TensorMTLDataset(x, targets, mask)

    return DataBundle(
        tasks={"a": _classification("a"), "b": _classification("b")},
        train=split(False),
        val=split(True),
        test=split(True),
        input_shape=(1, 12, 12),
    )


@pytest.fixture
def test_components() -> Iterator[None]:
    """Register this module's test balancer and data set for one test only."""
    BALANCERS.register("test_recording_equal")(RecordingEqual)
    DATASETS.register("test_unlabelled_b")(unlabelled_b)
    yield
    BALANCERS.unregister("test_recording_equal")
    DATASETS.unregister("test_unlabelled_b")


@pytest.mark.usefixtures("test_components")
def test_a_task_without_labels_in_a_batch_gets_no_loss_and_no_gradient(tmp_path: Path) -> None:
    config = tiny_config_dict(
        tmp_path / "runs",
        **{
            "data.name": "test_unlabelled_b",
            "data.options": {},
            "balancer.name": "test_recording_equal",
        },
    )
    SEEN_LOSS_KEYS.clear()
    c = build_components(load_config(config))
    head_b = [p.detach().clone() for p in c.model.task_parameters("b")]
    run = RunDirectory.create(tmp_path / "run", to_dict(c.config))
    Trainer(c, run, console=False).fit()
    assert SEEN_LOSS_KEYS and all(keys == ("a",) for keys in SEEN_LOSS_KEYS)
    for before, after in zip(head_b, c.model.task_parameters("b"), strict=True):
        assert torch.equal(before, after)
    record = run.read_metrics()[0]
    assert (
        math.isnan(record["train"]["loss"]["b"])
        if record["train"]["loss"]["b"] is not None
        else True
    )
    assert record["train"]["loss"]["a"] > 0


def test_label_fraction_trains_and_epoch_losses_average_labelled_samples(tmp_path: Path) -> None:
    config = tiny_config_dict(tmp_path / "runs", **{"data.options.label_fraction": 0.3})
    run, results = train(config, console=False)
    assert set(results["test"]["metrics"]) == {"left", "right"}
    assert all(math.isfinite(v) for v in run.read_metrics()[-1]["train"]["loss"].values())


def test_nan_loss_stops_with_task_and_step_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    config = load_config(tiny_config_dict(tmp_path / "runs", **{"train.epochs": 3}))
    c = build_components(config)
    calls = {"n": 0}
    left = c.tasks["left"]

    def poisoned(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        calls["n"] += 1
        loss = left.loss(pred, target, mask)
        # 8 training steps and 2 validation batches in epoch 1, then step 3 of epoch 2
        return loss * float("nan") if calls["n"] == 8 + 2 + 3 else loss

    c.tasks["left"] = Task(
        name="left", loss=poisoned, metrics=left.metrics, output_dim=left.output_dim
    )
    run = RunDirectory.create(tmp_path / "run", to_dict(c.config))
    with pytest.raises(TrainingDiverged) as info:
        Trainer(c, run, console=False).fit()
    message = str(info.value)
    assert "'left'" in message and "epoch 2, step 3" in message and "global step 11" in message
    assert "'right'" not in message
    state = load_checkpoint(run.last_checkpoint)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)  # the end of epoch 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not run.results_path.exists()


def test_mean_last_protocol_averages_the_last_n_test_evaluations(tmp_path: Path) -> None:
    config = tiny_config_dict(
        tmp_path / "runs",
        **{"train.epochs": 3, "train.selection": {"protocol": "mean_last", "last_n": 2}},
    )
    run, results = train(config, console=False)
    records = run.read_metrics()
    assert ["test" in r for r in records] == [False, True, True]
    for task, values in results["test"]["metrics"].items():
        for key, value in values.items():
            expected = sum(r["test"]["metrics"][task][key] for r in records[1:]) / 2
            assert value == pytest.approx(expected)
    assert results["selection"]["epochs"] == [1, 2]


def test_best_protocol_selects_on_validation_and_reports_that_epoch(tmp_path: Path) -> None:
    config = tiny_config_dict(
        tmp_path / "runs",
        **{"train.epochs": 3, "train.selection": {"protocol": "best", "metric": "left.accuracy"}},
    )
    run, results = train(config, console=False)
    records = run.read_metrics()
    best = max(records, key=lambda r: r["val"]["metrics"]["left"]["accuracy"])
    first_best = next(r for r in records if r["score"] == best["score"])
    assert results["selection"]["epoch"] == first_best["epoch"]
    assert results["val"]["metrics"]["left"]["accuracy"] == pytest.approx(best["score"])
    assert all("test" not in r for r in records)  # test is never looked at while training


def test_same_seed_same_results_and_other_seed_differs(tmp_path: Path) -> None:
    results = []
    for i, seed in enumerate([0, 0, 1]):
        config = tiny_config_dict(tmp_path / f"runs{i}", seed=seed)
        results.append(train(config, console=False)[1])
    assert results[0]["test"] == results[1]["test"]
    assert results[0]["test"]["losses"] != results[2]["test"]["losses"]


def test_bf16_autocast_on_cpu_trains(tmp_path: Path) -> None:
    config = tiny_config_dict(
        tmp_path / "runs", **{"train.precision": "bf16", "train.deterministic": False}
    )
    _, results = train(config, console=False)
    assert all(math.isfinite(v) for v in results["test"]["losses"].values())


def test_gradient_clipping_bounds_the_update(tmp_path: Path) -> None:
    """With SGD (no momentum) and clip c, every step moves the weights by at most lr * c."""
    config = load_config(
        tiny_config_dict(
            tmp_path / "runs",
            **{
                "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "grad_clip": 0.01},
                "train.epochs": 1,
            },
        )
    )
    c = build_components(config)
    before = torch.cat([p.detach().flatten().clone() for p in c.model.parameters()])
    steps = []

    def record(info: Any) -> None:
        steps.append(info.global_step)

    run = RunDirectory.create(tmp_path / "run", to_dict(c.config))
    Trainer(c, run, step_callbacks=[record], console=False).fit()
    after = torch.cat([p.detach().flatten() for p in c.model.parameters()])
    assert torch.linalg.vector_norm(after - before) <= 0.1 * 0.01 * len(steps) + 1e-6


@pytest.mark.parametrize("sampling", ["all", "round_robin", "proportional"])
def test_multi_input_mode_trains_with_each_sampling_strategy(tmp_path: Path, sampling: str) -> None:
    config = tiny_config_dict(
        tmp_path / "runs",
        **{"data.options.multi_input": True, "data.sampling": sampling, "train.epochs": 1},
    )
    run, results = train(config, console=False)
    assert set(results["test"]["metrics"]) == {"left", "right"}
    record = run.read_metrics()[0]
    assert all(math.isfinite(v) for v in record["train"]["loss"].values())


def test_results_json_is_complete(tmp_path: Path) -> None:
    run, results = train(tiny_config_dict(tmp_path / "runs"), console=False)
    on_disk = json.loads(run.results_path.read_text())
    assert on_disk["test"] == results["test"]
    assert on_disk["higher_is_better"] == {"left": {"accuracy": True}, "right": {"accuracy": True}}
    assert on_disk["parameters"]["shared"] > 0
    assert (run.path / "report.md").is_file() and (run.path / "plots" / "curves.png").is_file()


def test_balancer_context_scales_loss_only_with_a_scaler() -> None:
    ctx = BackwardContext(shared_parameters=[])
    loss = torch.tensor(2.0)
    assert ctx.scale(loss) is loss


def test_tensorboard_events_are_written_when_enabled(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the optional extra polytask[tensorboard]")
    run, _ = train(
        tiny_config_dict(tmp_path / "runs", **{"train.tensorboard": True}), console=False
    )
    events = list((run.path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
