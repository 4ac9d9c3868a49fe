"""FairGrad, ConFIG, IMTL (IMTL-L + IMTL-G) and Aligned-MTL-UB against independent references.

FairGrad: mpmath's root finder on ``w^(1/alpha) (G w) = 1`` in 50 digits, Nash-MTL at
alpha = 1, the scaling law of the root, TorchJD on well-conditioned inputs. ConFIG: the
paper's formula computed from J with ``torch.linalg.pinv`` (and TorchJD's ConFIG). IMTL:
the paper's closed form of IMTL-G on the rows of the scaled losses and the derivative of
``e^s L - s``. Aligned-MTL-UB: Aligned-MTL at the feature level, through the engine.
"""

from __future__ import annotations

import io
import math
import warnings

import mpmath
import pytest
import torch
from test_aggregation_exact import DPS, KINDS, SIZES, _mp, family, weights_of
from test_feature_single_pass import _build, _losses
from torch import Tensor, nn

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation import (
    IMTL,
    IMTLG,
    AlignedMTL,
    AlignedMTLUB,
    ConFIG,
    FairGrad,
    FairGradNotConverged,
    NashMTL,
)
from polytask.balancing.base import BackwardContext
from polytask.balancing.gradient import GradientBalancer
from polytask.errors import CheckpointError, ConfigError, TrainingDiverged
from polytask.models import capture_representation
from polytask.registry import call_with_options

torchjd = pytest.importorskip("torchjd.aggregation")


def names(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


# --- FairGrad ----------------------------------------------------------------------------


def fair(j: Tensor, alpha: float, **options: object) -> Tensor:
    return FairGrad(names(j.shape[0]), alpha=alpha, **options).weights_from_gramian(j @ j.T)  # type: ignore[arg-type]


def fair_residual(g: Tensor, w: Tensor, alpha: float) -> float:
    """max_i |w_i^(1/alpha) (G w)_i - 1| over the non-zero rows, in 50 digits."""
    with mpmath.workdps(DPS):
        gm = _mp(g)
        k = g.shape[0]
        a = [mpmath.mpf(float(x)) for x in w]
        live = [i for i in range(k) if g[i, i] > 0]
        return float(
            max(
                abs(
                    a[i] ** (mpmath.mpf(1) / alpha) * mpmath.fsum(gm[i, j] * a[j] for j in live) - 1
                )
                for i in live
            )
        )


def mp_fair_root(g: Tensor, alpha: float, start: Tensor) -> Tensor:
    """The positive root of ``w_i^(1/alpha) (G w)_i = 1``, polished to 50 digits by mpmath's
    Newton method in log-coordinates (unique: the minimiser of a strictly convex function)."""
    k = g.shape[0]
    with mpmath.workdps(DPS):
        gm = _mp(g)
        inv = mpmath.mpf(1) / alpha

        def equations(*y: mpmath.mpf) -> list[mpmath.mpf]:
            a = [mpmath.exp(v) for v in y]
            return [
                mpmath.exp(y[i] * inv) * mpmath.fsum(gm[i, j] * a[j] for j in range(k)) - 1
                for i in range(k)
            ]

        def jacobian(*y: mpmath.mpf) -> mpmath.matrix:
            a = [mpmath.exp(v) for v in y]
            ga = [mpmath.fsum(gm[i, j] * a[j] for j in range(k)) for i in range(k)]
            out = mpmath.matrix(k, k)
            for i in range(k):
                for j in range(k):
                    out[i, j] = mpmath.exp(y[i] * inv) * (
                        gm[i, j] * a[j] + (inv * ga[i] if i == j else 0)
                    )
            return out

        y0 = [mpmath.log(float(a)) for a in start]
        root = mpmath.findroot(equations, y0, J=jacobian)
        return torch.tensor([float(mpmath.exp(root[i])) for i in range(k)], dtype=torch.float64)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("kind", ["ordinary", "tiny", "huge", "conflicting", "nearly_collinear"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_fairgrad_equals_the_mpmath_root(k: int, kind: str, alpha: float) -> None:
    j = family(kind, k)
    g = j @ j.T
    w = fair(j, alpha)
    assert bool((w > 0).all())
    assert fair_residual(g, w, alpha) <= 1e-9
    start = w * torch.linspace(0.999, 1.001, k, dtype=torch.float64)  # not our answer
    torch.testing.assert_close(w, mp_fair_root(g, alpha, start), rtol=1e-8, atol=0)


@pytest.mark.parametrize("alpha", [5.0, 10.0])
@pytest.mark.parametrize("k", [5, 10])
def test_fairgrad_weights_spanning_40_orders_of_magnitude(k: int, alpha: float) -> None:
    """A tiny task nearly opposite another: the root has weights from 1e-37 to 1e9 (relative
    Newton steps with Jacobi scaling, continuation from alpha = 1 if a cold start fails)."""
    j = family("small_task", k)
    g = j @ j.T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = fair(j, alpha)
    assert float(w.max() / w.min()) > 1e20
    assert fair_residual(g, w, alpha) <= 1e-8
    start = w * torch.linspace(0.999, 1.001, k, dtype=torch.float64)
    torch.testing.assert_close(w, mp_fair_root(g, alpha, start), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "all_zero"])
@pytest.mark.parametrize("k", SIZES)
def test_fairgrad_with_alpha_1_is_nash_mtl(k: int, kind: str) -> None:
    j = family(kind, k)
    torch.testing.assert_close(fair(j, 1.0), weights_of("nash_mtl", j), rtol=1e-8, atol=0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0, 10.0])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", SIZES)
def test_fairgrad_properties_over_the_families(k: int, kind: str, alpha: float) -> None:
    """Finite, positive where the gradient is not zero; g_i . d = w_i^(-1/alpha) > 0; invariant
    to the order of the tasks."""
    j = family(kind, k)
    w = fair(j, alpha)
    live = j.norm(dim=1) > 0
    assert bool(torch.isfinite(w).all()) and bool((w[live] > 0).all())
    assert bool((w[~live] == 0).all())
    if bool(live.any()):
        # the small task's root is known to its rounding bound only (1.5e-8 for K = 5)
        assert fair_residual(j @ j.T, w, alpha) <= (1e-7 if kind == "small_task" else 1e-9)
        products = (j @ (w @ j))[live]
        torch.testing.assert_close(
            products * w[live] ** (1 / alpha), torch.ones_like(products), rtol=0, atol=1e-7
        )
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(fair(j[perm], alpha), w[perm], rtol=1e-7, atol=0)


@pytest.mark.parametrize("factor", [1e-6, 1e6])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("kind", ["ordinary", "zero_row", "conflicting"])
@pytest.mark.parametrize("k", SIZES)
def test_fairgrad_scaling_law(k: int, kind: str, alpha: float, factor: float) -> None:
    """w(cJ) = c^(-2 alpha / (1 + alpha)) w(J): the root at any scale (the update scales as
    c^((1 - alpha) / (1 + alpha)), equivariant only as alpha -> 0)."""
    j = family(kind, k)
    expected = fair(j, alpha) * factor ** (-2 * alpha / (1 + alpha))
    torch.testing.assert_close(fair(factor * j, alpha), expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_fairgrad_agrees_with_torchjd_at_unit_scale_only(k: int, alpha: float) -> None:
    """TorchJD 0.18 stops scipy's least squares where it stops: close to the root on
    well-conditioned unit-scale inputs, far from it at a 1e-6 scale, where polytask's residual
    is still at rounding level."""
    for seed in range(2):
        j = family("ordinary", k, seed, dim=3 * k)
        g = j @ j.T
        ours, theirs = fair(j, alpha), torchjd.FairGradWeighting(alpha=alpha)(g)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)
        assert fair_residual(g, ours, alpha) <= 1e-10
    tiny = 1e-6 * family("ordinary", k, 0, dim=3 * k)
    g = tiny @ tiny.T
    assert fair_residual(g, fair(tiny, alpha), alpha) <= 1e-10
    assert fair_residual(g, torchjd.FairGradWeighting(alpha=alpha)(g), alpha) > 1e-3


def test_fairgrad_reports_what_float64_cannot_solve() -> None:
    """A tiny task nearly opposite another with alpha = 0.1: float64's rounding of the
    residual near the root exceeds 1e-2, so no answer can be verified. Opposite gradients: no
    root. Never a silent answer."""
    j = family("small_task", 3)
    with pytest.warns(RuntimeWarning, match=r"did not converge at call 1: .* float64 rounding"):
        kept = fair(j, 0.1)
    assert bool(torch.isfinite(kept).all()) and bool((kept > 0).all())
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    with pytest.raises(FairGradNotConverged, match="max_iter=200") as info:
        fair(opposite, 2.0, on_failure="raise")
    assert isinstance(info.value, TrainingDiverged) and info.value.exit_code == 3


def test_fairgrad_names_the_step_and_keeps_previous_weights() -> None:
    method = FairGrad(["a", "b"], alpha=2.0)
    easy = family("ordinary", 2)
    previous = method.weights_from_gramian(easy @ easy.T)
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="Keeping the previous weights"):
        kept = method.weights_from_gramian(opposite @ opposite.T)
    torch.testing.assert_close(kept, previous)


def test_fairgrad_degenerate_cases_and_state() -> None:
    zero = torch.zeros(3, 3, dtype=torch.float64)
    assert bool((FairGrad(names(3), alpha=2.0).weights_from_gramian(zero) == 0).all())
    one = family("ordinary", 1)
    for alpha in (0.5, 2.0):  # |g|^2 w = w^(-1/alpha)
        expected = one.norm(dim=1) ** (-2 * alpha / (1 + alpha))
        torch.testing.assert_close(fair(one, alpha), expected, rtol=1e-12, atol=0)
    method = FairGrad(names(3), alpha=2.0)
    j = family("conflicting", 3)
    w = method.weights_from_gramian(j @ j.T)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = FairGrad(names(3), alpha=2.0)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert restored.get_extra_state() == method.get_extra_state()
    torch.testing.assert_close(restored.weights_from_gramian(j @ j.T), w, rtol=1e-12, atol=0)
    with pytest.raises(CheckpointError, match="fairgrad"):
        restored.set_extra_state([1, 2])


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": "fair"}, "alpha"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": 0}, "tol"),
        ({"on_failure": "ignore"}, "on_failure"),
        ({"level": "loss"}, "level"),
    ],
)
def test_fairgrad_bad_options_name_the_key(options: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"balancer\.options\.{key}"):
        call_with_options(
            BALANCERS.get("fairgrad"), options, where="balancer.options", provided={"tasks": ["a"]}
        )


# --- ConFIG ------------------------------------------------------------------------------


def config_by_pinv(j: Tensor) -> Tensor:
    """The paper's Equation 2 from J itself: g_u = normalize(pinv(U) 1), d = (sum_i g_i.g_u) g_u,
    U the unit rows (zero rows stay zero)."""
    norms = j.norm(dim=1, keepdim=True)
    units = torch.where(norms > 0, j / norms.clamp_min(1e-300), torch.zeros_like(j))
    direction = torch.linalg.pinv(units) @ torch.ones(j.shape[0], dtype=j.dtype)
    if float(direction.norm()) == 0.0:
        return torch.zeros(j.shape[1], dtype=j.dtype)
    unit = direction / direction.norm()
    return (j @ unit).sum() * unit


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", SIZES)
def test_config_equals_the_pinv_formula(k: int, kind: str) -> None:
    j = family(kind, k)
    d = weights_of("config", j) @ j
    scale = float(j.norm(dim=1).max()) or 1.0
    # nearly collinear rows: pinv of a matrix of condition ~1e4, float64 rounding times that
    tol = 1e-8 if kind == "nearly_collinear" else 1e-12
    torch.testing.assert_close(d / scale, config_by_pinv(j) / scale, rtol=0, atol=tol)
    torch.testing.assert_close(d / scale, torchjd.ConFIG()(j) / scale, rtol=0, atol=tol)


@pytest.mark.parametrize("kind", ["ordinary", "conflicting", "tiny", "huge", "small_task"])
@pytest.mark.parametrize("k", SIZES)
def test_config_has_equal_positive_cosines(k: int, kind: str) -> None:
    """Independent rows: every task gradient has the same cosine with d, and it is positive;
    d's length is the sum of the projections of the rows on its direction."""
    j = family(kind, k)
    d = weights_of("config", j) @ j
    cosines = (j @ d) / (j.norm(dim=1) * d.norm())
    torch.testing.assert_close(cosines, cosines.mean().expand(k), rtol=0, atol=1e-9)
    assert float(cosines.min()) > 0
    torch.testing.assert_close(d.norm(), (j @ d).sum() / d.norm(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("factor", [1e-6, 1e6])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", SIZES)
def test_config_scale_equivariance_and_order(k: int, kind: str, factor: float) -> None:
    j = family(kind, k)
    w = weights_of("config", j)
    scale = float(j.norm(dim=1).max()) or 1.0
    d_scaled = weights_of("config", factor * j) @ j
    if kind == "nearly_collinear":
        # the weights of nearly collinear rows are large and cancel (condition ~1e8 of C):
        # the update is what is determined
        torch.testing.assert_close(d_scaled / scale, (w @ j) / scale, rtol=0, atol=1e-8)
    else:
        torch.testing.assert_close(weights_of("config", factor * j), w, rtol=1e-9, atol=1e-12)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    d_perm = weights_of("config", j[perm]) @ j[perm]
    torch.testing.assert_close(d_perm / scale, (w @ j) / scale, rtol=0, atol=1e-8)


def test_config_float32_rows_through_aggregate() -> None:
    j = family("conflicting", 4)
    method = ConFIG(names(4), level="feature")
    assert method.needs_representation
    combined, weights = method.aggregate(j.float(), names(4))
    assert combined.dtype == torch.float32 and weights.shape == (4,)
    torch.testing.assert_close(combined.double(), config_by_pinv(j), rtol=1e-5, atol=1e-5)


# --- IMTL: IMTL-L + IMTL-G ----------------------------------------------------------------


def imtl_g_closed_form(j: Tensor) -> Tensor:
    """The paper's alpha_{2..K} = g_1 U^T (D U^T)^-1, alpha_1 = 1 - sum (float64)."""
    u = j / j.norm(dim=1, keepdim=True)
    d_mat = j[:1] - j[1:]
    u_mat = u[:1] - u[1:]
    rest = j[0] @ u_mat.T @ torch.linalg.inv(d_mat @ u_mat.T)
    return torch.cat([(1 - rest.sum())[None], rest])


TASKS = ["a", "b", "c"]


class Quadratic(nn.Module):
    """Shared theta, one head scalar per task: L_k = |A_k theta - b_k|^2 / 2 + h_k^2 + 0.1 k."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.theta = nn.Parameter(torch.randn(6, generator=g))
        self.heads = nn.Parameter(torch.randn(3, generator=g))
        self.a = torch.randn(3, 4, 6, generator=g)
        self.b = torch.randn(3, 4, generator=g)

    def losses(self) -> dict[str, Tensor]:
        return {
            t: 0.5 * (self.a[k] @ self.theta - self.b[k]).square().sum()
            + self.heads[k] ** 2
            + 0.1 * (k + 1)
            for k, t in enumerate(TASKS)
        }

    def jacobian(self) -> Tensor:
        return torch.stack([self.a[k].T @ (self.a[k] @ self.theta - self.b[k]) for k in range(3)])


def test_imtl_is_imtl_g_on_the_scaled_losses_and_learns_the_scales() -> None:
    model = Quadratic()
    method = IMTL(TASKS, level="parameter")
    scales = torch.tensor([0.3, -0.7, 1.1])
    with torch.no_grad():
        for p, s in zip(method.log_scales, scales, strict=True):
            p.fill_(float(s))
    losses = model.losses()
    values = torch.stack([loss.detach() for loss in losses.values()])
    raw = model.jacobian().detach().double()
    factors = scales.double().exp()
    alpha = imtl_g_closed_form(factors[:, None] * raw)
    ctx = BackwardContext(shared_parameters=[model.theta], other_parameters=[model.heads])
    weights = method.backward(losses, ctx)
    assert model.theta.grad is not None and model.heads.grad is not None
    expected = (alpha * factors) @ raw
    torch.testing.assert_close(model.theta.grad.double(), expected, rtol=1e-5, atol=1e-6)
    # the heads: the gradient of sum_k e^{s_k} L_k
    heads = 2 * model.heads.detach() * factors.float()
    torch.testing.assert_close(model.heads.grad, heads, rtol=1e-6, atol=1e-7)
    # s_k: d(e^{s_k} L_k - s_k)/ds_k = e^{s_k} L_k - 1
    for p, s, v in zip(method.log_scales, scales, values, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, torch.exp(s) * v - 1, rtol=1e-6, atol=1e-7)
    logged = torch.stack([weights[t] for t in TASKS]).double()
    torch.testing.assert_close(logged, alpha * factors, rtol=1e-5, atol=1e-7)


def test_imtl_first_step_equals_imtl_g_and_keeps_both_names() -> None:
    assert BALANCERS.get("imtl") is IMTL and BALANCERS.get("imtl_g") is IMTLG
    assert IMTL(TASKS).level == "feature"  # the paper's level
    grads = []
    for method in (IMTL(TASKS, level="parameter"), IMTLG(TASKS)):
        model = Quadratic()
        method.backward(model.losses(), BackwardContext(shared_parameters=[model.theta]))
        assert model.theta.grad is not None
        grads.append(model.theta.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    assert len(list(IMTL(TASKS).parameters())) == 3 and not list(IMTLG(TASKS).parameters())


def test_imtl_at_the_feature_level_with_a_missing_task() -> None:
    """On an architecture's shared representation, a step without task b: IMTL is IMTL-G
    on e^{s_k} L_k of the present tasks; only their scales get a gradient."""
    results = []
    for cls in (IMTL, IMTLG):
        model = _build("hps", False, {})
        with capture_representation(model) as rep:
            losses = _losses(model, False)
        del losses["b"]
        balancer = cls(["a", "b", "c"], level="feature")
        if isinstance(balancer, IMTL):
            with torch.no_grad():
                balancer.log_scales[0].fill_(0.5)
                balancer.log_scales[2].fill_(-0.25)
        else:
            losses = {"a": math.exp(0.5) * losses["a"], "c": math.exp(-0.25) * losses["c"]}
        shared = list(model.shared_parameters())
        others = [p for p in model.parameters() if all(p is not s for s in shared)]
        ctx = BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep)
        balancer.backward(losses, ctx)
        results.append([p.grad.clone() for p in shared if p.grad is not None])
        if isinstance(balancer, IMTL):
            assert balancer.log_scales[1].grad is None
            assert balancer.log_scales[0].grad is not None
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# --- Aligned-MTL-UB ------------------------------------------------------------------------


def test_aligned_mtl_ub_is_aligned_mtl_at_the_feature_level() -> None:
    assert BALANCERS.get("aligned_mtl_ub") is AlignedMTLUB
    ub = AlignedMTLUB(TASKS)
    assert ub.level == "feature" and ub.needs_representation
    j = family("conflicting", 3)
    torch.testing.assert_close(ub.weights_from_gramian(j @ j.T), weights_of("aligned_mtl", j))
    grads = []
    for balancer in (AlignedMTLUB(["a", "b", "c"]), AlignedMTL(["a", "b", "c"], level="feature")):
        model = _build("hps", False, {})
        with capture_representation(model) as rep:
            losses = _losses(model, False)
        shared = list(model.shared_parameters())
        others = [p for p in model.parameters() if all(p is not s for s in shared)]
        ctx = BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep)
        balancer.backward(losses, ctx)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)
    options = AlignedMTLUB(TASKS, level="parameter", reduction="mean", scale_mode="median")
    assert options.level == "parameter" and options.reduction == "mean"


@pytest.mark.parametrize("name", ["fairgrad", "config", "imtl", "aligned_mtl_ub"])
@pytest.mark.parametrize("level", ["parameter", "feature"])
def test_new_methods_take_level_and_a_subset_of_tasks(name: str, level: str) -> None:
    method = call_with_options(
        BALANCERS.get(name), {"level": level}, where="balancer.options", provided={"tasks": TASKS}
    )
    assert isinstance(method, GradientBalancer) and method.level == level
    j = family("ordinary", 3).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for tasks in (TASKS, ["a", "c"], ["b"]):
            rows = j[[TASKS.index(t) for t in tasks]]
            combined, weights = method.aggregate(rows, tasks)
            assert combined.shape == (j.shape[1],) and weights.shape == (len(tasks),)
            assert bool(torch.isfinite(combined).all())
            expected = weights_of(name if name != "imtl" else "imtl_g", rows.double())
            if name == "fairgrad":
                expected = NashMTL(tasks).weights_from_gramian(rows.double() @ rows.double().T)
            torch.testing.assert_close(combined, expected.float() @ rows, rtol=1e-5, atol=1e-6)


def test_imtl_scale_gradients_go_through_the_loss_scaler() -> None:
    """With a loss scaler every gradient the step leaves (the model's and the scales') is
    multiplied by the loss scale, for the optimizer's unscale to divide."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=8.0)):
        model = Quadratic()
        method = IMTL(TASKS, level="parameter")
        with torch.no_grad():
            method.log_scales[1].fill_(0.4)
        ctx = BackwardContext(
            shared_parameters=[model.theta], other_parameters=[model.heads], grad_scaler=scaler
        )
        method.backward(model.losses(), ctx)
        assert model.theta.grad is not None and model.heads.grad is not None
        scales = [p.grad for p in method.log_scales]
        assert all(s is not None for s in scales)
        results.append((model.theta.grad, model.heads.grad, torch.stack(scales)))  # type: ignore[arg-type]
    for plain, scaled in zip(*results, strict=True):
        torch.testing.assert_close(scaled, 8.0 * plain, rtol=1e-5, atol=1e-6)
