"""DB-MTL, STCH, ExcessMTL, loss scaling by gradient magnitude and fixed weights against
naive float64 implementations of their papers' updates, closed forms on tiny cases, their
invariances, checkpoint round trips and the bit-for-bit resume of a tiny training run.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation import DBMTL, ExcessMTL, GradNormScaling
from polytask.balancing.base import BackwardContext, Balancer
from polytask.balancing.weighting import STCH, FixedWeights
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


# -- naive float64 references ---------------------------------------------------------------


def naive_db_mtl(rows: Sequence[Tensor], beta: float, sigma: float) -> list[Tensor]:
    """The official update: ema = beta_t ema + (1 - beta_t) g; sum of emas scaled to the max."""
    ema = torch.zeros_like(rows[0])
    out = []
    for t, g in enumerate(rows, start=1):
        beta_t = beta / t**sigma
        ema = beta_t * ema + (1 - beta_t) * g
        norms = [math.sqrt(float((e * e).sum())) for e in ema]
        top = max(norms)
        out.append(sum((top / n) * e for n, e in zip(norms, ema, strict=True)))
    return out


def naive_excess(rows: Sequence[Tensor], eta: float, eps: float) -> list[tuple[Tensor, Tensor]]:
    """Algorithm 1 as the official code runs it, element by element."""
    k, n = rows[0].shape
    squares = [[0.0] * n for _ in range(k)]
    weights = [1.0] * k
    initial: list[float] | None = None
    out = []
    for j in rows:
        risks = []
        for i in range(k):
            r = 0.0
            for c in range(n):
                g = float(j[i, c])
                squares[i][c] += g * g
                root = math.sqrt(squares[i][c] + eps)
                r += g * g / root if root > 0 else 0.0
            risks.append(r)
        if initial is None:
            initial = risks
        else:
            weights = [
                w * math.exp(eta * r / r0) for w, r, r0 in zip(weights, risks, initial, strict=True)
            ]
            total = sum(weights)
            weights = [k * w / total for w in weights]
        w = torch.tensor(weights, dtype=torch.float64)
        out.append((w @ j, w))
    return out


# -- DB-MTL ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("beta", "sigma"), [(0.9, 0.0), (0.5, 0.5), (0.0, 0.0)])
def test_db_mtl_follows_the_naive_update_over_steps(beta: float, sigma: float) -> None:
    method = DBMTL(NAMES, beta=beta, beta_sigma=sigma)
    rows = jacobians(6)
    for got_in, expected in zip(rows, naive_db_mtl(rows, beta, sigma), strict=True):
        combined, _ = method.aggregate(got_in.clone(), NAMES)
        torch.testing.assert_close(combined, expected, rtol=1e-12, atol=0)
    # float32 rows, as the engine gives them
    method32 = DBMTL(NAMES, beta=beta, beta_sigma=sigma)
    for got_in, expected in zip(rows, naive_db_mtl(rows, beta, sigma), strict=True):
        combined, _ = method32.aggregate(got_in.float(), NAMES)
        torch.testing.assert_close(combined.double(), expected, rtol=1e-5, atol=1e-6)


def test_db_mtl_closed_form_and_scale_equivariance() -> None:
    method = DBMTL(["a", "b"], beta=0.0)
    combined, alpha = method.aggregate(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), ["a", "b"])
    assert combined.tolist() == [3.0, 3.0] and alpha.tolist() == [1.0, 3.0]
    rows = jacobians(4)
    plain, scaled = DBMTL(NAMES), DBMTL(NAMES)
    for j in rows:
        torch.testing.assert_close(
            scaled.aggregate(j * 1e6, NAMES)[0],
            plain.aggregate(j, NAMES)[0] * 1e6,
            rtol=1e-12,
            atol=0,
        )


def test_db_mtl_zero_average_gets_no_weight() -> None:
    method = DBMTL(["a", "b"], beta=0.0)
    combined, alpha = method.aggregate(torch.tensor([[0.0, 0.0], [0.0, 2.0]]), ["a", "b"])
    assert alpha.tolist() == [0.0, 1.0] and combined.tolist() == [0.0, 2.0]


def test_db_mtl_missing_tasks_keep_their_average_and_step_count() -> None:
    method = DBMTL(NAMES, beta=0.5, beta_sigma=0.5)
    rows = jacobians(3)
    method.aggregate(rows[0], NAMES)
    method.aggregate(rows[1][[0, 2]], ["a", "c"])
    assert method.steps.tolist() == [2, 1, 2]
    assert method.average is not None
    torch.testing.assert_close(method.average[1], 0.5 * rows[0][1])


# -- ExcessMTL ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("eta", "eps"), [(0.01, 1e-7), (0.5, 0.0), (2.0, 1e-3)])
def test_excess_mtl_follows_the_naive_algorithm(eta: float, eps: float) -> None:
    rows = jacobians(6)
    method = ExcessMTL(NAMES, eta=eta, eps=eps)
    for j, (expected, w) in zip(rows, naive_excess(rows, eta, eps), strict=True):
        combined, weights = method.aggregate(j.clone(), NAMES)
        torch.testing.assert_close(weights, w, rtol=1e-12, atol=0)
        torch.testing.assert_close(combined, expected, rtol=1e-12, atol=1e-300)
    assert float(method.task_weights.sum()) == pytest.approx(3.0, rel=1e-12)


def test_excess_mtl_closed_form() -> None:
    """With eps = 0 the first estimate is ||g||_1; a repeated gradient gives ||g||_1 / sqrt 2."""
    eta = 0.3
    method = ExcessMTL(["a", "b"], eta=eta, eps=0.0)
    g = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64)
    method.aggregate(g, ["a", "b"])
    torch.testing.assert_close(method.initial, torch.tensor([3.0, 4.5], dtype=torch.float64))
    # task a repeats its gradient (ratio 1/sqrt 2), task b's is zero (ratio 0)
    _, w = method.aggregate(
        torch.tensor([[1.0, -2.0], [0.0, 0.0]], dtype=torch.float64), ["a", "b"]
    )
    expected = 2 * torch.softmax(torch.tensor([eta / math.sqrt(2), 0.0], dtype=torch.float64), 0)
    torch.testing.assert_close(w, expected, rtol=1e-14, atol=0)


def test_excess_mtl_weights_are_invariant_to_each_tasks_gradient_scale_with_eps_0() -> None:
    rows = jacobians(5)
    c = torch.tensor([1e-4, 1.0, 1e5], dtype=torch.float64)[:, None]
    plain, scaled = ExcessMTL(NAMES, eta=0.5, eps=0.0), ExcessMTL(NAMES, eta=0.5, eps=0.0)
    for j in rows:
        _, w1 = plain.aggregate(j, NAMES)
        d2, w2 = scaled.aggregate(j * c, NAMES)
        torch.testing.assert_close(w2, w1, rtol=1e-12, atol=0)
        torch.testing.assert_close(d2, w1 @ (j * c), rtol=1e-12, atol=0)


def test_excess_mtl_zero_first_gradient_defers_the_normaliser() -> None:
    method = ExcessMTL(["a", "b"], eta=1.0, eps=0.0)
    method.aggregate(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), ["a", "b"])
    assert math.isnan(float(method.initial[1]))
    _, w = method.aggregate(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), ["a", "b"])
    assert float(method.initial[1]) == 3.0
    expected = 2 * torch.softmax(torch.tensor([1 / math.sqrt(2), 0.0], dtype=torch.float64), 0)
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_excess_mtl_risks_over_column_blocks_and_missing_tasks_against_the_formula(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """r_k = sum_i g_ki^2 / sqrt(S_ki + eps), S_ki the running sum of g_ki^2, computed here
    naively; the method works by column blocks (forced small: 5 blocks) and, with a task
    missing, on the present tasks' rows only; its input rows are left untouched."""
    from polytask.balancing.aggregation import excess_mtl

    monkeypatch.setattr(excess_mtl, "_BLOCK_ELEMENTS", 3 * 1024)
    g = torch.Generator().manual_seed(3)
    steps = [torch.randn(3, 5000, generator=g, dtype=torch.float64) for _ in range(3)]
    present = [[0, 1, 2], [0, 2], [1, 2]]
    eps = 1e-3
    method = ExcessMTL(NAMES, eps=eps)
    sums = torch.zeros(3, 5000, dtype=torch.float64)
    for rows, index in zip(steps, present, strict=True):
        given = rows[index].to(dtype)
        before = given.clone()
        got = method.excess_risks(given, index)
        sums[index] += given.double() ** 2
        expected = (given.double() ** 2 / torch.sqrt(sums[index] + eps)).sum(dim=1)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
        assert torch.equal(given, before)
    assert method.squares is not None
    torch.testing.assert_close(method.squares, sums, rtol=1e-12, atol=0)


# -- loss scaling by gradient magnitude --------------------------------------------------------


def test_grad_norm_scaling_is_the_sum_of_unit_gradients() -> None:
    method = GradNormScaling(["a", "b", "c"])
    j = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    combined, w = method.aggregate(j, ["a", "b", "c"])
    assert w.tolist() == [0.2, 0.0, 0.5]
    torch.testing.assert_close(combined, torch.tensor([0.6, -0.2], dtype=torch.float64))
    for j in jacobians(3):
        c = torch.tensor([1e-6, 3.0, 1e6], dtype=torch.float64)[:, None]
        torch.testing.assert_close(method.aggregate(j * c, NAMES)[0], method.aggregate(j, NAMES)[0])
        unit = sum(r / r.norm() for r in j)
        torch.testing.assert_close(method.aggregate(j, NAMES)[0], unit, rtol=1e-12, atol=0)


def test_grad_norm_scaling_differs_from_mgda_l2() -> None:
    j = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    mgda = build("mgda", {"normalization": "l2"})
    assert not torch.allclose(
        mgda.aggregate(j, NAMES)[0], GradNormScaling(NAMES).aggregate(j, NAMES)[0]
    )  # type: ignore[attr-defined]


# -- the engine: log transform, levels, a tiny model -------------------------------------------


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


def _step(
    model: MultiTaskModel,
    balancer: Balancer,
    x: Tensor,
    y: dict[str, Tensor],
    scales: dict[str, float] | None = None,
) -> dict[str, Tensor]:
    feature = bool(getattr(balancer, "needs_representation", False))
    with capture_representation(model, feature) as rep:
        out = model(x)
    losses = {t: TASKS[t].compute_loss(out[t], y[t]) * (scales or {}).get(t, 1.0) for t in TASKS}
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    ctx = BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep)
    balancer.backward(losses, ctx)
    return {t: v.detach() for t, v in losses.items()}


def test_db_mtl_rows_are_gradients_of_the_log_losses() -> None:
    beta = 0.9
    model = _model()
    method = DBMTL(NAMES, beta=beta)
    g = torch.Generator().manual_seed(1)
    batches = [_batch(g) for _ in range(2)]
    reference = _model()
    shared_ref = list(reference.shared_parameters())
    rows = []
    for x, y in batches:
        out = reference(x)
        r = []
        for t in TASKS:
            loss = TASKS[t].compute_loss(out[t], y[t]).double()
            grads = torch.autograd.grad(loss, shared_ref, retain_graph=True)
            r.append(
                torch.cat([gr.flatten() for gr in grads]).double() / (float(loss.detach()) + 1e-8)
            )
        rows.append(torch.stack(r))
    expected = naive_db_mtl(rows, beta, 0.0)
    for (x, y), e in zip(batches, expected, strict=True):
        model.zero_grad()
        _step(model, method, x, y)
        got = torch.cat([p.grad.flatten() for p in model.shared_parameters()])  # type: ignore[union-attr]
        torch.testing.assert_close(got.double(), e, rtol=1e-4, atol=1e-6)
    # the heads are trained on sum_k log L_k
    head = next(p for n, p in model.named_parameters() if n.startswith("heads.a"))
    assert head.grad is not None and bool(torch.isfinite(head.grad).all())


@pytest.mark.parametrize("level", ["parameter", "feature"])
@pytest.mark.parametrize("name", ["db_mtl", "stch"])
def test_multiplying_a_tasks_loss_by_a_constant_changes_nothing(name: str, level: str) -> None:
    """The log transform: the updates of the whole model are those of the unscaled losses."""
    options = {"level": level} if name == "db_mtl" else {}
    results = []
    for scales in ({}, {"a": 1e3, "b": 1e-3}):
        model = _model()
        method = build(name, options)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(2)
        for step in range(4):
            x, y = _batch(g)
            opt.zero_grad()
            losses = _step(model, method, x, y, scales)
            opt.step()
            if step == 1:
                method.on_epoch_end(0, {t: float(v) for t, v in losses.items()})
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("level", ["parameter", "feature"])
@pytest.mark.parametrize("name", ["db_mtl", "excess_mtl", "grad_norm_scaling"])
def test_gradient_methods_run_at_both_levels_with_missing_tasks(name: str, level: str) -> None:
    model = _model()
    method = build(name, {"level": level})
    g = torch.Generator().manual_seed(4)
    for step in range(4):
        x, y = _batch(g, size=10 - step)  # the batch size changes (last batches)
        model.zero_grad()
        with capture_representation(model, level == "feature") as rep:
            out = model(x)
        present = NAMES if step % 2 == 0 else ["a", "c"]
        losses = {t: TASKS[t].compute_loss(out[t], y[t]) for t in present}
        shared = list(model.shared_parameters())
        others = [p for p in model.parameters() if all(p is not s for s in shared)]
        ctx = BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep)
        weights = method.backward(losses, ctx)
        assert list(weights) == present
        assert all(bool(torch.isfinite(w)) for w in weights.values())
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in shared)


def test_grad_norm_scaling_at_the_parameter_level_is_the_sum_of_unit_gradients() -> None:
    model, reference = _model(), _model()
    x, y = _batch(torch.Generator().manual_seed(5))
    _step(model, GradNormScaling(NAMES), x, y)
    out = reference(x)
    shared = list(reference.shared_parameters())
    unit = 0
    for t in TASKS:
        grads = torch.autograd.grad(TASKS[t].compute_loss(out[t], y[t]), shared, retain_graph=True)
        row = torch.cat([gr.flatten() for gr in grads]).double()
        unit = unit + row / row.norm()
    got = torch.cat([p.grad.flatten() for p in model.shared_parameters()])  # type: ignore[union-attr]
    torch.testing.assert_close(got.double(), unit, rtol=1e-5, atol=1e-7)


# -- STCH --------------------------------------------------------------------------------------


def _losses(values: Sequence[float], dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    return {
        t: torch.tensor(v, dtype=dtype, requires_grad=True)
        for t, v in zip(NAMES, values, strict=True)
    }


def test_stch_warm_up_is_the_sum_of_log_losses_then_the_closed_form() -> None:
    method = STCH(NAMES, eps=0.0)
    values = [0.5, 2.0, 4.0]
    losses = _losses(values)
    total, weights = method.combine(losses)
    assert float(total.detach()) == pytest.approx(sum(math.log(v) for v in values), rel=1e-14)
    assert [float(weights[t]) for t in NAMES] == pytest.approx([1 / v for v in values], rel=1e-14)
    nadir = [1.0, 4.0, 2.0]
    method.on_epoch_end(0, dict(zip(NAMES, nadir, strict=True)))
    assert not method.warming_up
    # mu = 1, lambda = 1, eps = 0: K log sum_k L_k / n_k, with dL/dL_k = K / (n_k sum_j L_j/n_j)
    losses = _losses(values)
    total, weights = method.combine(losses)
    ratio = sum(v / n for v, n in zip(values, nadir, strict=True))
    assert float(total.detach()) == pytest.approx(3 * math.log(ratio), rel=1e-14)
    total.backward()
    for t, n in zip(NAMES, nadir, strict=True):
        assert float(losses[t].grad) == pytest.approx(3 / (n * ratio), rel=1e-13)  # type: ignore[arg-type]
        assert float(weights[t]) == pytest.approx(3 / (n * ratio), rel=1e-13)


def test_stch_against_a_naive_smooth_tchebycheff() -> None:
    mu, pref = 0.2, {"a": 2.0, "b": 0.5}
    method = STCH(NAMES, mu=mu, preference=pref, warmup_epoch=1)
    method.on_epoch_end(0, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert method.warming_up  # the normaliser comes from epoch warmup_epoch
    nadir = {"a": 0.7, "b": 3.0, "c": 1.5}
    method.on_epoch_end(1, nadir)
    lam = {"a": 2.0, "b": 0.5, "c": 1.0}
    for values in ([0.5, 2.0, 4.0], [0.7, 3.0, 1.5], [1e-3, 1e3, 1.0]):
        losses = _losses(values)
        total, weights = method.combine(losses)
        total.backward()
        ref = _losses(values)
        u = [lam[t] * math.log(float(ref[t]) / nadir[t] + 1e-20) for t in NAMES]
        expected = 3 * mu * math.log(sum(math.exp(x / mu) for x in u))
        assert float(total.detach()) == pytest.approx(expected, rel=1e-12)
        naive = (
            3
            * mu
            * torch.log(
                sum(torch.exp(lam[t] * torch.log(ref[t] / nadir[t] + 1e-20) / mu) for t in NAMES)  # type: ignore[arg-type]
            )
        )
        naive.backward()
        for t in NAMES:
            torch.testing.assert_close(losses[t].grad, ref[t].grad, rtol=1e-12, atol=0)
            torch.testing.assert_close(weights[t], ref[t].grad, rtol=1e-12, atol=0)


def test_stch_small_mu_tends_to_the_tchebycheff_maximum() -> None:
    method = STCH(["a", "b"], mu=1e-4, eps=0.0)
    method.on_epoch_end(0, {"a": 1.0, "b": 2.0})
    total, weights = method.combine({"a": torch.tensor(3.0), "b": torch.tensor(2.0)})
    assert float(total.detach()) == pytest.approx(2 * math.log(3.0), rel=1e-5)
    assert float(weights["b"]) < 1e-6  # only the worst task is pushed


def test_stch_nadir_waits_for_a_usable_epoch_mean() -> None:
    method = STCH(NAMES)
    method.on_epoch_end(0, {"a": 1.0, "b": math.nan, "c": 2.0})
    assert method.warming_up and method.nadir[0] == 1.0
    method.on_epoch_end(1, {"a": 5.0, "b": 3.0, "c": 5.0})
    assert method.nadir.tolist() == [1.0, 3.0, 2.0]


def test_stch_refuses_a_negative_loss() -> None:
    with pytest.raises(ConfigError, match=r"balancer\.name=stch"):
        STCH(NAMES).combine(_losses([1.0, -1.0, 1.0]))


# -- fixed weights -----------------------------------------------------------------------------


def test_fixed_weights_are_the_given_linear_scalarisation() -> None:
    method = build("fixed", {"weights": {"a": 0.5, "b": 2.0, "c": 0.0}})
    assert isinstance(method, FixedWeights)
    losses = _losses([1.0, 3.0, 7.0])
    total, weights = method.combine(losses)
    assert float(total) == 6.5 and [float(weights[t]) for t in NAMES] == [0.5, 2.0, 0.0]
    default = build("fixed", {})
    assert [float(w) for w in default.weights(_losses([1.0, 2.0, 3.0])).values()] == [1.0] * 3  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"a": 1.0, "b": 1.0, "cc": 1.0}, r"unknown task 'cc'\. Did you mean 'c'\?"),
        ({"a": 1.0, "b": 1.0}, r"no weight for task\(s\) c"),
        ({"a": 1.0, "b": 1.0, "c": -1.0}, r"weights\.c: expected a finite number >= 0"),
        ({"a": 1.0, "b": 1.0, "c": math.nan}, r"finite number"),
        ({"a": 1.0, "b": 1.0, "c": math.inf}, r"finite number"),
        ({"a": 0.0, "b": 0.0, "c": 0.0}, r"every weight is 0"),
    ],
)
def test_fixed_weights_refuses_bad_options(weights: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=r"balancer\.options\.weights"):
        build("fixed", {"weights": weights})
    with pytest.raises(ConfigError, match=message):
        build("fixed", {"weights": weights})


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("db_mtl", "beta", 1.0),
        ("db_mtl", "beta", -0.1),
        ("db_mtl", "beta_sigma", -1.0),
        ("db_mtl", "eps", math.nan),
        ("excess_mtl", "eta", -1.0),
        ("excess_mtl", "eps", math.inf),
        ("stch", "mu", 0.0),
        ("stch", "warmup_epoch", -1),
        ("stch", "eps", -1.0),
        ("stch", "preference", {"a": 0.0}),
        ("stch", "preference", {"d": 1.0}),
        ("grad_norm_scaling", "level", "loss"),
    ],
)
def test_bad_options_name_the_key(name: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"balancer\.options\.{key}"):
        build(name, {key: value})


# -- state: checkpoints and the bit-for-bit resume of a tiny run -------------------------------

STATEFUL = [
    ("db_mtl", {"level": "parameter", "beta_sigma": 0.5}),
    ("db_mtl", {"level": "feature"}),
    ("excess_mtl", {"level": "parameter", "eta": 0.5}),
    ("excess_mtl", {"level": "feature", "eta": 0.5}),
    ("stch", {"mu": 0.5}),
]


def _train(
    balancer: Balancer,
    steps: range,
    model: MultiTaskModel,
    opt: torch.optim.Optimizer,
    on_step: Callable[[int], None] | None = None,
) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        x, y = _batch(g)
        opt.zero_grad()
        losses = _step(model, balancer, x, y)
        opt.step()
        if step % 3 == 2:  # epochs of 3 steps
            balancer.on_epoch_end(step // 3, {t: float(v) for t, v in losses.items()})
        if on_step is not None:
            on_step(step)


def _params(model: MultiTaskModel) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


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
            torch.save(
                {
                    "model": model.state_dict(),
                    "optim": opt.state_dict(),
                    "balancer": balancer.state_dict(),
                },
                buffer,
            )
            saved["state"] = buffer.getvalue()

    _train(balancer, range(9), model, opt, checkpoint)
    state = torch.load(io.BytesIO(saved["state"]), weights_only=True)
    resumed_model = _model()
    for p in resumed_model.parameters():
        p.data.add_(1.0)  # anything: the checkpoint replaces it
    resumed_model.load_state_dict(state["model"])
    resumed_opt = torch.optim.Adam(resumed_model.parameters(), lr=1e-2)
    resumed_opt.load_state_dict(state["optim"])
    resumed = build(name, options)
    resumed.load_state_dict(state["balancer"])
    _train(resumed, range(5, 9), resumed_model, resumed_opt)
    assert torch.equal(_params(resumed_model), _params(model))
    # without the balancer's state the run differs
    fresh_model = _model()
    fresh_model.load_state_dict(state["model"])
    fresh_opt = torch.optim.Adam(fresh_model.parameters(), lr=1e-2)
    fresh_opt.load_state_dict(state["optim"])
    _train(build(name, options), range(5, 9), fresh_model, fresh_opt)
    assert not torch.equal(_params(fresh_model), _params(model))


def test_state_has_the_right_shape_or_is_refused() -> None:
    method = DBMTL(NAMES)
    method.aggregate(jacobians(1)[0], NAMES)
    state = method.state_dict()
    other = DBMTL(NAMES, level="feature")
    with pytest.raises(ValueError, match="balancer state 'average'"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="balancer state 'steps'"):
        DBMTL(["a", "b"]).load_state_dict(state)
    restored = DBMTL(NAMES)
    restored.load_state_dict(state)
    with pytest.raises(ValueError, match="shared parameters changed"):
        restored.aggregate(torch.zeros(3, 4), NAMES)
