"""NTKMTL against the official algorithm (n = 1) written naively: weights from the diagonal
of the Gramian, the combined gradient over several steps of a tiny network at both levels,
scale and order equivariance, zero gradients, the norm cap, options and the state round trip.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation import NTKMTL
from polytask.balancing.base import BackwardContext, Balancer
from polytask.errors import ConfigError
from polytask.losses import CrossEntropyLoss
from polytask.metrics.classification import Accuracy
from polytask.models import MultiTaskModel, capture_representation
from polytask.models.backbones import MLP
from polytask.models.heads import mlp_head
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
        BALANCERS.get("ntkmtl"), options, where="balancer.options", provided={"tasks": NAMES}
    )
    assert isinstance(balancer, Balancer)
    return balancer


def naive_update(rows: list[list[float]], exponent: float) -> tuple[list[float], list[float]]:
    """The official ``ntkgrad`` without the factor K, in plain Python floats."""
    squares = [sum(v * v for v in row) for row in rows]
    trace = sum(squares)
    weights = [(trace / s) ** exponent if s > 0 else 0.0 for s in squares]
    update = [
        sum(w * row[i] for w, row in zip(weights, rows, strict=True)) for i in range(len(rows[0]))
    ]
    return weights, update


def jacobian(seed: int, k: int = 3, n: int = 9) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 30.0, 0.02, 4.0][:k], dtype=torch.float64)[:, None]
    return torch.randn(k, n, generator=g, dtype=torch.float64) * scales


@pytest.mark.parametrize("exponent", [0.5, 0.75, 0.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_and_update_match_the_official_formula(exponent: float, seed: int) -> None:
    j = jacobian(seed)
    method = NTKMTL(NAMES, exponent=exponent)
    combined, weights = method.aggregate(j, NAMES)
    expected_w, expected_d = naive_update(j.tolist(), exponent)
    assert weights.tolist() == pytest.approx(expected_w, rel=1e-12)
    assert combined.tolist() == pytest.approx(expected_d, rel=1e-10, abs=1e-12)
    if exponent == 0.5:  # every weighted gradient has the norm sqrt(tr G)
        trace = float((j * j).sum())
        for w, row in zip(weights, j, strict=True):
            assert float((w * row).norm()) == pytest.approx(math.sqrt(trace), rel=1e-12)


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_scale_equivariant_and_order_equivariant(scale: float) -> None:
    j = jacobian(3, k=4)
    names = ["a", "b", "c", "d"]
    method = NTKMTL(names)
    d, w = method.aggregate(j, names)
    d_scaled, w_scaled = method.aggregate(j * scale, names)
    assert torch.allclose(w_scaled, w, rtol=1e-12)
    assert torch.allclose(d_scaled, d * scale, rtol=1e-10, atol=0)
    perm = [2, 0, 3, 1]
    d_perm, w_perm = method.aggregate(j[perm], [names[i] for i in perm])
    assert torch.allclose(w_perm, w[perm], rtol=1e-12)
    assert torch.allclose(d_perm, d, rtol=1e-10)


def test_a_zero_gradient_gets_weight_zero_and_all_zero_gives_zero() -> None:
    j = jacobian(4)
    j[1] = 0.0
    d, w = NTKMTL(NAMES).aggregate(j, NAMES)
    assert float(w[1]) == 0.0 and bool(torch.isfinite(d).all())
    expected_w, expected_d = naive_update(j.tolist(), 0.5)
    assert w.tolist() == pytest.approx(expected_w, rel=1e-12)
    assert d.tolist() == pytest.approx(expected_d, rel=1e-10)
    d0, w0 = NTKMTL(NAMES).aggregate(torch.zeros(3, 5, dtype=torch.float64), NAMES)
    assert float(d0.abs().max()) == 0.0 and float(w0.abs().max()) == 0.0


def test_max_norm_scales_the_update_down_only() -> None:
    j = jacobian(5)
    free, _ = NTKMTL(NAMES).aggregate(j, NAMES)
    capped, _ = NTKMTL(NAMES, max_norm=0.5).aggregate(j, NAMES)
    assert float(free.norm()) > 0.5
    assert float(capped.norm()) == pytest.approx(0.5, rel=1e-10)
    assert torch.allclose(capped, free * (0.5 / free.norm()), rtol=1e-10)
    loose, _ = NTKMTL(NAMES, max_norm=1e9).aggregate(j, NAMES)
    assert torch.equal(loose, free)


# -- trainer-level: several steps of a tiny network ---------------------------------------------


def _model() -> MultiTaskModel:
    torch.manual_seed(0)
    return HardSharing(
        tasks=TASKS,
        backbone=lambda: MLP(input_shape=(6,), hidden=(8, 5)),
        head=lambda t, f: mlp_head(t, f, hidden=4),
    ).double()


def _batch(step: int) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)
    return x, {t: torch.randint(0, 4, (7,), generator=g) for t in TASKS}


def _split(model: MultiTaskModel) -> tuple[list[Tensor], list[Tensor]]:
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    return shared, others


def _naive_step(model: MultiTaskModel, x: Tensor, y: dict[str, Tensor], level: str) -> None:
    """The official n = 1 algorithm: one gradient per task, ``w = (tr G / G_kk)^0.5``, the
    shared part gets ``sum_k w_k g_k``, every other parameter the gradient of ``sum_k L_k``."""
    shared, others = _split(model)
    with capture_representation(model, level == "feature") as rep:
        out = model(x)
    losses = [TASKS[t].compute_loss(out[t], y[t]) for t in NAMES]
    if level == "parameter":
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses
        ]
    else:
        assert rep is not None and len(rep.points) == 1
        point = rep.points[0]
        rows = [
            torch.autograd.grad(loss, point.leaves[t], retain_graph=True)[0].reshape(-1)
            for t, loss in zip(NAMES, losses, strict=True)
        ]
    _, update = naive_update([r.tolist() for r in rows], 0.5)
    combined = torch.tensor(update, dtype=torch.float64)
    head_grads = torch.autograd.grad(sum(losses), others, retain_graph=True, allow_unused=True)
    if level == "parameter":
        offset = 0
        for p in shared:
            p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
    else:
        original = rep.points[0].original  # type: ignore[union-attr]
        grads = torch.autograd.grad(original, shared, combined.view_as(original))
        for p, g in zip(shared, grads, strict=True):
            p.grad = g
    for p, g in zip(others, head_grads, strict=True):
        p.grad = None if g is None else g.clone()


def _polytask_step(
    model: MultiTaskModel, balancer: Balancer, x: Tensor, y: dict[str, Tensor]
) -> dict[str, Tensor]:
    with capture_representation(model, balancer.needs_representation) as rep:
        out = model(x)
    losses = {t: TASKS[t].compute_loss(out[t], y[t]) for t in NAMES}
    shared, others = _split(model)
    ctx = BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep)
    return balancer.backward(losses, ctx)


@pytest.mark.parametrize("level", ["parameter", "feature"])
def test_training_steps_match_the_naive_algorithm(level: str) -> None:
    ours, naive = _model(), _model()
    balancer = build({"level": level})
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_naive = torch.optim.SGD(naive.parameters(), lr=0.05)
    for step in range(4):
        x, y = _batch(step)
        opt_ours.zero_grad()
        opt_naive.zero_grad()
        weights = _polytask_step(ours, balancer, x, y)
        _naive_step(naive, x, y, level)
        assert set(weights) == set(NAMES) and all(float(w) >= 1.0 for w in weights.values())
        for (name, p), q in zip(ours.named_parameters(), naive.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                err = float((p.grad - q.grad).abs().max() / q.grad.abs().max())  # type: ignore[operator, union-attr]
                assert err < 1e-6, (name, err)  # the engine keeps the rows in float32
        opt_ours.step()
        opt_naive.step()


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="exponent"):
        build({"exponent": -0.5})
    with pytest.raises(ConfigError, match="exponent"):
        build({"exponent": "half"})
    with pytest.raises(ConfigError, match="max_norm"):
        build({"max_norm": -1.0})
    with pytest.raises(ConfigError, match="level"):
        build({"level": "layer"})
    with pytest.raises(ConfigError):
        build({"ntk_exp": 0.5})  # the official flag's name is not an option here


def test_state_round_trip() -> None:
    balancer = build({"exponent": 0.75, "max_norm": 2.0})
    assert balancer.get_extra_state() == {}
    restored = build({"exponent": 0.75, "max_norm": 2.0})
    restored.load_state_dict(balancer.state_dict())
    j = jacobian(6)
    assert isinstance(balancer, NTKMTL) and isinstance(restored, NTKMTL)
    assert torch.equal(balancer.aggregate(j, NAMES)[0], restored.aggregate(j, NAMES)[0])


# -- n > 1 samples per task: the batch in parts -------------------------------------------------


def _part_losses(
    model: MultiTaskModel, x: Tensor, y: dict[str, Tensor], n: int
) -> list[dict[str, Tensor]]:
    size = x.shape[0] // n
    parts = []
    for p in range(n):
        rows = slice(p * size, (p + 1) * size)
        out = model(x[rows])
        parts.append({t: TASKS[t].compute_loss(out[t], y[t][rows]) for t in NAMES})
    return parts


def _naive_parts_step(model: MultiTaskModel, x: Tensor, y: dict[str, Tensor], n: int) -> None:
    """The official n > 1 form: per-sample (here per-part) gradients, the largest eigenvalue
    of each task's n x n kernel, the shared part gets ``sum_k w_k mean_p g_kp``, every other
    parameter the mean over the parts of its gradient."""
    shared, others = _split(model)
    parts = _part_losses(model, x, y, n)
    grads = {
        (t, p): torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(parts[p][t], shared, retain_graph=True)]
        )
        for t in NAMES
        for p in range(n)
    }
    largest = []
    for t in NAMES:
        j = torch.stack([grads[(t, p)] for p in range(n)])
        largest.append(float(torch.linalg.eigvalsh(j @ j.T)[-1]))
    weights = [(sum(largest) / v) ** 0.5 for v in largest]
    combined = sum(
        w * sum(grads[(t, p)] for p in range(n)) / n for w, t in zip(weights, NAMES, strict=True)
    )
    assert isinstance(combined, Tensor)
    offset = 0
    for prm in shared:
        prm.grad = combined[offset : offset + prm.numel()].view_as(prm).clone()
        offset += prm.numel()
    head = [torch.zeros_like(q) for q in others]
    for p in range(n):
        for i, g in enumerate(
            torch.autograd.grad(sum(parts[p].values()), others, retain_graph=True)
        ):
            head[i] += g / n
    for q, g in zip(others, head, strict=True):
        q.grad = g


def _polytask_parts_step(
    model: MultiTaskModel, balancer: Balancer, x: Tensor, y: dict[str, Tensor], n: int
) -> None:
    parts = _part_losses(model, x, y, n)
    losses = {t: sum(part[t] for part in parts) / n for t in NAMES}
    shared, others = _split(model)
    ctx = BackwardContext(shared_parameters=shared, other_parameters=others, parts=parts)
    balancer.backward(losses, ctx)  # type: ignore[arg-type]


def test_samples_match_the_official_per_sample_form_over_steps() -> None:
    ours, naive = _model(), _model()
    balancer = build({"samples": 3})
    assert balancer.batch_parts == 3
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_naive = torch.optim.SGD(naive.parameters(), lr=0.05)
    for step in range(3):
        g = torch.Generator().manual_seed(200 + step)
        x = torch.randn(9, 6, generator=g, dtype=torch.float64)
        y = {t: torch.randint(0, 4, (9,), generator=g) for t in TASKS}
        opt_ours.zero_grad()
        opt_naive.zero_grad()
        _polytask_parts_step(ours, balancer, x, y, 3)
        _naive_parts_step(naive, x, y, 3)
        for (name, p), q in zip(ours.named_parameters(), naive.parameters(), strict=True):
            err = float((p.grad - q.grad).abs().max() / q.grad.abs().max())  # type: ignore[operator, union-attr]
            assert err < 1e-6, (name, err)  # the engine keeps the rows in float32
        opt_ours.step()
        opt_naive.step()


def test_identical_parts_give_the_one_sample_weights() -> None:
    """Two copies of one batch: each kernel is ``[[a, a], [a, a]]``, whose largest eigenvalue
    ``2a`` keeps the ratios of ``n = 1``."""
    model = _model()
    x, y = _batch(0)
    xx, yy = torch.cat([x, x]), {t: torch.cat([v, v]) for t, v in y.items()}
    parts = _part_losses(model, xx, yy, 2)
    shared, others = _split(model)
    ctx = BackwardContext(shared_parameters=shared, other_parameters=others, parts=parts)
    two = build({"samples": 2}).backward({t: (parts[0][t] + parts[1][t]) / 2 for t in NAMES}, ctx)
    model.zero_grad()
    one = _polytask_step(model, build({}), x, y)
    for t in NAMES:
        assert float(two[t]) == pytest.approx(float(one[t]), rel=1e-5)


def test_samples_options() -> None:
    with pytest.raises(ConfigError, match="samples"):
        build({"samples": 0})
    with pytest.raises(ConfigError, match="level=parameter"):
        build({"samples": 4, "level": "feature"})
    assert build({"samples": 1, "level": "feature"}).batch_parts == 1
