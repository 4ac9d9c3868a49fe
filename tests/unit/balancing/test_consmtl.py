"""ConsMTL against the official algorithm written naively (scipy's least_squares for the
upper level's weights, the extra loss differentiated per task's head, torch's own
clip_grad_norm_), over several training steps; the clip is active and inactive; options,
the missing representation and the state round trip."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import least_squares
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation import ConsMTL, FairGrad
from polytask.balancing.base import BackwardContext, Balancer
from polytask.data.nyuv2_tasks import nyuv2_tasks
from polytask.errors import ConfigError
from polytask.losses import CrossEntropyLoss
from polytask.metrics.classification import Accuracy
from polytask.models import (
    ARCHITECTURES,
    BACKBONES,
    MultiTaskModel,
    capture_representation,
)
from polytask.models.backbones import MLP
from polytask.models.heads import mlp_head
from polytask.models.heads_dense import segnet_head
from polytask.models.sharing import HardSharing
from polytask.registry import call_with_options
from polytask.tasks import Task

NAMES = ["a", "b", "c"]
TASKS = {
    n: Task(name=n, loss=CrossEntropyLoss(), metrics={"accuracy": Accuracy}, output_dim=4)
    for n in NAMES
}


def build(options: dict[str, Any]) -> Balancer:
    balancer = call_with_options(
        BALANCERS.get("consmtl"), options, where="balancer.options", provided={"tasks": NAMES}
    )
    assert isinstance(balancer, Balancer)
    return balancer


def _model() -> HardSharing:
    torch.manual_seed(0)
    return HardSharing(
        tasks=TASKS,
        backbone=lambda: MLP(input_shape=(6,), hidden=(8, 5)),
        head=lambda t, f: mlp_head(t, f, hidden=4),
    ).double()


def _batch(step: int) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)
    return x, {t: torch.randint(0, 4, (7,), generator=g) for t in TASKS}


def _naive_step(
    model: HardSharing, x: Tensor, y: dict[str, Tensor], lam: float, clip: float
) -> None:
    """The official ``ConsMTL.get_weighted_loss`` (QM9 / CelebA form: every task reads the one
    shared representation), without its factor K and norm clip of the shared update."""
    shared = list(model.shared_parameters())
    z = model.encode(x)
    losses = [TASKS[t].compute_loss(model.decode(z, t), y[t]) for t in NAMES]
    deltas = [
        torch.autograd.grad(loss, z, retain_graph=True, create_graph=True)[0] for loss in losses
    ]
    rows = np.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            .detach()
            .numpy()
            for loss in losses
        ],
        axis=1,
    )
    a = rows.T @ rows
    res = least_squares(
        lambda w: a @ w - np.power(1 / w, 0.5),
        np.ones(3) / 3,
        bounds=(0, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
    )
    w = res.x
    combined = torch.from_numpy(rows @ w)
    offset = 0
    for p in shared:
        p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    delta = sum(float(w[i]) * deltas[i] for i in range(3)).detach()  # type: ignore[union-attr]
    for i, t in enumerate(NAMES):
        theta = list(model.task_parameters(t))
        extra = -lam * torch.dot(deltas[i].reshape(-1), delta.reshape(-1))
        g1 = torch.autograd.grad(losses[i], theta, retain_graph=True)
        g2 = torch.autograd.grad(extra, theta, retain_graph=True)
        norm1 = torch.norm(torch.cat([g.flatten() for g in g1]))
        for p, g in zip(theta, g2, strict=True):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(theta, clip * norm1)
        for p, g in zip(theta, g1, strict=True):
            p.grad += g  # type: ignore[operator]


def _grad(model: MultiTaskModel, name: str) -> Tensor:
    grad = dict(model.named_parameters())[name].grad
    assert grad is not None
    return grad


def _polytask_step(
    model: MultiTaskModel, balancer: Balancer, x: Tensor, y: dict[str, Tensor]
) -> dict[str, Tensor]:
    with capture_representation(model, balancer.needs_representation) as rep:
        out = model(x)
    losses = {t: TASKS[t].compute_loss(out[t], y[t]) for t in NAMES}
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    ctx = BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep)
    return balancer.backward(losses, ctx)


@pytest.mark.parametrize(("lam", "clip"), [(1.0, 0.1), (50.0, 0.1), (0.02, 100.0)])
def test_training_steps_match_the_naive_official_algorithm(lam: float, clip: float) -> None:
    ours, naive = _model(), _model()
    balancer = build({"lambda_": lam, "clip": clip})
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_naive = torch.optim.SGD(naive.parameters(), lr=0.1)
    plain = _model()  # FairGrad (alpha = 2) alone: the heads' gradients differ from it
    for step in range(3):
        x, y = _batch(step)
        opt_ours.zero_grad()
        opt_naive.zero_grad()
        _polytask_step(ours, balancer, x, y)
        _naive_step(naive, x, y, lam, clip)
        for (name, p), q in zip(ours.named_parameters(), naive.parameters(), strict=True):
            assert p.grad is not None and q.grad is not None, name
            err = float((p.grad - q.grad).abs().max() / q.grad.abs().max())
            assert err < 1e-6, (name, err)  # the engine keeps the rows in float32
        if step == 0:
            plain.load_state_dict(ours.state_dict())
            _polytask_step(plain, build({"lambda_": 0.0}), x, y)
            head = [n for n, _ in ours.named_parameters() if n.startswith("heads.")]
            gaps = [_grad(ours, n) - _grad(plain, n) for n in head]
            assert gaps
            assert (
                max(float(g.abs().max()) for g in gaps) > 1e-6
            )  # the lower level does change the heads' gradients
        opt_ours.step()
        opt_naive.step()


def test_the_extra_gradient_is_clipped_to_the_fraction_of_the_task_gradient() -> None:
    """With a huge lambda the extra term is clipped: each head's gradient then differs from its
    loss's gradient by exactly ``clip`` times that gradient's norm."""
    model = _model()
    x, y = _batch(0)
    _polytask_step(model, build({"lambda_": 1e6, "clip": 0.1}), x, y)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    model.zero_grad()
    _polytask_step(model, build({"lambda_": 0.0}), x, y)
    for t in NAMES:
        names = [n for n, _ in model.named_parameters() if n.startswith(f"heads.{t}.")]
        assert names
        params = dict(model.named_parameters())
        base = torch.cat([params[n].grad.reshape(-1) for n in names])  # type: ignore[union-attr]
        diff = torch.cat([got[n].reshape(-1) for n in names]) - base
        assert float(diff.norm()) == pytest.approx(0.1 * float(base.norm()), rel=1e-5)


def test_lambda_zero_is_fairgrad_with_alpha_two() -> None:
    model = _model()
    x, y = _batch(1)
    _polytask_step(model, build({"lambda_": 0.0}), x, y)
    got = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    _polytask_step(model, FairGrad(NAMES, alpha=2.0), x, y)
    for a, b in zip(got, model.parameters(), strict=True):
        assert torch.allclose(a, b.grad, rtol=1e-9, atol=1e-12)  # type: ignore[arg-type]


def test_options_are_validated_and_the_representation_is_required() -> None:
    with pytest.raises(ConfigError, match="lambda_"):
        build({"lambda_": -1.0})
    with pytest.raises(ConfigError, match="clip"):
        build({"clip": float("nan")})
    with pytest.raises(ConfigError, match="level"):
        build({"level": "feature"})
    with pytest.raises(ConfigError, match="cannot be wrapped"):
        BALANCERS.get("samo")(tasks=NAMES, method="consmtl")
    balancer = build({})
    assert balancer.needs_representation
    model = _model()
    x, y = _batch(0)
    out = model(x)
    losses = {t: TASKS[t].compute_loss(out[t], y[t]) for t in NAMES}
    ctx = BackwardContext(shared_parameters=list(model.shared_parameters()))
    with pytest.raises(ConfigError, match="representation"):
        balancer.backward(losses, ctx)


def test_state_round_trip() -> None:
    model = _model()
    balancer = build({})
    x, y = _batch(0)
    first = _polytask_step(model, balancer, x, y)
    state = balancer.get_extra_state()
    restored = ConsMTL(NAMES)
    restored.set_extra_state(state)
    assert restored.get_extra_state() == state
    assert set(state["weights"]) == set(NAMES)  # type: ignore[arg-type]
    assert [state["weights"][t] for t in NAMES] == pytest.approx([float(first[t]) for t in NAMES])  # type: ignore[index]


ARCHITECTURE_CASES: list[tuple[str, bool, dict[str, Any]]] = [
    ("hps", False, {}),
    ("mmoe", False, {"input_shape": (6,), "num_experts": 3}),
    ("ple", False, {"input_shape": (6,), "num_levels": 2}),
    ("mtan", True, {}),
    ("cross_stitch", True, {}),
]


def _architecture_step(
    arch: str, image: bool, options: dict[str, Any], balancer: Balancer
) -> tuple[dict[str, Tensor], set[str]]:
    """One step of ``balancer`` on a fresh ``arch``: the gradients of every parameter and the
    names of the shared ones."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if image:
        tasks = dict(nyuv2_tasks())
        segnet = BACKBONES.get("segnet")
        model = ARCHITECTURES.get(arch)(
            tasks=tasks,
            backbone=lambda: segnet(input_shape=(3, 32, 32), width=1 / 16),
            head=segnet_head,
            **options,
        )
        x = torch.rand(2, 3, 32, 32, generator=g)
        depth = torch.rand(2, 1, 32, 32, generator=g)
        y: dict[str, Tensor] = {
            "semantic": torch.randint(-1, 13, (2, 32, 32), generator=g),
            "depth": depth,
            "normal": F.normalize(torch.randn(2, 3, 32, 32, generator=g), dim=1),
        }
    else:
        tasks = dict(TASKS)
        mlp = BACKBONES.get("mlp")
        model = ARCHITECTURES.get(arch)(
            tasks=tasks,
            backbone=lambda: mlp(input_shape=(6,), hidden=(8,)),
            head=lambda t, f: mlp_head(t, f, hidden=4),
            **options,
        )
        x = torch.randn(10, 6, generator=g)
        y = {t: torch.randint(0, 4, (10,), generator=g) for t in tasks}
    with capture_representation(model, balancer.needs_representation) as rep:
        out = model(x)
    losses = {t: tasks[t].compute_loss(out[t], y[t]) for t in tasks}
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    ctx = BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep)
    balancer.backward(losses, ctx)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, {n for n, p in model.named_parameters() if any(p is s for s in shared)}


@pytest.mark.parametrize(("arch", "image", "options"), ARCHITECTURE_CASES)
def test_architectures_rows_from_the_representation_and_a_lower_level_on_task_parameters(
    arch: str, image: bool, options: dict[str, Any]
) -> None:
    """The rows taken through the marked representation are the engine's parameter rows
    (``lambda_ = 0`` is FairGrad with alpha = 2 run without a capture), and the lower level
    changes only the gradients of parameters outside the shared ones."""
    names = list(nyuv2_tasks()) if image else NAMES
    fair, shared_names = _architecture_step(arch, image, options, FairGrad(names, alpha=2.0))
    zero, _ = _architecture_step(arch, image, options, ConsMTL(names, lambda_=0.0))
    full, _ = _architecture_step(arch, image, options, ConsMTL(names, lambda_=1.0, clip=0.5))
    assert fair.keys() == zero.keys() == full.keys() and shared_names
    changed = []
    for n, g in fair.items():
        assert torch.allclose(zero[n], g, rtol=1e-4, atol=1e-7), n
        if n in shared_names:
            assert torch.allclose(full[n], g, rtol=1e-4, atol=1e-7), n
        elif not torch.allclose(full[n], g, rtol=1e-4, atol=1e-7):
            changed.append(n)
    assert changed  # some task's own parameters got the extra gradient


def test_a_loss_scaler_scales_every_gradient_by_its_scale() -> None:
    """Mixed precision: with a loss scale ``s`` every accumulated gradient is ``s`` times the
    unscaled one (the lower level's clip compares unscaled norms)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    grads = []
    for grad_scaler in (None, scaler):
        model = _model()
        x, y = _batch(2)
        with capture_representation(model, True) as rep:
            out = model(x)
        losses = {t: TASKS[t].compute_loss(out[t], y[t]) for t in NAMES}
        shared = list(model.shared_parameters())
        others = [p for p in model.parameters() if all(p is not s for s in shared)]
        ctx = BackwardContext(
            shared_parameters=shared,
            other_parameters=others,
            representation=rep,
            grad_scaler=grad_scaler,
        )
        build({"lambda_": 50.0}).backward(losses, ctx)
        grads.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
    for plain, scaled in zip(*grads, strict=True):
        assert torch.allclose(scaled, 1024.0 * plain, rtol=1e-6, atol=1e-9)
