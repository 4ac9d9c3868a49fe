"""PCGrad, GradDrop, GradVac, CAGrad, IMTL-G and GradNorm: the papers' formulas written
naively here (loops over vectors, no Gramian, no vectorisation), properties over seeded
families of Jacobians, pinned values, task subsets, state round trips and option errors.

The randomised methods draw from their own generator: PCGrad and GradVac draw one key per
ordered pair of tasks *by task name* (:func:`random_task_orders`), GradDrop one uniform per
coordinate, independent of the rows (:func:`graddrop_uniform`). So invariance to the order
of the tasks is tested exactly, not in distribution: the same seed with the rows permuted
must give the same update. The naive formulas are fed the same orders and uniforms,
reproduced from the seed with those public helpers. The distribution of the orders is
tested separately.

Scale equivariance ``f(cJ) = c f(J)`` at ``c = 1e-6`` and ``1e6`` holds for all six methods
(GradNorm: for the update, whose weights do not depend on the gradients within a step).
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Callable, Sequence

import mpmath
import pytest
import torch
from torch import Tensor, nn

from polytask.balancing.aggregation.cagrad import CAGrad, cagrad_weights
from polytask.balancing.aggregation.graddrop import GradDrop, graddrop, graddrop_uniform
from polytask.balancing.aggregation.gradnorm import GradNorm, gradnorm_weight_grad
from polytask.balancing.aggregation.gradvac import GradVac, gradvac_weights
from polytask.balancing.aggregation.imtl import IMTLG, imtl_g_weights
from polytask.balancing.aggregation.pcgrad import PCGrad, pcgrad_weights, random_task_orders
from polytask.balancing.base import BALANCERS, BackwardContext
from polytask.balancing.gradient import GradientBalancer, GramianWeighting
from polytask.errors import ConfigError
from polytask.registry import call_with_options

METHODS = ("pcgrad", "graddrop", "gradvac", "cagrad", "imtl_g", "gradnorm")
CLASSES = {
    "pcgrad": PCGrad,
    "graddrop": GradDrop,
    "gradvac": GradVac,
    "cagrad": CAGrad,
    "imtl_g": IMTLG,
    "gradnorm": GradNorm,
}
GRAMIAN_METHODS = ("pcgrad", "gradvac", "cagrad", "imtl_g")
KINDS = ("ordinary", "zero_row", "all_zero", "tiny", "huge", "nearly_collinear", "conflicting")
#: kinds whose conditioning lets float32 rounding of ``c J`` pass through at 1e-4
WELL_CONDITIONED = ("ordinary", "zero_row", "conflicting")


def names(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


def family(kind: str, k: int, seed: int = 0, dim: int = 12) -> Tensor:
    """A K x dim float32 Jacobian (what the engine hands a method) of the given kind."""
    g = torch.Generator().manual_seed(100 * k + seed)
    j = torch.randn(k, dim, generator=g)
    if kind == "zero_row":
        j[k // 2] = 0.0
    elif kind == "all_zero":
        j.zero_()
    elif kind == "tiny":
        j *= 1e-6
    elif kind == "huge":
        j *= 1e6
    elif kind == "nearly_collinear":
        j = torch.randn(1, dim, generator=g) + 1e-2 * j
    elif kind == "conflicting":
        j = j - 0.9 * j.mean(dim=0)
        if k >= 2:
            j[1] = -j[0] + 0.05 * j[1]
    return j


def make(name: str, k: int, **options: object) -> GradientBalancer:
    method = CLASSES[name](tasks=names(k), **options)  # type: ignore[arg-type]
    assert BALANCERS.get(name) is CLASSES[name]
    assert isinstance(method, GradientBalancer)
    return method


def scale_of(x: Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


# --- the papers' formulas, naively ------------------------------------------------------


def naive_pcgrad(j: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """Algorithm 1 of Yu et al. on the vectors themselves (float64)."""
    rows = [r.double() for r in j]
    out = torch.zeros_like(rows[0])
    for i, g_i in enumerate(rows):
        pc = g_i.clone()
        for jj in orders[i]:
            dot = float(pc @ rows[jj])
            if dot < 0:
                pc = pc - dot / float(rows[jj] @ rows[jj]) * rows[jj]
        out = out + pc
    return out


def naive_gradvac(
    j: Tensor, orders: Sequence[Sequence[int]], targets: list[list[float]], beta: float
) -> Tensor:
    """Algorithm 1 of Wang et al. (whole vector) on the vectors; updates ``targets``."""
    rows = [r.double() for r in j]
    out = torch.zeros_like(rows[0])
    for i, g_i in enumerate(rows):
        pc = g_i.clone()
        for jj in orders[i]:
            g_j = rows[jj]
            if float(pc.norm()) == 0 or float(g_j.norm()) == 0:
                continue
            phi = float(pc @ g_j) / (float(pc.norm()) * float(g_j.norm()))
            hat = targets[i][jj]
            if phi < hat:
                coef = (
                    float(pc.norm())
                    * (hat * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - hat**2))
                    / (float(g_j.norm()) * math.sqrt(1 - hat**2))
                )
                pc = pc + coef * g_j
            targets[i][jj] = (1 - beta) * hat + beta * phi
        out = out + pc
    return out


def naive_imtl_g(j: Tensor) -> Tensor:
    """The paper's closed form: alpha_{2..K} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum."""
    g = j.double()
    u = g / g.norm(dim=1, keepdim=True)
    d_mat = torch.stack([g[0] - g[k] for k in range(1, len(g))])
    u_mat = torch.stack([u[0] - u[k] for k in range(1, len(g))])
    rest = g[0] @ u_mat.T @ torch.linalg.inv(d_mat @ u_mat.T)
    alpha = torch.cat([(1 - rest.sum()).reshape(1), rest])
    return alpha @ g


def naive_graddrop(j: Tensor, uniform: Tensor, leak: float) -> Tensor:
    """Lines 10-15 of Algorithm 1 of Chen et al., one coordinate at a time."""
    k, n = j.shape
    out = []
    for c in range(n):
        col = [float(j[i, c]) for i in range(k)]
        total, magnitude = sum(col), sum(abs(x) for x in col)
        p = 0.5 * (1 + total / magnitude) if magnitude > 0 else 0.5
        u = float(uniform[c])
        value = 0.0
        for x in col:
            keep = (p > u and x > 0) or (p < u and x < 0)
            value += (leak + (1 - leak) * keep) * x
        out.append(value)
    return torch.tensor(out, dtype=torch.float64)


def naive_cagrad(j: Tensor, c: float, dps: int = 40) -> list[mpmath.mpf]:
    """CAGrad's update in ``dps``-digit arithmetic by enumerating every face of the simplex.

    On each face the stationary point of ``<g_w, g_0> + c ||g_0|| ||g_w||`` over its affine
    hull follows from a quadratic (see :func:`_face_point`); the best point with
    non-negative weights is the minimiser (the problem is convex). Returns the update
    ``g_0 + c ||g_0|| g_w / ||g_w||`` as mpmath numbers.
    """
    with mpmath.workdps(dps):
        rows = [[mpmath.mpf(float(x)) for x in r] for r in j.double()]
        k, n = len(rows), len(rows[0])
        g0 = [sum(r[t] for r in rows) / k for t in range(n)]
        gram = mpmath.matrix(k, k)
        for a in range(k):
            for b in range(k):
                gram[a, b] = sum(rows[a][t] * rows[b][t] for t in range(n))
        bvec = [sum(rows[a][t] * g0[t] for t in range(n)) for a in range(k)]
        s = c * mpmath.sqrt(sum(x * x for x in g0))
        best: tuple[mpmath.mpf, list[mpmath.mpf]] | None = None
        for size in range(1, k + 1):
            for face in itertools.combinations(range(k), size):
                w = _face_point(gram, bvec, s, face, k)
                if w is None:
                    continue
                quad = sum(w[a] * gram[a, b] * w[b] for a in range(k) for b in range(k))
                value = sum(w[a] * bvec[a] for a in range(k)) + s * mpmath.sqrt(quad)
                if best is None or value < best[0]:
                    best = (value, w)
        assert best is not None
        w = best[1]
        gw = [sum(w[a] * rows[a][t] for a in range(k)) for t in range(n)]
        norm = mpmath.sqrt(sum(x * x for x in gw))
        return [g0[t] + s * gw[t] / norm for t in range(n)]


def _face_point(
    gram: mpmath.matrix, bvec: list[mpmath.mpf], s: mpmath.mpf, face: tuple[int, ...], k: int
) -> list[mpmath.mpf] | None:
    """Stationarity on the face: ``w = -G^{-1}(b + nu 1) / mu`` with
    ``(b + nu 1)^T G^{-1} (b + nu 1) = s^2`` and ``mu = -1^T G^{-1} (b + nu 1) > 0``."""
    m = len(face)
    sub = mpmath.matrix(m, m)
    for a, fa in enumerate(face):
        for b, fb in enumerate(face):
            sub[a, b] = gram[fa, fb]
    scale = mpmath.fprod(sub[a, a] for a in range(m))
    if scale == 0 or abs(mpmath.det(sub)) < mpmath.mpf(10) ** (-20) * scale:
        return None
    inv = sub**-1
    ones = mpmath.matrix([1] * m)
    bs = mpmath.matrix([bvec[f] for f in face])
    inv_one, inv_b = inv * ones, inv * bs
    alpha = sum(inv_one)
    beta = sum(inv_b)
    gamma = sum(bs[a] * inv_b[a] for a in range(m))
    disc = beta**2 - alpha * (gamma - s**2)
    if disc <= 0:
        return None
    mu = mpmath.sqrt(disc)
    nu = (-beta - mu) / alpha
    w_face = [-(inv_b[a] + nu * inv_one[a]) / mu for a in range(m)]
    if any(x < 0 for x in w_face):
        return None
    w = [mpmath.mpf(0)] * k
    for a, f in enumerate(face):
        w[f] = w_face[a]
    return w


def naive_gradnorm_grad(
    w: Tensor, norms: Tensor, losses: Tensor, initial: Tensor, alpha: float
) -> Tensor:
    """d L_grad / d w by autograd, with the target detached as in the paper."""
    weights = w.detach().double().clone().requires_grad_(True)
    rates = losses.double() / initial.double()
    r = rates / rates.mean()
    weighted = weights * norms.double()
    target = (weighted.mean() * r**alpha).detach()
    loss = (weighted - target).abs().sum()
    (grad,) = torch.autograd.grad(loss, weights)
    return grad


# --- pinned values ----------------------------------------------------------------------

SQRT2 = math.sqrt(2.0)
PINNED: list[tuple[str, list[list[float]], dict[str, object], list[float]]] = [
    # g1 = (1, 0), g2 = (-1, 1): each is projected off the other; the sum of the projections
    ("pcgrad", [[1, 0], [-1, 1]], {}, [0.5, 1.5]),
    ("pcgrad", [[1, 0], [0, 1]], {}, [1.0, 1.0]),  # no conflict: the plain sum
    # equal projections on (1, 0) and (-1, 1)/sqrt 2, weights (2 - sqrt 2, sqrt 2 - 1)
    ("imtl_g", [[1, 0], [-1, 1]], {}, [3 - 2 * SQRT2, SQRT2 - 1]),
    ("imtl_g", [[2, 0], [0, 1]], {}, [2 / 3, 2 / 3]),
    # g0 = (0, 1/2), radius 1/4: the worst task's improvement is at most 1/4, reached at
    # d = g0 + (1/4, 0), where both tasks get exactly 1/4
    ("cagrad", [[1, 0], [-1, 1]], {"c": 0.5}, [0.25, 0.5]),
    ("cagrad", [[1, 0], [-1, 1]], {"c": 0.5, "rescale": 1}, [0.2, 0.4]),
    ("cagrad", [[1, 0], [-1, 1]], {"c": 0.5, "rescale": 2}, [0.25 / 1.5, 0.5 / 1.5]),
    ("cagrad", [[1, 0], [-1, 1]], {"c": 0.0}, [0.0, 0.5]),  # c = 0: the mean
    # first GradVac step: every target is 0, so GradVac is PCGrad
    ("gradvac", [[1, 0], [-1, 1]], {"beta": 0.5}, [0.5, 1.5]),
]


@pytest.mark.parametrize(("name", "rows", "options", "expected"), PINNED)
def test_pinned_values(
    name: str, rows: list[list[float]], options: dict[str, object], expected: list[float]
) -> None:
    j = torch.tensor(rows, dtype=torch.float32)
    out, _ = make(name, len(rows), **options).aggregate(j, names(len(rows)))
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_pinned_gradvac_sequence() -> None:
    """Three steps on the same rows with beta = 1/2; each line written out by hand:
    targets after step 1 are (1/2) cos = -sqrt(2)/4 for both pairs, and so on."""
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    method = make("gradvac", 2, beta=0.5)
    expected = [
        ([0.5, 1.5], -0.35355339059327373),
        ([0.31101776349538635, 1.3110177634953863], -0.5303300858899106),
        ([0.18722837891438782, 1.1872283789143878], -0.618718433538229),
    ]
    assert isinstance(method, GradVac)
    for out_expected, target in expected:
        out, _ = method.aggregate(j, names(2))
        torch.testing.assert_close(out, torch.tensor(out_expected), rtol=1e-6, atol=1e-7)
        assert method.targets[0, 1].item() == pytest.approx(target, rel=1e-12)
        assert method.targets[1, 0].item() == pytest.approx(target, rel=1e-12)


def test_pinned_graddrop() -> None:
    # columns: purity 1 (keep positives), 1/3 (negatives), all zero (nothing)
    j = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0]])
    u = torch.full((3,), 0.5)
    out, weights = graddrop(j, u, 0.0)
    torch.testing.assert_close(out, torch.tensor([4.0, -2.0, 0.0]))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.9]))  # shares of |g|^2 kept
    out, _ = graddrop(j, u, 0.5)
    torch.testing.assert_close(out, torch.tensor([4.0, -1.5, 0.0]))


def test_pinned_gradnorm_weight_gradient() -> None:
    # r = (0.5, 0.8) / 0.65; targets 3.5 r^1.5 = (2.361, 4.779): first above, second below
    grad = gradnorm_weight_grad(
        torch.ones(2),
        torch.tensor([3.0, 4.0]),
        torch.tensor([0.5, 0.8]),
        torch.tensor([1.0, 1.0]),
        1.5,
    )
    torch.testing.assert_close(grad, torch.tensor([3.0, -4.0], dtype=torch.float64))


# --- naive formulas against the implementations ------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("kind", ["ordinary", "zero_row", "conflicting", "nearly_collinear"])
def test_pcgrad_equals_the_naive_algorithm_with_the_same_orders(kind: str, k: int) -> None:
    method = make("pcgrad", k, seed=7)
    generator = torch.Generator().manual_seed(7)
    for step in range(3):
        j = family(kind, k, seed=step)
        orders = random_task_orders(generator, k, list(range(k)))
        out, _ = method.aggregate(j, names(k))
        expected = naive_pcgrad(j, orders)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6 * scale_of(j))


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("kind", ["ordinary", "zero_row", "conflicting", "tiny", "huge"])
def test_gradvac_equals_the_naive_algorithm_with_the_same_orders(kind: str, k: int) -> None:
    beta = 0.3
    method = make("gradvac", k, beta=beta, seed=3)
    generator = torch.Generator().manual_seed(3)
    targets = [[0.0] * k for _ in range(k)]
    for step in range(4):
        j = family(kind, k, seed=step)
        orders = random_task_orders(generator, k, list(range(k)))
        out, _ = method.aggregate(j, names(k))
        expected = naive_gradvac(j, orders, targets, beta)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6 * scale_of(j))
    assert isinstance(method, GradVac)
    torch.testing.assert_close(method.targets, torch.tensor(targets, dtype=torch.float64))


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("kind", ["ordinary", "conflicting", "tiny", "huge"])
def test_imtl_g_equals_the_papers_closed_form(kind: str, k: int) -> None:
    j = family(kind, k).double()
    out = imtl_g_weights(j @ j.T) @ j
    torch.testing.assert_close(out, naive_imtl_g(j), rtol=1e-8, atol=1e-10 * scale_of(j))


@pytest.mark.parametrize("leak", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["ordinary", "zero_row", "conflicting", "tiny", "huge"])
def test_graddrop_equals_the_naive_rule_with_the_same_uniforms(kind: str, leak: float) -> None:
    k = 3
    method = make("graddrop", k, leak=leak, seed=11)
    generator = torch.Generator().manual_seed(11)
    for step in range(2):
        j = family(kind, k, seed=step, dim=40)
        uniform = graddrop_uniform(generator, j.shape[1], j.device)
        out, _ = method.aggregate(j, names(k))
        expected = naive_graddrop(j, uniform, leak)
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6 * scale_of(j))


@pytest.mark.parametrize("c", [0.2, 0.5, 0.9, 2.0])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("kind", ["ordinary", "conflicting", "nearly_collinear", "tiny", "huge"])
def test_cagrad_equals_a_high_precision_face_enumeration(kind: str, k: int, c: float) -> None:
    j = family(kind, k, dim=6).double()
    out = cagrad_weights(j @ j.T, c) @ j
    expected = torch.tensor([float(x) for x in naive_cagrad(j, c)], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10 * scale_of(expected))


@pytest.mark.parametrize("k", [2, 3, 5, 10])
@pytest.mark.parametrize("kind", ["ordinary", "conflicting", "nearly_collinear", "tiny", "huge"])
def test_cagrad_solution_satisfies_the_kkt_conditions(kind: str, k: int) -> None:
    """Stationarity of the dual on the support of w, no better vertex off it, w on the
    simplex; and strong duality: min_i <g_i, d> equals the dual value."""
    c = 0.5
    j = family(kind, k, dim=30).double()
    gram = j @ j.T
    coef = cagrad_weights(gram, c)
    mean = torch.full((k,), 1.0 / k, dtype=torch.float64)
    g0 = mean @ j
    s = c * float(g0.norm())
    w = coef - mean
    w = w / w.sum()  # the simplex point: coef = 1/K + (s / ||g_w||) w
    assert float(w.min()) >= 0.0
    gw = w @ j
    slope = j @ g0 + s * (j @ gw) / float(gw.norm())
    support = w > 1e-12
    level = slope[support].mean()
    tol = 1e-9 * float(slope.abs().max())
    assert float((slope[support] - level).abs().max()) <= tol
    if bool((~support).any()):
        assert float((slope[~support] - level).min()) >= -tol
    d = coef @ j
    dual = float(w @ (j @ g0)) + s * float(gw.norm())
    assert float((j @ d).min()) == pytest.approx(dual, rel=1e-9, abs=1e-12 * scale_of(j) ** 2)


def test_gradnorm_weight_gradient_equals_autograd_of_the_paper_loss() -> None:
    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 6):
        w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        norms = torch.rand(k, generator=g, dtype=torch.float64) * 3
        losses = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
        initial = torch.rand(k, generator=g, dtype=torch.float64) + 1.0
        for alpha in (0.0, 0.5, 1.5, 3.0):
            got = gradnorm_weight_grad(w, norms, losses, initial, alpha)
            torch.testing.assert_close(got, naive_gradnorm_grad(w, norms, losses, initial, alpha))


# --- properties over the families --------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_output_is_finite(name: str, kind: str, k: int) -> None:
    method = make(name, k)
    for step in range(2):
        j = family(kind, k, seed=step)
        out, weights = method.aggregate(j, names(k))
        assert out.shape == (j.shape[1],) and weights.shape == (k,)
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(weights).all())
        if kind == "all_zero":
            assert not bool(out.any())


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_invariant_to_the_order_of_the_tasks(name: str, kind: str, k: int) -> None:
    """Same seed, rows (and their names) permuted: the same update, the weights permuted."""
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)).tolist()
    if perm == list(range(k)):
        perm = perm[::-1]
    straight, permuted = make(name, k), make(name, k)
    for step in range(3):
        j = family(kind, k, seed=step)
        out, weights = straight.aggregate(j, names(k))
        out_p, weights_p = permuted.aggregate(j[perm], [names(k)[i] for i in perm])
        tol = 1e-5 * max(scale_of(out), 1e-30)
        torch.testing.assert_close(out_p, out, rtol=1e-5, atol=tol)
        torch.testing.assert_close(weights_p, weights[perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factor", [1e-6, 1e6])
@pytest.mark.parametrize("kind", WELL_CONDITIONED)
@pytest.mark.parametrize("name", METHODS)
def test_scale_equivariance_of_the_update(name: str, kind: str, factor: float) -> None:
    """f(cJ) = c f(J) on the float32 rows the engine passes (rounding of cJ: ~1e-7)."""
    k = 4
    plain, scaled = make(name, k), make(name, k)
    for step in range(3):
        j = family(kind, k, seed=step)
        out, _ = plain.aggregate(j, names(k))
        out_c, _ = scaled.aggregate(j * factor, names(k))
        torch.testing.assert_close(
            out_c.double() / factor, out.double(), rtol=1e-4, atol=1e-4 * scale_of(out)
        )


@pytest.mark.parametrize("factor", [1e-6, 1e6])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_scale_invariance_of_the_weights(name: str, kind: str, factor: float) -> None:
    """On a float64 Gramian the weights are invariant to c^2 G to near machine precision,
    also where the update is ill-conditioned (nearly collinear rows)."""
    k = 4
    plain, scaled = make(name, k), make(name, k)
    assert isinstance(plain, GramianWeighting) and isinstance(scaled, GramianWeighting)
    for step in range(3):
        j = family(kind, k, seed=step).double()
        gram = j @ j.T
        weights = plain.weights_from_gramian(gram)
        torch.testing.assert_close(
            scaled.weights_from_gramian(gram * factor**2), weights, rtol=1e-7, atol=1e-9
        )


@pytest.mark.parametrize("kind", KINDS)
def test_pcgrad_with_two_tasks_conflicts_with_neither(kind: str) -> None:
    method = make("pcgrad", 2)
    for step in range(5):
        j = family(kind, 2, seed=step)
        out, _ = method.aggregate(j, names(2))
        for row in j:
            assert float(out.double() @ row.double()) >= -1e-6 * float(out.norm() * row.norm())


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("kind", ["ordinary", "conflicting", "nearly_collinear", "tiny", "huge"])
def test_cagrad_is_the_best_worst_case_in_its_ball(kind: str, k: int) -> None:
    """||d - g0|| = c ||g0|| and no point of the ball improves the worst task more."""
    c = 0.5
    j = family(kind, k, dim=20).double()
    d = cagrad_weights(j @ j.T, c) @ j
    g0 = j.mean(dim=0)
    radius = c * float(g0.norm())
    assert float((d - g0).norm()) == pytest.approx(radius, rel=1e-9)
    g = torch.Generator().manual_seed(k)
    directions = torch.randn(2000, j.shape[1], generator=g, dtype=torch.float64)
    lengths = torch.rand(2000, 1, generator=g, dtype=torch.float64) ** (1 / j.shape[1])
    points = g0 + radius * lengths * directions / directions.norm(dim=1, keepdim=True)
    best_sampled = float((points @ j.T).min(dim=1).values.max())
    assert float((j @ d).min()) >= best_sampled - 1e-12 * scale_of(j) ** 2


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("kind", ["ordinary", "zero_row", "conflicting", "tiny", "huge"])
def test_imtl_g_projections_on_the_task_directions_are_equal(kind: str, k: int) -> None:
    j = family(kind, k).double()
    weights = imtl_g_weights(j @ j.T)
    assert float(weights.sum()) == pytest.approx(1.0, rel=1e-12)
    d = weights @ j
    live = j.norm(dim=1) > 0
    proj = (j[live] @ d) / j[live].norm(dim=1)
    torch.testing.assert_close(proj, proj.mean().expand_as(proj), rtol=1e-9, atol=0.0)
    assert not bool(weights[~live].any())  # zero gradients get no weight


def test_imtl_g_singular_systems() -> None:
    g = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    # exactly opposite: the only combination with equal projections is 0, weights 1/2 each
    torch.testing.assert_close(
        imtl_g_weights(torch.cat([g, -g]) @ torch.cat([g, -g]).T),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
    )
    # same direction: every combination qualifies; the minimum-norm one is the mean
    j = torch.cat([g, 2 * g])
    torch.testing.assert_close(imtl_g_weights(j @ j.T), torch.tensor([0.5, 0.5]).double())
    # every gradient zero
    torch.testing.assert_close(
        imtl_g_weights(torch.zeros(3, 3, dtype=torch.float64)), torch.full((3,), 1 / 3).double()
    )


def test_cagrad_degenerate_cases() -> None:
    g = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    # a zero gradient is left out of the minimisation: same update as without it, g0 kept
    with_zero = torch.cat([g, torch.zeros(1, 3, dtype=torch.float64)])
    d = cagrad_weights(with_zero @ with_zero.T, 0.5) @ with_zero
    g0 = with_zero.mean(dim=0)
    assert float((d - g0).norm()) == pytest.approx(0.5 * float(g0.norm()), rel=1e-9)
    assert float((g @ d).min()) > 0
    # zero in the convex hull (g, -g, h with h orthogonal to g): F >= 0 on the simplex and
    # F = 0 at g_w = 0, so the formula is undefined; c >= 1 gives 0, c < 1 gives g0
    h = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    j = torch.cat([g[:1], -g[:1], h])
    torch.testing.assert_close(cagrad_weights(j @ j.T, 2.0), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(cagrad_weights(j @ j.T, 0.5), torch.full((3,), 1 / 3).double())
    # one task: (1 + c) g
    one = g[:1]
    torch.testing.assert_close(cagrad_weights(one @ one.T, 0.5), torch.tensor([1.5]).double())


@pytest.mark.parametrize("kind", ["ordinary", "zero_row", "conflicting", "tiny", "huge"])
def test_graddrop_keeps_one_sign_per_coordinate(kind: str) -> None:
    j = family(kind, 4, dim=200)
    out, _ = make("graddrop", 4).aggregate(j, names(4))
    positive = j.clamp_min(0).sum(dim=0)
    negative = j.clamp_max(0).sum(dim=0)
    tol = 1e-6 * scale_of(j)
    chose = ((out - positive).abs() <= tol) | ((out - negative).abs() <= tol)
    assert bool(chose.all())


def test_graddrop_keeps_positives_with_probability_equal_to_the_purity() -> None:
    # a column with purity 0.8: sum g = 3, sum |g| = 5
    j = torch.tensor([[4.0], [-1.0]]).repeat(1, 20000)
    out, _ = make("graddrop", 2, seed=5).aggregate(j, names(2))
    assert float((out > 0).float().mean()) == pytest.approx(0.8, abs=0.015)


def test_random_task_orders_are_uniform_and_keyed_by_task() -> None:
    generator = torch.Generator().manual_seed(0)
    counts: dict[tuple[int, ...], int] = {}
    draws = 3000
    for _ in range(draws):
        order = tuple(random_task_orders(generator, 4, [0, 1, 2, 3])[0])
        counts[order] = counts.get(order, 0) + 1
    assert len(counts) == 6
    for count in counts.values():
        assert count / draws == pytest.approx(1 / 6, abs=0.03)
    # the order a task visits the others in depends on which tasks they are, not on rows
    a = random_task_orders(torch.Generator().manual_seed(1), 4, [0, 1, 2, 3])
    b = random_task_orders(torch.Generator().manual_seed(1), 4, [2, 0, 3, 1])
    rows_of_b = [2, 0, 3, 1]
    for row_b, task in enumerate(rows_of_b):
        assert [rows_of_b[r] for r in b[row_b]] == a[task]


# --- subsets of tasks, levels, state, options ---------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_a_subset_of_the_tasks(name: str) -> None:
    method = make(name, 4)
    j = family("ordinary", 4)
    for tasks in (["t2", "t0"], ["t3"], ["t0", "t1", "t2", "t3"], ["t1", "t3", "t0"]):
        index = [int(t[1]) for t in tasks]
        out, weights = method.aggregate(j[index], tasks)
        assert bool(torch.isfinite(out).all()) and weights.shape == (len(tasks),)


def test_subset_uses_and_updates_only_the_present_pairs() -> None:
    gradvac = make("gradvac", 3, beta=0.5, seed=2)
    pcgrad = make("pcgrad", 3, seed=2)
    assert isinstance(gradvac, GradVac)
    j = family("conflicting", 3)
    gradvac.aggregate(j, names(3))
    before = gradvac.targets.clone()
    generator = torch.Generator().manual_seed(2)
    random_task_orders(generator, 3, [0, 1, 2])
    orders = random_task_orders(generator, 3, [2, 0])
    out, _ = gradvac.aggregate(j[[2, 0]], ["t2", "t0"])
    gram = j[[2, 0]].double() @ j[[2, 0]].double().T
    weights, new = gradvac_weights(gram, orders, before[[2, 0]][:, [2, 0]], 0.5)
    torch.testing.assert_close(out, (weights.float() @ j[[2, 0]]))
    after = gradvac.targets
    assert after[2, 0] == new[0, 1] and after[0, 2] == new[1, 0]
    untouched = [(0, 1), (1, 0), (1, 2), (2, 1)]
    assert all(after[a, b] == before[a, b] for a, b in untouched)
    # PCGrad: the orders of a subset come from the same keys
    pcgrad.aggregate(j, names(3))
    out, weights = pcgrad.aggregate(j[[2, 0]], ["t2", "t0"])
    torch.testing.assert_close(weights.double(), pcgrad_weights(gram, orders))


@pytest.mark.parametrize("name", METHODS)
def test_both_levels_are_accepted(name: str) -> None:
    for level in ("parameter", "feature"):
        method = make(name, 2, level=level)
        assert method.level == level
        assert method.needs_representation == (level == "feature")


def _roundtrip(method: nn.Module, fresh: nn.Module) -> None:
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "graddrop"])
def test_state_round_trip_gives_identical_next_outputs(name: str) -> None:
    k = 4
    method = make(name, k, seed=1)
    for step in range(3):
        method.aggregate(family("conflicting", k, seed=step), names(k))
    restored = make(name, k, seed=99)
    _roundtrip(method, restored)
    for step in range(3, 6):
        j = family("conflicting", k, seed=step, dim=50)
        out, weights = method.aggregate(j, names(k))
        out_r, weights_r = restored.aggregate(j, names(k))
        assert torch.equal(out, out_r) and torch.equal(weights, weights_r)


# --- GradNorm through the engine ---------------------------------------------------------


class _Problem:
    """Three quadratic task losses of one shared parameter vector."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.theta = nn.Parameter(torch.randn(5, generator=g))
        self.a = {t: torch.randn(3, 5, generator=g) for t in names(3)}
        self.y = {t: torch.randn(3, generator=g) for t in names(3)}

    def losses(self, tasks: Sequence[str], scale: float = 1.0) -> dict[str, Tensor]:
        return {t: scale * ((self.a[t] @ self.theta - self.y[t]) ** 2).mean() for t in tasks}

    def per_task_grads(self, tasks: Sequence[str]) -> Tensor:
        rows = []
        for t, loss in self.losses(tasks).items():
            (grad,) = torch.autograd.grad(loss, self.theta)
            rows.append(grad)
            del t
        return torch.stack(rows)

    def context(self, scaler: torch.amp.GradScaler | None = None) -> BackwardContext:
        return BackwardContext(shared_parameters=[self.theta], grad_scaler=scaler)


def _gradnorm_step(
    method: GradNorm, problem: _Problem, tasks: Sequence[str], scaler: torch.amp.GradScaler | None
) -> Tensor:
    method.weight.grad = None
    problem.theta.grad = None
    method.backward(problem.losses(tasks), problem.context(scaler))
    assert method.weight.grad is not None
    return method.weight.grad.clone()


def test_gradnorm_step_uses_the_current_weights_and_sets_their_gradient() -> None:
    problem = _Problem()
    method = make("gradnorm", 3, alpha=1.5)
    assert isinstance(method, GradNorm)
    with torch.no_grad():
        method.weight.copy_(torch.tensor([0.5, 1.0, 1.5]))
    tasks = names(3)
    jac = problem.per_task_grads(tasks)
    losses = torch.stack([v.detach() for v in problem.losses(tasks).values()])
    grad = _gradnorm_step(method, problem, tasks, None)
    assert problem.theta.grad is not None
    torch.testing.assert_close(problem.theta.grad, torch.tensor([0.5, 1.0, 1.5]) @ jac)
    # first step: L(0) = L, every rate is 1
    expected = naive_gradnorm_grad(method.weight, jac.norm(dim=1), losses, losses, 1.5)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.initial_losses, losses.double())


def test_gradnorm_initial_losses_per_task_and_subsets() -> None:
    problem = _Problem()
    method = make("gradnorm", 3)
    assert isinstance(method, GradNorm)
    first = {t: float(v.detach()) for t, v in problem.losses(["t0", "t2"]).items()}
    grad = _gradnorm_step(method, problem, ["t2", "t0"], None)
    assert grad[1] == 0.0  # t1 was not present: no gradient for its weight
    assert math.isnan(float(method.initial_losses[1]))
    with torch.no_grad():
        problem.theta.add_(0.1)
    later = {t: float(v.detach()) for t, v in problem.losses(names(3)).items()}
    _gradnorm_step(method, problem, names(3), None)
    assert float(method.initial_losses[0]) == pytest.approx(first["t0"])
    assert float(method.initial_losses[2]) == pytest.approx(first["t2"])
    assert float(method.initial_losses[1]) == pytest.approx(later["t1"])


def test_gradnorm_weight_gradient_is_scaled_with_the_loss_scale() -> None:
    plain = _gradnorm_step(make("gradnorm", 3), _Problem(), names(3), None)  # type: ignore[arg-type]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled = _gradnorm_step(make("gradnorm", 3), _Problem(), names(3), scaler)  # type: ignore[arg-type]
    torch.testing.assert_close(scaled, plain * 1024.0)


def test_gradnorm_renormalises_after_the_optimizer_step() -> None:
    method = make("gradnorm", 3)
    assert isinstance(method, GradNorm)
    assert GradNorm.lr == 0.025
    with torch.no_grad():
        method.weight.copy_(torch.tensor([2.0, 1.0, -0.5]))
    method.after_optimizer_step()
    torch.testing.assert_close(method.weight.detach(), torch.tensor([2.0, 1.0, 0.0]))
    with torch.no_grad():
        method.weight.copy_(torch.tensor([-1.0, -2.0, 0.0]))
    method.after_optimizer_step()
    torch.testing.assert_close(method.weight.detach(), torch.ones(3))


def test_gradnorm_learns_towards_equal_weighted_norms_with_alpha_zero() -> None:
    """alpha = 0 asks for equal w_k ||g_k||: gradient steps on w (then renormalisation)
    bring the weighted norms together, to within the step's oscillation."""
    method = make("gradnorm", 2, alpha=0.0)
    assert isinstance(method, GradNorm)
    j = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    method._step_losses = {"t0": torch.tensor(1.0).double(), "t1": torch.tensor(1.0).double()}
    method.initial_losses = torch.ones(2, dtype=torch.float64)
    for _ in range(100):
        method.aggregate(j, names(2))
        assert method._weight_grad is not None
        with torch.no_grad():
            method.weight.sub_(0.005 * method._weight_grad.float())
        method.after_optimizer_step()
    weighted = method.weight.detach() * torch.tensor([3.0, 1.0])
    assert float(weighted[0] / weighted[1]) == pytest.approx(1.0, abs=0.05)
    assert float(method.weight.detach().sum()) == pytest.approx(2.0)


def test_gradnorm_state_round_trip() -> None:
    problem = _Problem()
    method = make("gradnorm", 3)
    assert isinstance(method, GradNorm)
    for _ in range(3):
        grad = _gradnorm_step(method, problem, names(3), None)
        with torch.no_grad():
            method.weight.sub_(0.1 * grad)
        method.after_optimizer_step()
    restored = make("gradnorm", 3)
    _roundtrip(method, restored)
    assert isinstance(restored, GradNorm)
    assert torch.equal(restored.initial_losses, method.initial_losses)
    assert torch.equal(restored.weight, method.weight)
    assert torch.equal(
        _gradnorm_step(method, problem, names(3), None),
        _gradnorm_step(restored, problem, names(3), None),
    )


# --- options -----------------------------------------------------------------------------

BAD_OPTIONS: list[tuple[str, dict[str, object], str]] = [
    ("pcgrad", {"seed": -1}, "seed"),
    ("pcgrad", {"seed": 1.5}, "seed"),
    ("pcgrad", {"seed": True}, "seed"),
    ("gradvac", {"beta": 1.5}, "beta"),
    ("gradvac", {"beta": "fast"}, "beta"),
    ("graddrop", {"leak": -0.1}, "leak"),
    ("graddrop", {"leak": math.nan}, "leak"),
    ("cagrad", {"c": -1}, "c"),
    ("cagrad", {"rescale": 3}, "rescale"),
    ("gradnorm", {"alpha": -0.5}, "alpha"),
    ("imtl_g", {"level": "layer"}, "level"),
    ("cagrad", {"radius": 0.5}, "radius"),
]


@pytest.mark.parametrize(("name", "options", "key"), BAD_OPTIONS)
def test_bad_options_name_the_config_key(name: str, options: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"balancer.options.{key}"):
        call_with_options(
            BALANCERS.get(name), options, where="balancer.options", provided={"tasks": ["a"]}
        )


def test_options_from_yaml_text_are_accepted() -> None:
    build: Callable[..., object] = BALANCERS.get("cagrad")
    method = call_with_options(
        build,
        {"c": "1e-1", "level": "feature"},
        where="balancer.options",
        provided={"tasks": ["a", "b"]},
    )
    assert isinstance(method, CAGrad) and method.c == pytest.approx(0.1)
