"""The gradient engine against naive per-task gradients, at both levels, with loss scaling."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from polytask.balancing.base import BackwardContext
from polytask.balancing.gradient import GramianWeighting
from polytask.balancing.weighting.equal import Equal
from polytask.losses import CrossEntropyLoss
from polytask.metrics.classification import Accuracy
from polytask.models import MultiTaskModel, capture_representation
from polytask.models.backbones import MLP
from polytask.models.heads import mlp_head
from polytask.models.sharing import HardSharing
from polytask.tasks import Task

TASKS = {
    n: Task(name=n, loss=CrossEntropyLoss(), metrics={"accuracy": Accuracy}, output_dim=4)
    for n in ("a", "b", "c")
}


class Recorder(GramianWeighting):
    """Fixed weights; remembers the Gramian it was given."""

    def __init__(
        self, tasks: Sequence[str], level: str = "parameter", w: Sequence[float] = (1, 1, 1)
    ):
        super().__init__(tasks, level)  # type: ignore[arg-type]
        self.w = torch.tensor(w, dtype=torch.float64)
        self.seen: Tensor | None = None

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        self.seen = gramian
        return self.w.to(gramian.device)


def _model() -> MultiTaskModel:
    torch.manual_seed(0)
    return HardSharing(
        tasks=TASKS,
        backbone=lambda: MLP(input_shape=(6,), hidden=(16, 8)),
        head=lambda t, f: mlp_head(t, f, hidden=5),
    )


def _batch() -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=g)
    return x, {t: torch.randint(0, 4, (10,), generator=g) for t in TASKS}


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in model.named_parameters()
    }


def _run(
    balancer: object, level_feature: bool, scaler: torch.amp.GradScaler | None = None
) -> dict[str, Tensor]:
    model = _model()
    x, y = _batch()
    with capture_representation(model, level_feature) as rep:
        out = model(x)
    losses = {t: TASKS[t].compute_loss(out[t], y[t]) for t in TASKS}
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    ctx = BackwardContext(
        shared_parameters=shared, other_parameters=others, grad_scaler=scaler, representation=rep
    )
    balancer.backward(losses, ctx)  # type: ignore[attr-defined]
    return _grads(model)


def _naive(w: Sequence[float]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Per-task gradients by separate backward passes; the Gramians at both levels."""
    model = _model()
    x, y = _batch()
    z = model.encode(x)
    out = {t: model.decode(z, t) for t in TASKS}
    losses = [TASKS[t].compute_loss(out[t], y[t]) for t in TASKS]
    shared = list(model.shared_parameters())
    rows, feats = [], []
    for loss in losses:
        rows.append(
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        )
        feats.append(torch.autograd.grad(loss, z, retain_graph=True)[0].flatten())
    j = torch.stack(rows).double()
    jf = torch.stack(feats).double()
    total = sum(wi * li for wi, li in zip(w, losses, strict=True))
    assert isinstance(total, Tensor)
    total.backward()
    return _grads(model), j @ j.T, jf @ jf.T


@pytest.mark.parametrize("feature", [False, True], ids=["parameter", "feature"])
def test_fixed_weights_equal_the_weighted_loss_gradient_at_both_levels(feature: bool) -> None:
    w = (0.5, 2.0, 1.0)
    got = _run(Recorder(list(TASKS), "feature" if feature else "parameter", w), feature)
    expected, _, _ = _naive(w)
    # the trunk gets sum_k w_k g_k; each task's own head gets its own loss's gradient, unweighted
    unweighted = _naive((1.0, 1.0, 1.0))[0]
    for name in got:
        if name.startswith("heads."):
            expected[name] = unweighted[name]
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("feature", [False, True], ids=["parameter", "feature"])
def test_equal_weighting_is_identical_at_both_levels_and_as_a_loss_weighting(feature: bool) -> None:
    gradient_level = _run(Recorder(list(TASKS), "feature" if feature else "parameter"), feature)
    loss_level = _run(Equal(list(TASKS)), False)
    for name in loss_level:
        torch.testing.assert_close(gradient_level[name], loss_level[name], rtol=1e-5, atol=1e-6)


def test_the_method_sees_the_gramian_of_per_task_gradients() -> None:
    _, gram_params, gram_features = _naive((1, 1, 1))
    for level, expected in (("parameter", gram_params), ("feature", gram_features)):
        rec = Recorder(list(TASKS), level)
        _run(rec, level == "feature")
        assert rec.seen is not None
        torch.testing.assert_close(rec.seen, expected, rtol=1e-5, atol=1e-8)


def test_loss_scaling_is_undone_before_the_method_and_redone_for_the_optimizer() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    rec = Recorder(list(TASKS))
    scaled = _run(rec, False, scaler)
    assert rec.seen is not None
    _, gram, _ = _naive((1, 1, 1))
    torch.testing.assert_close(rec.seen, gram, rtol=1e-5, atol=1e-8)  # unscaled
    plain = _run(Recorder(list(TASKS)), False)
    for name in plain:
        torch.testing.assert_close(scaled[name], plain[name] * 1024.0, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("feature", [False, True], ids=["parameter", "feature"])
def test_every_step_sees_its_own_gramian(feature: bool) -> None:
    """The Jacobian buffer is reused from step to step; the Gramian must not be."""
    balancer = Recorder(list(TASKS), "feature" if feature else "parameter")
    model = _model()
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(10, 6, generator=g)
        y = {t: torch.randint(0, 4, (10,), generator=g) for t in TASKS}
        model.zero_grad()
        with capture_representation(model, feature) as rep:
            out = model(x)
        losses = {t: TASKS[t].compute_loss(out[t], y[t]) for t in TASKS}
        if feature:
            z = model.encode(x)
            rows = [
                torch.autograd.grad(losses_t, z)[0]
                for losses_t in (TASKS[t].compute_loss(model.decode(z, t), y[t]) for t in TASKS)
            ]
        else:
            rows = [
                torch.cat(
                    [
                        gr.flatten()
                        for gr in torch.autograd.grad(losses[t], shared, retain_graph=True)
                    ]
                )
                for t in TASKS
            ]
        j = torch.stack([r.flatten() for r in rows]).double()
        ctx = BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep)
        balancer.backward(losses, ctx)
        assert balancer.seen is not None
        torch.testing.assert_close(balancer.seen, j @ j.T, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(
            balancer.diagnostics()["gramian"], (j @ j.T).float(), rtol=1e-5, atol=1e-7
        )
