"""MoCo and CR-MOGM against naive float64 implementations of their papers' updates, closed
forms, the exact simplex projection, scale equivariance, missing tasks, checkpoint round trips
and the bit-for-bit resume of a tiny training run.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation import CRMOGM, MGDA, MoCo
from polytask.balancing.aggregation.moco import project_to_simplex
from polytask.balancing.base import BackwardContext, Balancer
from polytask.balancing.gradient import GradientBalancer
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


def build(name: str, options: dict[str, Any], tasks: Sequence[str] = NAMES) -> Balancer:
    balancer = call_with_options(
        BALANCERS.get(name), options, where="balancer.options", provided={"tasks": list(tasks)}
    )
    assert isinstance(balancer, Balancer)
    return balancer


def jacobians(steps: int, k: int = 3, n: int = 7, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 10.0, 0.1][:k], dtype=torch.float64)[:, None]
    return [torch.randn(k, n, generator=g, dtype=torch.float64) * scales for _ in range(steps)]


# -- naive references --------------------------------------------------------------------------


def bisection_projection(v: list[float], mass: float = 1.0) -> list[float]:
    """The simplex projection by bisection on tau in sum(max(v - tau, 0)) = mass."""
    lo, hi = min(v) - mass, max(v)
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(max(x - mid, 0.0) for x in v) > mass:
            lo = mid
        else:
            hi = mid
    tau = (lo + hi) / 2
    return [max(x - tau, 0.0) for x in v]


def naive_moco(
    rows: Sequence[Tensor],
    beta: float,
    beta_sigma: float,
    gamma: float,
    gamma_sigma: float,
    rho: float,
) -> list[tuple[list[float], list[float]]]:
    """Algorithm 1 of the paper, element by element in Python floats."""
    k, n = rows[0].shape
    y = [[0.0] * n for _ in range(k)]
    lam = [1.0 / k] * k
    out = []
    for t, j in enumerate(rows, start=1):
        b = beta / t**beta_sigma
        c = gamma / t**gamma_sigma
        y = [[y[i][e] - b * (y[i][e] - float(j[i, e])) for e in range(n)] for i in range(k)]
        yyt = [[sum(y[i][e] * y[m][e] for e in range(n)) for m in range(k)] for i in range(k)]
        grad = [sum(yyt[i][m] * lam[m] for m in range(k)) + rho * lam[i] for i in range(k)]
        lam = bisection_projection([lam[i] - c * grad[i] for i in range(k)])
        d = [sum(lam[i] * y[i][e] for i in range(k)) for e in range(n)]
        out.append((d, lam))
    return out


# -- the simplex projection --------------------------------------------------------------------


@pytest.mark.parametrize("mass", [1.0, 0.3, 5.0])
def test_simplex_projection_is_exact_and_satisfies_its_optimality_conditions(mass: float) -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        v = torch.randn(6, generator=g, dtype=torch.float64) * 3
        p = project_to_simplex(v, mass)
        expected = torch.tensor(bisection_projection(v.tolist(), mass), dtype=torch.float64)
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-12)
        assert float(p.min()) >= 0 and float(p.sum()) == pytest.approx(mass, rel=1e-14)
        # KKT: v - p = tau on the support, <= tau off it
        tau = (v - p)[p > 0]
        assert float(tau.max() - tau.min()) < 1e-12
        assert bool(((v - p)[p == 0] <= tau.min() + 1e-12).all())
    assert project_to_simplex(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)).tolist() == [
        0.2,
        0.3,
        0.5,
    ]
    assert project_to_simplex(torch.tensor([1.0, 2.0]), 0.0).tolist() == [0.0, 0.0]


# -- MoCo ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("beta", "beta_sigma", "gamma", "gamma_sigma", "rho"),
    [(0.5, 0.5, 0.1, 0.5, 0.0), (0.9, 0.0, 0.01, 0.0, 0.5), (1.0, 0.0, 0.002, 0.3, 10.0)],
)
def test_moco_follows_the_naive_algorithm(
    beta: float, beta_sigma: float, gamma: float, gamma_sigma: float, rho: float
) -> None:
    rows = jacobians(6)
    expected = naive_moco(rows, beta, beta_sigma, gamma, gamma_sigma, rho)
    options: dict[str, Any] = {
        "beta": beta,
        "beta_sigma": beta_sigma,
        "gamma": gamma,
        "gamma_sigma": gamma_sigma,
        "rho": rho,
    }
    method = MoCo(NAMES, **options)
    moved = False
    for j, (d, lam) in zip(rows, expected, strict=True):
        combined, weights = method.aggregate(j.clone(), NAMES)
        torch.testing.assert_close(
            weights, torch.tensor(lam, dtype=torch.float64), rtol=0, atol=1e-11
        )
        torch.testing.assert_close(
            combined, torch.tensor(d, dtype=torch.float64), rtol=1e-9, atol=1e-9
        )
        moved = moved or max(abs(x - 1 / 3) for x in lam) > 1e-3
    assert moved  # the weights left the centre of the simplex
    method32 = MoCo(NAMES, **options)
    for j, (d, _) in zip(rows, expected, strict=True):
        combined, _ = method32.aggregate(j.float(), NAMES)
        torch.testing.assert_close(
            combined.double(), torch.tensor(d, dtype=torch.float64), rtol=1e-4, atol=1e-5
        )


def test_moco_closed_forms() -> None:
    rows = jacobians(3)
    # gamma = 0: the weights stay 1/K; beta = 1, beta_sigma = 0: Y is this step's rows
    method = MoCo(NAMES, beta=1.0, beta_sigma=0.0, gamma=0.0)
    for j in rows:
        combined, weights = method.aggregate(j, NAMES)
        assert weights.tolist() == [1 / 3] * 3
        torch.testing.assert_close(combined, j.mean(dim=0), rtol=1e-14, atol=1e-15)
    # one step from Y = 0 with beta = 1: lambda = Pi(1/K - gamma (G + rho I) 1/K)
    j = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    method = MoCo(["a", "b"], beta=1.0, gamma=0.1, rho=1.0)
    combined, weights = method.aggregate(j, ["a", "b"])
    # 0.5 - 0.1 * (1 + 1) * 0.5 = 0.4, 0.5 - 0.1 * (4 + 1) * 0.5 = 0.25; shift by +0.175
    torch.testing.assert_close(weights, torch.tensor([0.575, 0.425], dtype=torch.float64))
    torch.testing.assert_close(combined, torch.tensor([0.575, 0.85], dtype=torch.float64))


def test_moco_is_scale_equivariant_with_matching_step_sizes() -> None:
    """J -> cJ scales Y by c and Y Y^T by c^2: gamma / c^2 and rho c^2 keep lambda."""
    rows = jacobians(5)
    for c in (1e-6, 1e6):
        plain = MoCo(NAMES, gamma=0.05, rho=0.2)
        scaled = MoCo(NAMES, gamma=0.05 / c**2, rho=0.2 * c**2)
        for j in rows:
            d1, w1 = plain.aggregate(j, NAMES)
            d2, w2 = scaled.aggregate(j * c, NAMES)
            torch.testing.assert_close(w2, w1, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(d2, d1 * c, rtol=1e-10, atol=0)


def test_moco_missing_tasks_keep_their_row_and_weight() -> None:
    method = MoCo(NAMES, gamma=0.05)
    rows = jacobians(3)
    method.aggregate(rows[0], NAMES)
    assert method.tracked is not None
    before_row = method.tracked[1].clone()
    before = method.lambdas.clone()
    combined, weights = method.aggregate(rows[1][[0, 2]], ["a", "c"])
    assert torch.equal(method.tracked[1], before_row)
    assert float(method.lambdas[1]) == float(before[1])
    assert float(weights.sum()) == pytest.approx(float(before[0] + before[2]), rel=1e-14)
    torch.testing.assert_close(combined, weights @ method.tracked[[0, 2]])


def test_moco_feature_level_tracks_the_gramian() -> None:
    rows = jacobians(4)
    method = MoCo(NAMES, level="feature", gamma=0.01)
    h = torch.zeros(3, 3, dtype=torch.float64)
    lam = torch.full((3,), 1 / 3, dtype=torch.float64)
    for t, j in enumerate(rows, start=1):
        b, c = 0.5 / t**0.5, 0.01 / t**0.5
        h = h - b * (h - j @ j.T)
        lam = torch.tensor(
            bisection_projection((lam - c * (h @ lam)).tolist()), dtype=torch.float64
        )
        combined, weights = method.aggregate(j, NAMES)
        torch.testing.assert_close(weights, lam, rtol=0, atol=1e-12)
        torch.testing.assert_close(combined, lam @ j, rtol=1e-12, atol=1e-12)


def test_moco_loss_normalization_tracks_loss_scaled_unit_gradients() -> None:
    rows = jacobians(1)[0]
    losses = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    method = MoCo(NAMES, beta=1.0, gamma=0.0, normalization="loss")
    method._losses = losses
    combined, _ = method.aggregate(rows, NAMES)
    unit = rows / rows.norm(dim=1, keepdim=True) * losses[:, None]
    torch.testing.assert_close(combined, unit.mean(dim=0), rtol=1e-13, atol=1e-15)


# -- CR-MOGM -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "options"),
    [("mgda", {}), ("upgrad", {}), ("cagrad", {"c": 0.4}), ("imtl_g", {})],
)
def test_cr_mogm_with_beta_0_is_its_base(base: str, options: dict[str, Any]) -> None:
    wrapped = build("cr_mogm", {"base": base, "base_options": options, "beta": 0.0})
    plain = build(base, options)
    assert isinstance(wrapped, GradientBalancer) and isinstance(plain, GradientBalancer)
    for j in jacobians(4):
        d1, w1 = wrapped.aggregate(j, NAMES)
        d2, w2 = plain.aggregate(j, NAMES)
        assert torch.equal(w1, w2) and torch.equal(d1, d2)


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_cr_mogm_is_the_moving_average_of_its_bases_weights(beta: float) -> None:
    wrapped = CRMOGM(NAMES, base="mgda", beta=beta)
    plain = MGDA(NAMES)
    average: Tensor | None = None
    for j in jacobians(6):
        base_weights = plain.weights_from_gramian(j @ j.T)
        average = base_weights if average is None else beta * average + (1 - beta) * base_weights
        combined, weights = wrapped.aggregate(j, NAMES)
        torch.testing.assert_close(weights, average, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(combined, average @ j, rtol=1e-12, atol=1e-12)


def test_cr_mogm_missing_task_starts_late_and_keeps_its_average() -> None:
    wrapped = CRMOGM(NAMES, base="mgda", beta=0.5)
    rows = jacobians(3)
    first = MGDA(["a", "c"]).weights_from_gramian(rows[0][[0, 2]] @ rows[0][[0, 2]].T)
    wrapped.aggregate(rows[0][[0, 2]], ["a", "c"])
    assert math.isnan(float(wrapped.average[1]))
    _, w = wrapped.aggregate(rows[1], NAMES)
    full = MGDA(NAMES).weights_from_gramian(rows[1] @ rows[1].T)
    torch.testing.assert_close(w[1], full[1])  # b's average starts here
    torch.testing.assert_close(w[[0, 2]], 0.5 * first + 0.5 * full[[0, 2]])


def test_cr_mogm_with_beta_0_trains_as_its_base_with_learnable_parameters() -> None:
    """IMTL's learnable scales live in the base; beta = 0 gives the same run bit for bit."""
    results = []
    for name, options in (("imtl", {}), ("cr_mogm", {"base": "imtl", "beta": 0.0})):
        model = _model()
        method = build(name, options)
        params = list(model.parameters()) + list(method.parameters())
        assert len(list(method.parameters())) == 3
        opt = torch.optim.SGD(params, lr=0.05)
        for step in range(3):
            x, y = _batch(torch.Generator().manual_seed(step))
            opt.zero_grad()
            _step(model, method, x, y)
            opt.step()
            method.after_optimizer_step(None)
        results.append(
            torch.cat([_params(model), *(p.detach().flatten() for p in method.parameters())])
        )
    assert torch.equal(results[0], results[1])


def test_cr_mogm_runs_its_bases_backward_preparations() -> None:
    """MGDA's loss normalisation needs the losses its backward captures."""
    results = []
    for name, options in (
        ("mgda", {"normalization": "loss+"}),
        ("cr_mogm", {"base": "mgda", "base_options": {"normalization": "loss+"}, "beta": 0.0}),
    ):
        model = _model()
        method = build(name, options)
        g = torch.Generator().manual_seed(5)
        x, y = _batch(g)
        _step(model, method, x, y)
        results.append(torch.cat([p.grad.flatten() for p in model.parameters()]))  # type: ignore[union-attr]
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("moco", "beta", 0.0),
        ("moco", "beta", 1.5),
        ("moco", "beta_sigma", -1.0),
        ("moco", "gamma", -0.1),
        ("moco", "gamma_sigma", math.nan),
        ("moco", "rho", -1.0),
        ("moco", "normalization", "l2"),
        ("cr_mogm", "beta", 1.0),
        ("cr_mogm", "base", "mdga"),
        ("cr_mogm", "base", "db_mtl"),
        ("cr_mogm", "base_options", {"normalisation": "l2"}),
    ],
)
def test_bad_options_name_the_key(name: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"balancer\.options\.{key}"):
        build(name, {key: value})


# -- state: checkpoints and the bit-for-bit resume of a tiny run -------------------------------


def _model() -> MultiTaskModel:
    torch.manual_seed(0)
    return HardSharing(
        tasks=TASKS,
        backbone=lambda: MLP(input_shape=(6,), hidden=(16, 8)),
        head=lambda t, f: mlp_head(t, f, hidden=5),
    )


def _batch(g: torch.Generator, size: int = 10) -> tuple[Tensor, dict[str, Tensor]]:
    x = torch.randn(size, 6, generator=g)
    return x, {t: torch.randint(0, 4, (size,), generator=g) for t in TASKS}


def _step(model: MultiTaskModel, balancer: Balancer, x: Tensor, y: dict[str, Tensor]) -> None:
    feature = bool(getattr(balancer, "needs_representation", False))
    with capture_representation(model, feature) as rep:
        out = model(x)
    losses = {t: TASKS[t].compute_loss(out[t], y[t]) for t in TASKS}
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    ctx = BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep)
    balancer.backward(losses, ctx)


def _train(balancer: Balancer, steps: range, model: MultiTaskModel, opt: Any, save: Any) -> None:
    for step in steps:
        x, y = _batch(torch.Generator().manual_seed(100 + step))
        opt.zero_grad()
        _step(model, balancer, x, y)
        opt.step()
        if save is not None:
            save(step)


def _params(model: MultiTaskModel) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


STATEFUL = [
    ("moco", {"level": "parameter", "gamma": 0.5}),
    ("moco", {"level": "feature", "gamma": 0.5, "normalization": "loss"}),
    ("cr_mogm", {"base": "mgda", "beta": 0.8}),
    ("cr_mogm", {"level": "feature", "base": "nash_mtl", "beta": 0.5}),
]


@pytest.mark.parametrize(("name", "options"), STATEFUL, ids=lambda v: str(v))
def test_resuming_a_tiny_run_from_a_checkpoint_is_bit_for_bit(
    name: str, options: dict[str, Any]
) -> None:
    model = _model()
    balancer = build(name, options)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    saved: dict[str, bytes] = {}

    def checkpoint(step: int) -> None:
        if step == 4:
            buffer = io.BytesIO()
            state = {"model": model.state_dict(), "optim": opt.state_dict()}
            torch.save({**state, "balancer": balancer.state_dict()}, buffer)
            saved["state"] = buffer.getvalue()

    _train(balancer, range(9), model, opt, checkpoint)
    state = torch.load(io.BytesIO(saved["state"]), weights_only=True)
    results = []
    for restore in (True, False):
        resumed_model = _model()
        resumed_model.load_state_dict(state["model"])
        resumed_opt = torch.optim.Adam(resumed_model.parameters(), lr=1e-2)
        resumed_opt.load_state_dict(state["optim"])
        resumed = build(name, options)
        if restore:
            resumed.load_state_dict(state["balancer"])
        _train(resumed, range(5, 9), resumed_model, resumed_opt, None)
        results.append(_params(resumed_model))
    assert torch.equal(results[0], _params(model))
    assert not torch.equal(results[1], _params(model))  # the state matters


def test_moco_state_of_another_shape_is_refused() -> None:
    method = MoCo(NAMES)
    method.aggregate(jacobians(1)[0], NAMES)
    state = method.state_dict()
    with pytest.raises(ValueError, match="balancer state 'tracked'"):
        MoCo(NAMES, level="feature").load_state_dict(state)
    with pytest.raises(ValueError, match="balancer state 'lambdas'"):
        MoCo(["a", "b"]).load_state_dict(state)
    restored = MoCo(NAMES)
    restored.load_state_dict(state)
    with pytest.raises(ValueError, match="shared parameters changed"):
        restored.aggregate(torch.zeros(3, 4), NAMES)


@pytest.mark.parametrize("beta", [0.0, 0.6])
def test_cr_mogm_agrees_with_torchjd(beta: float) -> None:
    torchjd = pytest.importorskip("torchjd.aggregation")
    oracle = torchjd.CRMOGMWeighting(torchjd.IMTLGWeighting(), alpha=beta)
    ours = CRMOGM(NAMES, base="imtl_g", beta=beta)
    for j in jacobians(5):
        expected = oracle(j @ j.T)
        _, weights = ours.aggregate(j, NAMES)
        torch.testing.assert_close(weights, expected.double(), rtol=1e-9, atol=1e-12)
