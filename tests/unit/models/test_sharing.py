"""Architectures: output shapes, the shared / task parameter partition, gradient isolation."""

from __future__ import annotations

import pytest
import torch

from polytask.losses import CrossEntropyLoss
from polytask.metrics.classification import Accuracy
from polytask.models import ARCHITECTURES, BACKBONES, MultiTaskModel, check_parameter_partition
from polytask.models.heads import linear_head
from polytask.tasks import Task

TASKS = {
    name: Task(name=name, loss=CrossEntropyLoss(), metrics={"accuracy": Accuracy}, output_dim=dim)
    for name, dim in [("a", 3), ("b", 5)]
}


def _build(arch: str) -> MultiTaskModel:
    torch.manual_seed(0)
    backbone = BACKBONES.get("small_cnn")
    model: MultiTaskModel = ARCHITECTURES.get(arch)(
        tasks=TASKS,
        backbone=lambda: backbone(input_shape=(1, 12, 12), channels=(4, 8), out_features=6),
        head=linear_head,
    )
    return model


@pytest.mark.parametrize("arch", ["hps", "single_task"])
def test_outputs_and_partition(arch: str) -> None:
    model = _build(arch)
    x = torch.randn(4, 1, 12, 12)
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (4, 3), "b": (4, 5)}
    assert set(model(x, task="b")) == {"b"}
    check_parameter_partition(model)


@pytest.mark.parametrize("arch", ["hps", "single_task"])
def test_a_tasks_own_parameters_get_gradient_only_from_its_loss(arch: str) -> None:
    model = _build(arch)
    x = torch.randn(4, 1, 12, 12)
    loss_a = model(x)["a"].square().mean()
    loss_a.backward()
    for p in model.task_parameters("b"):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert any(
        p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.task_parameters("a")
    )
    shared = list(model.shared_parameters())
    if arch == "hps":
        assert shared and all(p.grad is not None for p in shared)
    else:
        assert shared == []


def test_hps_overfits_one_batch() -> None:
    model = _build("hps")
    x = torch.randn(8, 1, 12, 12)
    targets = {"a": torch.randint(0, 3, (8,)), "b": torch.randint(0, 5, (8,))}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        out = model(x)
        loss = sum(TASKS[t].compute_loss(out[t], targets[t]) for t in TASKS)
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x)
    for t in TASKS:
        assert torch.equal(out[t].argmax(1), targets[t])
