"""Feature level in one backward pass: where an architecture gives every task its own copy of
each shared-representation point, the engine takes all K rows from one backward pass of
``sum_k L_k``. Checked against the K-pass path (one ``autograd.grad`` per task) on every
architecture that marks a representation, with a method whose weights depend on the rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.base import BackwardContext
from polytask.balancing.gradient import GradientBalancer
from polytask.data.nyuv2_tasks import nyuv2_tasks
from polytask.losses import CrossEntropyLoss
from polytask.metrics.classification import Accuracy
from polytask.models import ARCHITECTURES, BACKBONES, MultiTaskModel, capture_representation
from polytask.models.heads import linear_head
from polytask.models.heads_dense import segnet_head
from polytask.tasks import Task

VECTOR_TASKS = {
    name: Task(name=name, loss=CrossEntropyLoss(), metrics={"accuracy": Accuracy}, output_dim=dim)
    for name, dim in [("a", 3), ("b", 5), ("c", 4)]
}
IMAGE_TASKS = nyuv2_tasks()
IMAGE_SHAPE = (3, 32, 48)

#: (id, architecture, image input?, options)
CASES: list[tuple[str, str, bool, dict[str, Any]]] = [
    ("hps", "hps", False, {}),
    ("mmoe", "mmoe", False, {"input_shape": (6,), "num_experts": 3}),
    ("cgc", "ple", False, {"input_shape": (6,), "num_levels": 1}),
    ("ple3", "ple", False, {"input_shape": (6,), "num_levels": 3}),
    ("split", "split", True, {}),
    ("dense", "dense", True, {}),
    ("mtan", "mtan", True, {}),
    ("cross_stitch", "cross_stitch", True, {}),
    ("sluice", "sluice", True, {}),
]


def _build(arch: str, image: bool, options: dict[str, Any]) -> MultiTaskModel:
    torch.manual_seed(0)
    model: MultiTaskModel
    if image:
        segnet = BACKBONES.get("segnet")
        model = ARCHITECTURES.get(arch)(
            tasks=dict(IMAGE_TASKS),
            backbone=lambda: segnet(input_shape=IMAGE_SHAPE, width=1 / 16),
            head=segnet_head,
            **options,
        )
    else:
        mlp = BACKBONES.get("mlp")
        model = ARCHITECTURES.get(arch)(
            tasks=VECTOR_TASKS,
            backbone=lambda: mlp(input_shape=(6,), hidden=(8,)),
            head=linear_head,
            **options,
        )
    return model


def _losses(model: MultiTaskModel, image: bool) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    if image:
        _, h, w = IMAGE_SHAPE
        x = torch.rand(2, *IMAGE_SHAPE, generator=g)
        depth = torch.rand(2, 1, h, w, generator=g)
        depth[..., :3] = 0
        y: dict[str, Tensor] = {
            "semantic": torch.randint(-1, 13, (2, h, w), generator=g),
            "depth": depth,
            "normal": F.normalize(torch.randn(2, 3, h, w, generator=g), dim=1),
        }
        tasks = IMAGE_TASKS
    else:
        x = torch.randn(10, 6, generator=g)
        y = {
            t: torch.randint(0, VECTOR_TASKS[t].output_dim, (10,), generator=g)
            for t in VECTOR_TASKS
        }
        tasks = VECTOR_TASKS
    out = model(x)
    return {t: tasks[t].compute_loss(out[t], y[t]) for t in tasks}


def _count_grad_calls(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """Patch ``torch.autograd.grad`` to append to the returned list at every call."""
    calls: list[None] = []
    real: Callable[..., Any] = torch.autograd.grad

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


def _step(
    arch: str,
    image: bool,
    options: dict[str, Any],
    single_pass: bool,
    monkeypatch: pytest.MonkeyPatch,
    drop: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], int, Tensor]:
    model = _build(arch, image, options)
    with capture_representation(model) as rep:
        losses = _losses(model, image)
    if drop is not None:  # a task without labels in this batch
        del losses[drop]
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    balancer = BALANCERS.get("upgrad")(tasks=list(losses), level="feature")
    assert isinstance(balancer, GradientBalancer)
    balancer.feature_single_pass = single_pass
    calls = _count_grad_calls(monkeypatch)
    weights = balancer.backward(
        losses,
        BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep),
    )
    monkeypatch.undo()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, weights, len(calls), balancer.diagnostics()["gramian"]


@pytest.mark.parametrize(
    ("arch", "image", "options"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_one_backward_pass_gives_the_same_step_as_one_pass_per_task(
    arch: str, image: bool, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    one, w_one, calls_one, g_one = _step(arch, image, options, True, monkeypatch)
    per_task, w_per_task, calls_per_task, g_per_task = _step(
        arch, image, options, False, monkeypatch
    )
    assert (calls_one, calls_per_task) == (1, 3)
    assert one.keys() == per_task.keys()
    plain = _build(arch, image, options)
    sum(_losses(plain, image).values()).backward()  # type: ignore[union-attr]
    assert set(one) == {n for n, p in plain.named_parameters() if p.grad is not None}
    for name in one:
        # the same sums in another order: float32 rounding only
        torch.testing.assert_close(one[name], per_task[name], rtol=1e-4, atol=1e-7, msg=name)
    torch.testing.assert_close(
        torch.stack(list(w_one.values())), torch.stack(list(w_per_task.values()))
    )
    # the rows were really told apart: the Gramian the method saw is the K-pass one, and
    # not that of K equal rows
    assert not torch.allclose(g_one[0, 0], g_one[1, 1])
    torch.testing.assert_close(g_one, g_per_task, rtol=1e-4, atol=0.0)


def test_a_task_without_labels_leaves_its_row_out(monkeypatch: pytest.MonkeyPatch) -> None:
    one, w_one, calls, _ = _step("mtan", True, {}, True, monkeypatch, drop="depth")
    per_task, _, _, _ = _step("mtan", True, {}, False, monkeypatch, drop="depth")
    assert calls == 1 and set(w_one) == {"semantic", "normal"}
    for name in per_task:
        torch.testing.assert_close(one[name], per_task[name], rtol=1e-4, atol=1e-7, msg=name)
    assert set(one) == set(per_task)


def test_a_point_every_task_reads_falls_back_to_one_pass_per_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from polytask.models.sharing import HardSharing

    class SharedRead(HardSharing):  # marks its representation without naming the reader
        def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
            z = self.shared_representation(self.encode(x))
            return {name: self.decode(z, name) for name in self.task_names}

    mlp = BACKBONES.get("mlp")
    torch.manual_seed(0)
    model = SharedRead(
        tasks=VECTOR_TASKS, backbone=lambda: mlp(input_shape=(6,), hidden=(8,)), head=linear_head
    )
    with capture_representation(model) as rep:
        losses = _losses(model, False)
    assert rep is not None and not rep.points[0].per_task
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    balancer = BALANCERS.get("mgda")(tasks=list(losses), level="feature")
    calls = _count_grad_calls(monkeypatch)
    balancer.backward(
        losses,
        BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep),
    )
    assert len(calls) == 3


def test_marking_one_point_with_two_tensors_or_twice_for_a_task_is_an_error() -> None:
    from polytask.models.base import RepresentationCapture

    capture = RepresentationCapture()
    a, b = torch.ones(2, requires_grad=True) * 1, torch.ones(2, requires_grad=True) * 2
    capture.mark(a, "z", "t1")
    with pytest.raises(ValueError, match="two different tensors"):
        capture.mark(b, "z", "t2")
    with pytest.raises(ValueError, match="marked twice"):
        capture.mark(a, "z", "t1")
    capture.mark(a, "z", "t2")
    assert capture.names() == ["z"] and len(capture.leaves()) == 2
    assert capture.points[0].per_task
