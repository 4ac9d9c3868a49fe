"""MGDA, UPGrad, Nash-MTL and Aligned-MTL against exact references written here.

The references do not use polytask's solvers: KKT conditions checked on the output, a
brute-force solve of each QP that enumerates active sets in 50-digit arithmetic (mpmath),
mpmath's root finder for the Nash bargaining condition, and Aligned-MTL's formula applied
to an SVD of the Jacobian itself. Property tests run every method over seeded families of
Jacobians (ordinary, zero rows, all zero, 1e-6 and 1e6 scales, nearly collinear, strongly
conflicting, a small conflicting task) for K from 2 to 10.
"""

from __future__ import annotations

import itertools

import mpmath
import pytest
import torch
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation import MGDA
from polytask.balancing.aggregation._qp import dual_cone_weights, min_norm_weights, nnqp
from polytask.balancing.gradient import GramianWeighting
from polytask.errors import ConfigError
from polytask.registry import call_with_options

DPS = 50
KINDS = (
    "ordinary",
    "zero_row",
    "all_zero",
    "tiny",
    "huge",
    "nearly_collinear",
    "conflicting",
    "small_task",
)
SIZES = (2, 3, 5, 10)
METHODS = ("mgda", "upgrad", "nash_mtl", "aligned_mtl")


def family(kind: str, k: int, seed: int = 0, dim: int = 14) -> Tensor:
    """A K x dim float64 Jacobian of the given kind (rows linearly independent unless the
    kind says otherwise, so that every method's weights are unique)."""
    g = torch.Generator().manual_seed(1000 * k + seed)
    j = torch.randn(k, dim, generator=g, dtype=torch.float64)
    if kind == "zero_row":
        j[k // 2] = 0.0
    elif kind == "all_zero":
        j.zero_()
    elif kind == "tiny":
        j *= 1e-6
    elif kind == "huge":
        j *= 1e6
    elif kind == "nearly_collinear":
        j = torch.randn(1, dim, generator=g, dtype=torch.float64) + 1e-4 * j
    elif kind == "conflicting":
        j = j - 0.9 * j.mean(dim=0)
    elif kind == "small_task":
        j[0] = -1e-4 * j[1] + 1e-5 * torch.randn(dim, generator=g, dtype=torch.float64)
    return j


def weigher(name: str, k: int) -> GramianWeighting:
    method = BALANCERS.get(name)(tasks=[f"t{i}" for i in range(k)])
    assert isinstance(method, GramianWeighting)
    return method


def weights_of(name: str, j: Tensor) -> Tensor:
    return weigher(name, j.shape[0]).weights_from_gramian(j @ j.T)


# --- exact references -------------------------------------------------------------------


def _mp(g: Tensor) -> mpmath.matrix:
    return mpmath.matrix(g.tolist())


def brute_min_norm(g: Tensor) -> list[mpmath.mpf]:
    """MGDA's QP by enumerating supports S: on S the optimum solves the equality-constrained
    KKT system; it is optimal when w >= 0 and (G w)_j >= w^T G w off S."""
    k = g.shape[0]
    with mpmath.workdps(DPS):
        gm = _mp(g)
        for size in range(1, k + 1):
            for support in itertools.combinations(range(k), size):
                a = mpmath.matrix(size + 1, size + 1)
                for r, i in enumerate(support):
                    for c, j in enumerate(support):
                        a[r, c] = gm[i, j]
                    a[r, size] = -1
                    a[size, r] = 1
                rhs = mpmath.matrix([0] * size + [1])
                try:
                    sol = mpmath.lu_solve(a, rhs)
                except ZeroDivisionError:
                    continue
                w = [mpmath.mpf(0)] * k
                for r, i in enumerate(support):
                    w[i] = sol[r]
                value = sol[size]
                if any(x < -(mpmath.mpf(10) ** -30) for x in w):
                    continue
                gw = [mpmath.fsum(gm[i, j] * w[j] for j in range(k)) for i in range(k)]
                if all(gw[i] >= value * (1 - mpmath.mpf(10) ** -25) for i in range(k)):
                    return w
    raise AssertionError("no support satisfies the KKT conditions")


def brute_dual_cone(g: Tensor, i: int) -> list[mpmath.mpf]:
    """argmin_{u >= e_i} u^T G u by enumerating the set P of constraints u_j > (e_i)_j."""
    k = g.shape[0]
    others = [j for j in range(k) if j != i]
    with mpmath.workdps(DPS):
        gm = _mp(g)
        for size in range(k):
            for free in itertools.combinations(others, size):
                u = [mpmath.mpf(1 if j == i else 0) for j in range(k)]
                if free:
                    a = mpmath.matrix([[gm[p, q] for q in free] for p in free])
                    rhs = mpmath.matrix([-gm[p, i] for p in free])
                    try:
                        lam = mpmath.lu_solve(a, rhs)
                    except ZeroDivisionError:
                        continue
                    if any(x <= 0 for x in lam):
                        continue
                    for r, p in enumerate(free):
                        u[p] += lam[r]
                mu = [mpmath.fsum(gm[p, q] * u[q] for q in range(k)) for p in range(k)]
                scale = max(abs(gm[p, p]) for p in range(k))
                if all(mu[p] >= -scale * mpmath.mpf(10) ** -30 for p in range(k)):
                    return u
    raise AssertionError("no active set satisfies the KKT conditions")


def mp_bargaining(g: Tensor, start: Tensor) -> list[mpmath.mpf]:
    """The positive root of alpha_i (G alpha)_i = 1, polished to 50 digits by mpmath's
    multidimensional Newton method in log-coordinates (alpha = exp(y), so every root it
    finds is positive; the positive root is unique, being the minimiser of the strictly
    convex alpha^T G alpha / 2 - sum log alpha)."""
    k = g.shape[0]
    with mpmath.workdps(DPS):
        gm = _mp(g)

        def equations(*y: mpmath.mpf) -> list[mpmath.mpf]:
            a = [mpmath.exp(v) for v in y]
            return [a[i] * mpmath.fsum(gm[i, j] * a[j] for j in range(k)) - 1 for i in range(k)]

        root = mpmath.findroot(equations, [mpmath.log(float(a)) for a in start])
        return [mpmath.exp(root[i]) for i in range(k)]


def aligned_by_svd(j: Tensor, cutoff: float = 1e-10) -> Tensor:
    """The paper's update sum of the rows of sigma_min V U^T, from the SVD of J itself
    (singular values below ``cutoff * sigma_max`` dropped)."""
    v, s, uh = torch.linalg.svd(j, full_matrices=False)
    keep = s > s.max() * cutoff
    v, s, uh = v[:, keep], s[keep], uh[keep]
    aligned = s.min() * v @ uh
    return aligned.sum(dim=0)


def to_tensor(values: list[mpmath.mpf]) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


# --- KKT checks -------------------------------------------------------------------------


def assert_mgda_kkt(g: Tensor, w: Tensor, tol: float = 1e-12) -> None:
    """w >= 0, sum 1, (G w)_i >= w^T G w with equality where w_i > 0."""
    scale = float(g.diagonal().max())
    gw = g @ w
    value = float(w @ gw)
    assert bool((w >= 0).all()), w
    assert abs(float(w.sum()) - 1) < 1e-12
    assert float((value - gw).max()) <= tol * scale
    assert float(((gw - value) * w).abs().max()) <= tol * scale


def assert_dual_cone_kkt(g: Tensor, u: Tensor, i: int, tol: float = 1e-12) -> None:
    """u >= e_i, mu = G u >= 0, mu_j = 0 where u_j > (e_i)_j (mu_j relative to its scale
    |g_j| sum_q |u_q| |g_q|)."""
    e = torch.zeros_like(u)
    e[i] = 1.0
    norms = g.diagonal().clamp_min(0).sqrt()
    magnitude = norms * float((u.abs() * norms).sum()) + 1e-300
    mu = g @ u
    assert bool((u >= e - 1e-15).all()), u
    assert float((-mu / magnitude).max()) <= tol
    assert float(torch.where(u > e, mu / magnitude, 0.0).abs().max()) <= tol


def nash_residual(g: Tensor, alpha: Tensor) -> float:
    """max_i |alpha_i (G alpha)_i - 1| in 50-digit arithmetic."""
    with mpmath.workdps(DPS):
        gm = _mp(g)
        a = [mpmath.mpf(float(x)) for x in alpha]
        k = len(a)
        return float(
            max(abs(a[i] * mpmath.fsum(gm[i, j] * a[j] for j in range(k)) - 1) for i in range(k))
        )


# --- the QP solvers against brute force -------------------------------------------------


@pytest.mark.parametrize("kind", ["ordinary", "conflicting", "tiny", "huge", "small_task"])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_min_norm_equals_the_brute_force_solution(kind: str, k: int) -> None:
    for seed in range(3):
        j = family(kind, k, seed)
        g = j @ j.T
        w = min_norm_weights(g)
        assert_mgda_kkt(g, w)
        expected = to_tensor(brute_min_norm(g))
        torch.testing.assert_close(w, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["ordinary", "conflicting", "tiny", "huge", "small_task"])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_dual_cone_projection_equals_the_brute_force_solution(kind: str, k: int) -> None:
    for seed in range(3):
        j = family(kind, k, seed)
        g = j @ j.T
        u = dual_cone_weights(g)
        for i in range(k):
            assert_dual_cone_kkt(g, u[i], i)
            expected = to_tensor(brute_dual_cone(g, i))
            torch.testing.assert_close(u[i], expected, rtol=1e-9, atol=1e-12)


def test_qp_solvers_on_rank_deficient_gramians_without_a_ridge() -> None:
    """More tasks than dimensions, duplicated and opposite rows: G is singular."""
    g0 = torch.Generator().manual_seed(7)
    for k in (3, 5, 8):
        j = torch.randn(k, 2, generator=g0, dtype=torch.float64)
        j = torch.cat([j, j[:1], -j[1:2]])
        g = j @ j.T
        w = min_norm_weights(g)
        assert_mgda_kkt(g, w)
        u = dual_cone_weights(g)
        for i in range(j.shape[0]):
            assert_dual_cone_kkt(g, u[i], i, tol=1e-10)


def test_collinear_rows_give_the_exact_answer() -> None:
    base = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    j = torch.cat([base, 3 * base, 0.5 * base])  # one direction, three norms
    g = j @ j.T
    w = min_norm_weights(g)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    # no conflicts: every gradient is its own projection
    torch.testing.assert_close(dual_cone_weights(g), torch.eye(3, dtype=torch.float64))


def test_nnqp_batches_independent_problems() -> None:
    g0 = torch.Generator().manual_seed(3)
    a = torch.randn(6, 4, generator=g0, dtype=torch.float64)
    q = a.T @ a
    lin = torch.randn(5, 4, generator=g0, dtype=torch.float64)
    together = nnqp(q, lin)
    for b in range(5):
        torch.testing.assert_close(together[b], nnqp(q, lin[b : b + 1])[0])
        x = together[b]
        grad = q @ x + lin[b]
        assert bool((x >= 0).all())
        assert float(grad.min()) >= -1e-12
        assert float((grad * x).abs().max()) <= 1e-12


def test_nnqp_warns_when_its_iteration_guard_is_hit() -> None:
    q = torch.eye(3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="active-set QP solver stopped"):
        x = nnqp(q, -torch.ones(1, 3, dtype=torch.float64), max_iter=1)
    assert bool((x >= 0).all())


# --- the methods against their exact references -----------------------------------------


@pytest.mark.parametrize("k", [2, 3, 4])
def test_nash_mtl_equals_mpmath_root(k: int) -> None:
    for seed in range(3):
        for kind in ("ordinary", "tiny", "huge", "conflicting"):
            j = family(kind, k, seed)
            g = j @ j.T
            alpha = weights_of("nash_mtl", j)
            assert nash_residual(g, alpha) <= 1e-10
            expected = to_tensor(mp_bargaining(g, start=alpha))
            torch.testing.assert_close(alpha, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", ["ordinary", "tiny", "huge", "zero_row", "nearly_collinear"])
@pytest.mark.parametrize("k", SIZES)
def test_aligned_mtl_equals_the_svd_formula(kind: str, k: int) -> None:
    j = family(kind, k)
    if kind == "nearly_collinear":  # well above the rank cut-off
        j = family("ordinary", k) + 3.0 * family("ordinary", 1, seed=1)
    d = weights_of("aligned_mtl", j) @ j
    expected = aligned_by_svd(j)
    scale = float(j.norm(dim=1).max())
    torch.testing.assert_close(d / scale, expected / scale, rtol=0, atol=1e-10)


def test_aligned_mtl_drops_directions_below_the_rank_cut_off() -> None:
    """Rank 2 among 3 tasks: sigma_min is the smallest non-zero singular value."""
    j = family("ordinary", 2)
    j = torch.cat([j, (j[0] + 2 * j[1])[None]])
    d = weights_of("aligned_mtl", j) @ j
    torch.testing.assert_close(d, aligned_by_svd(j), rtol=1e-10, atol=1e-10)
    assert bool(torch.isfinite(d).all())


def test_aligned_mtl_rank_cut_off_is_the_official_codes_for_float32_gradients() -> None:
    """For float32 gradients, eigenvalues of G below K eps_float32 lambda_max count as zero
    (the official code, which trains in float32), i.e. singular values below
    sqrt(K eps_float32) sigma_max: a task whose own direction is that weak is aligned within
    the others' span. The option ``rank_eps`` sets the same cut-off for any dtype."""
    eps32 = float(torch.finfo(torch.float32).eps)
    for k in (2, 3, 5):
        j = family("small_task", k)  # its independent component: ~1e-5 of the largest row
        cutoff = (k * eps32) ** 0.5
        scale = float(j.norm(dim=1).max())
        expected = aligned_by_svd(j, cutoff)
        method = BALANCERS.get("aligned_mtl")(tasks=[f"t{i}" for i in range(k)], rank_eps=eps32)
        d = method.weights_from_gramian(j @ j.T) @ j
        torch.testing.assert_close(d / scale, expected / scale, rtol=0, atol=1e-10)
        assert float((d - aligned_by_svd(j)).norm()) > 1e-3 * scale
        # float32 gradients through the engine: the float32 cut-off, without the option
        j32 = j.float()
        d32, _ = weigher("aligned_mtl", k).aggregate(j32, [f"t{i}" for i in range(k)])
        expected32 = aligned_by_svd(j32.double(), cutoff)
        torch.testing.assert_close(d32.double() / scale, expected32 / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ratio", [1e-11, 1e-10, 1e-9])
def test_aligned_mtl_keeps_real_float64_directions(ratio: float) -> None:
    """Near-collinear float64 gradients whose Gramian's eigenvalue ratio is 1e-11 .. 1e-9:
    far above float64's rounding, so every direction is real and the update is the paper's
    formula with nothing cut (a float32 cut-off kept one direction of K and returned an
    update 1e4-1e5 times too long)."""
    g = torch.Generator().manual_seed(7)
    k, dim = 4, 14
    base = torch.randn(1, dim, generator=g, dtype=torch.float64)
    j = base.repeat(k, 1) + ratio**0.5 * torch.randn(k, dim, generator=g, dtype=torch.float64)
    eigenvalues = torch.linalg.eigvalsh(j @ j.T)
    assert float(eigenvalues.min() / eigenvalues.max()) > 1e-13  # no float64 rounding here
    d, _ = weigher("aligned_mtl", k).aggregate(j, [f"t{i}" for i in range(k)])
    expected = aligned_by_svd(j, cutoff=0.0)
    scale = float(expected.norm())
    # weights from a Gramian of condition number 1 / ratio: float64 rounding times that
    bound = 100 * float(torch.finfo(torch.float64).eps) / ratio
    torch.testing.assert_close(d / scale, expected / scale, rtol=0, atol=bound)
    # what the float32 cut-off computed instead: one direction kept, far from the formula
    cut = aligned_by_svd(j, (k * float(torch.finfo(torch.float32).eps)) ** 0.5)
    assert float((cut - expected).norm()) > 0.5 * scale


def test_aligned_mtl_rank_eps_option_is_checked() -> None:
    from polytask.errors import ConfigError

    for bad in (-1.0, 1.0, True, "small", float("nan")):
        with pytest.raises(ConfigError, match="rank_eps"):
            BALANCERS.get("aligned_mtl")(tasks=["a", "b"], rank_eps=bad)


def test_upgrad_weights_are_the_mean_of_exact_projections() -> None:
    for k in (2, 3, 4):
        j = family("conflicting", k)
        g = j @ j.T
        expected = torch.stack([to_tensor(brute_dual_cone(g, i)) for i in range(k)]).mean(0)
        torch.testing.assert_close(weights_of("upgrad", j), expected, rtol=1e-9, atol=1e-12)


#: J0 and the weights of each method, computed once by the references above (brute force
#: and mpmath.findroot in 50 digits; Aligned-MTL from the SVD of J0) and pinned here. MGDA
#: and UPGrad are rational for this integer Gramian.
J0 = torch.tensor(
    [[1.0, 2.0, 0.0, -1.0], [-2.0, 1.0, 1.0, 0.0], [1.0, -3.0, 2.0, 1.0]], dtype=torch.float64
)
PINNED: dict[str, list[float]] = {
    "mgda": [3 / 7, 2 / 7, 2 / 7],
    "upgrad": [7 / 9, 31 / 54, 16 / 27],
    "nash_mtl": [0.7596712258055427, 0.5650816586925721, 0.5402780712340555],
    "aligned_mtl": [1.1404199444343754, 0.8879003868571217, 0.8585084978437225],
}


@pytest.mark.parametrize("name", METHODS)
def test_pinned_values(name: str) -> None:
    torch.testing.assert_close(
        weights_of(name, J0),
        torch.tensor(PINNED[name], dtype=torch.float64),
        rtol=1e-12,
        atol=1e-14,
    )


# --- properties over the families -------------------------------------------------------


def _combined(name: str, j: Tensor) -> tuple[Tensor, Tensor]:
    w = weights_of(name, j)
    return w, w @ j


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("name", METHODS)
def test_finite_and_invariant_to_the_order_of_tasks(name: str, k: int, kind: str) -> None:
    j = family(kind, k)
    w, d = _combined(name, j)
    assert bool(torch.isfinite(w).all()) and bool(torch.isfinite(d).all())
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    w_perm, d_perm = _combined(name, j[perm])
    scale = float(j.norm(dim=1).max()) or 1.0
    # the combined gradient is unique; the weights are too for these families, to float64
    # rounding times the Gramian's condition number (Aligned-MTL keeps the small task's
    # 1e-10 eigenvalue ratio of float64 gradients)
    torch.testing.assert_close(d_perm / scale, d / scale, rtol=0, atol=1e-9)
    eigenvalues = torch.linalg.eigvalsh(j @ j.T)
    condition = float(eigenvalues.max() / eigenvalues.min()) if eigenvalues.min() > 0 else 1.0
    rtol = max(1e-6, 100 * float(torch.finfo(torch.float64).eps) * condition)
    torch.testing.assert_close(w_perm, w[perm], rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("factor", [1e-6, 1e6])
@pytest.mark.parametrize("kind", ["ordinary", "zero_row", "conflicting", "small_task"])
@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("name", METHODS)
def test_scale_equivariance(name: str, k: int, kind: str, factor: float) -> None:
    """w(cJ) = w(J), so d(cJ) = c d(J); Nash-MTL: alpha(cJ) = alpha(J) / c, d(cJ) = d(J)."""
    j = family(kind, k)
    w = weights_of(name, j)
    w_scaled = weights_of(name, factor * j)
    if name == "nash_mtl":
        w_scaled = w_scaled * factor
    torch.testing.assert_close(w_scaled, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("name", ["mgda", "upgrad", "nash_mtl"])
def test_the_combined_gradient_conflicts_with_no_task(name: str, k: int, kind: str) -> None:
    """MGDA: g_i . d >= |d|^2; UPGrad: g_i . d >= 0; Nash-MTL: g_i . d = 1/alpha_i > 0."""
    j = family(kind, k)
    w, d = _combined(name, j)
    norms = j.norm(dim=1)
    # rounding bound for g_i . d computed as g_i . (sum_q w_q g_q)
    slack = 1e-12 * norms * float((w.abs() * norms).sum()) + 1e-300
    products = j @ d
    if name == "mgda":
        assert bool((products >= float(d @ d) - slack).all()), products
    else:
        assert bool((products >= -slack).all()), products
    if name == "nash_mtl":
        nonzero = norms > 0
        torch.testing.assert_close(
            products[nonzero] * w[nonzero],
            torch.ones(int(nonzero.sum()), dtype=torch.float64),
            rtol=0,
            atol=1e-9,
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", SIZES)
def test_mgda_and_upgrad_meet_their_kkt_conditions(k: int, kind: str) -> None:
    j = family(kind, k)
    g = j @ j.T
    assert_mgda_kkt(g, weights_of("mgda", j), tol=1e-10)
    u = dual_cone_weights(g)
    for i in range(k):
        assert_dual_cone_kkt(g, u[i], i, tol=1e-10)


def test_degenerate_conventions() -> None:
    zero = torch.zeros(3, 3, dtype=torch.float64)
    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(weigher("mgda", 3).weights_from_gramian(zero), third)
    torch.testing.assert_close(weigher("upgrad", 3).weights_from_gramian(zero), third)
    torch.testing.assert_close(weigher("nash_mtl", 3).weights_from_gramian(zero), zero[0])
    torch.testing.assert_close(weigher("aligned_mtl", 3).weights_from_gramian(zero), zero[0] + 1)
    # a zero gradient puts the min-norm point at 0: MGDA's weight goes to that task
    j = family("zero_row", 3)
    torch.testing.assert_close(weights_of("mgda", j), torch.tensor([0.0, 1.0, 0.0]).double())
    # and takes no part in Nash-MTL's bargaining
    alpha = weights_of("nash_mtl", j)
    assert float(alpha[1]) == 0.0
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(alpha[keep], weights_of("nash_mtl", j[keep]))
    # a single task: its own gradient (Nash-MTL: of unit norm, alpha |g|^2 = 1/alpha)
    one = family("ordinary", 1)
    for name in ("mgda", "upgrad", "aligned_mtl"):
        torch.testing.assert_close(weights_of(name, one), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(weights_of("nash_mtl", one), 1 / one.norm(dim=1))


# --- options, levels, the engine path ----------------------------------------------------


def test_mgda_normalizations() -> None:
    j = family("ordinary", 3) * torch.tensor([[1.0], [10.0], [0.1]], dtype=torch.float64)
    g = j @ j.T
    norms = j.norm(dim=1)
    unit = j / norms[:, None]
    l2 = MGDA(["a", "b", "c"], normalization="l2").weights_from_gramian(g)
    torch.testing.assert_close(l2, min_norm_weights(unit @ unit.T))
    losses = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    by_loss = MGDA(["a", "b", "c"], normalization="loss").weights_from_gramian(g, losses)
    scaled = j / losses[:, None]
    torch.testing.assert_close(by_loss, min_norm_weights(scaled @ scaled.T))
    plus = MGDA(["a", "b", "c"], normalization="loss+").weights_from_gramian(g, losses)
    scaled = j / (losses * norms)[:, None]
    torch.testing.assert_close(plus, min_norm_weights(scaled @ scaled.T))
    with pytest.raises(ConfigError, match=r"balancer.options.normalization=loss: the losses"):
        MGDA(["a", "b", "c"], normalization="loss").weights_from_gramian(g, -losses)
    with pytest.raises(ValueError, match="needs the task losses"):
        MGDA(["a", "b", "c"], normalization="loss").weights_from_gramian(g)


@pytest.mark.parametrize(
    ("name", "options", "key"),
    [
        ("mgda", {"normalization": "l1"}, "normalization"),
        ("aligned_mtl", {"reduction": "max"}, "reduction"),
        ("aligned_mtl", {"scale_mode": "max"}, "scale_mode"),
        ("nash_mtl", {"max_iter": 0}, "max_iter"),
        ("nash_mtl", {"max_iter": 2.5}, "max_iter"),
        ("nash_mtl", {"tol": 0}, "tol"),
        ("nash_mtl", {"tol": "small"}, "tol"),
        ("nash_mtl", {"update_weights_every": 0}, "update_weights_every"),
        ("nash_mtl", {"max_norm": -1.0}, "max_norm"),
        ("nash_mtl", {"on_failure": "ignore"}, "on_failure"),
        ("upgrad", {"level": "loss"}, "level"),
        ("upgrad", {"pref_vector": [1, 2]}, "pref_vector"),
    ],
)
def test_bad_options_name_the_config_key(name: str, options: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"balancer\.options\.{key}"):
        call_with_options(
            BALANCERS.get(name), options, where="balancer.options", provided={"tasks": ["a"]}
        )


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("level", ["parameter", "feature"])
def test_every_method_takes_level_and_a_subset_of_tasks(name: str, level: str) -> None:
    method = call_with_options(
        BALANCERS.get(name),
        {"level": level},
        where="balancer.options",
        provided={"tasks": ["a", "b", "c"]},
    )
    assert isinstance(method, GramianWeighting)
    assert method.level == level and method.needs_representation == (level == "feature")
    j = family("ordinary", 3).float()
    for tasks in (["a", "b", "c"], ["a", "c"], ["b"]):
        rows = j[[["a", "b", "c"].index(t) for t in tasks]]
        combined, weights = method.aggregate(rows, tasks)
        assert combined.shape == (j.shape[1],) and weights.shape == (len(tasks),)
        assert combined.dtype == torch.float32
        assert bool(torch.isfinite(combined).all())
        expected = weights_of(name, rows.double()).float() @ rows
        torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
        ),
    ],
)
@pytest.mark.parametrize("name", METHODS)
def test_weights_come_back_on_the_gramians_device(name: str, device: str) -> None:
    """The solvers run on the CPU (K x K) and return the weights on the Gramian's device."""
    j = family("conflicting", 4)
    w = weigher(name, 4).weights_from_gramian((j @ j.T).to(device))
    assert w.device.type == device and w.dtype == torch.float64
    torch.testing.assert_close(w.cpu(), weights_of(name, j))
