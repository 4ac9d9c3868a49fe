"""The NumPy active-set QP solver against the torch implementation it replaced.

``_torch_nnqp`` is a verbatim copy of the torch ``nnqp`` of
:mod:`polytask.balancing.aggregation._qp` before its internals moved to NumPy;
``_torch_correlation``, ``_torch_min_norm_weights`` and ``_torch_dual_cone_weights`` are the
torch compositions of the same time (minus the thread setting). They are the reference on
seeded problems of both forms the module solves, MGDA's ``q = C + a a^T``, ``lin = -a`` and
UPGrad's ``q = C``, ``lin = C`` (K problems at once), for K in {1, 2, 3, 5, 10, 40} and five
families of Jacobians: ordinary, nearly collinear, rank-deficient, conflicting (many
negative correlations) and with exact duplicate rows.

Tolerance ``rtol=1e-9``, ``atol=1e-12``, not bitwise: the algorithm, its decisions and its
elementwise operations are the same, but the matrix products and the factorisations are
different BLAS/LAPACK calls (torch's MKL ``potrf``/``potrs`` on n x n identity-padded
systems, NumPy's OpenBLAS ``potrf`` and two LU-based triangular solves on the passive block),
whose roundings differ in the last bits. The correlation matrix is not bitwise equal either:
NumPy's square root is correctly rounded and torch's CPU one is not always (1 ulp off on
about 1% of the inputs), so the norms can differ by an ulp and ``C`` by a few.

With exact duplicate rows the solution is not unique: duplicated columns of ``q`` give
exactly tied dual values, and which copy enters is decided by the last bit of ``x q``,
which the two BLAS round differently. For that family the comparison is on what is unique:
the coefficients summed over each group of identical rows (``J^T u`` and MGDA's direction
depend on nothing else; the distinct rows are independent) and the gradient ``q x + lin``.
Besides the comparison, the KKT conditions of every solution are checked directly.

``min_norm_weights`` and ``dual_cone_weights`` now take SciPy's NNLS first (checked, with the
active-set method behind it); their tests compare what is unique and check optimality, and
two tests pin the fast path (it answers every seeded problem) and the fallback (a failing or
wrong NNLS answer is caught and re-solved).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from helpers import seeded_jacobian
from polytask.balancing.aggregation import _qp
from polytask.balancing.aggregation._qp import (
    correlation,
    dual_cone_weights,
    min_norm_weights,
    nnqp,
)

RTOL = 1e-9
ATOL = 1e-12
KS = [1, 2, 3, 5, 10, 40]
KINDS = ["ordinary", "nearly_collinear", "rank_deficient", "conflicting", "duplicates"]
SEEDS = range(3)

_EPS = float(torch.finfo(torch.float64).eps)


# --- the torch oracle -------------------------------------------------------------------


def _torch_correlation(gramian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    g = gramian.detach().to(device="cpu", dtype=torch.float64)
    g = (g + g.T) / 2
    norms = g.diagonal().clamp_min(0.0).sqrt()
    nonzero = norms > 0
    n = norms[nonzero]
    c = (g[nonzero][:, nonzero] / (n[:, None] * n[None, :])).clamp(-1.0, 1.0)
    c.fill_diagonal_(1.0)
    return norms, nonzero, c


def _torch_nnqp(q: Tensor, lin: Tensor, max_iter: int | None = None) -> Tensor:
    """The torch ``nnqp`` of before the NumPy port, verbatim (the oracle)."""
    b, n = lin.shape
    limit = 10 * n + 20 if max_iter is None else max_iter
    x = lin.new_zeros(b, n)
    passive = torch.zeros(b, n, dtype=torch.bool)
    skipped = torch.zeros(b, n, dtype=torch.bool)
    done = torch.zeros(b, dtype=torch.bool)
    inner = torch.zeros(b, dtype=torch.bool)
    entering = torch.zeros(b, dtype=torch.bool)
    t = torch.zeros(b, dtype=torch.long)
    identity = torch.eye(n, dtype=torch.bool)
    abs_q, abs_lin = q.abs(), lin.abs()
    rows = torch.arange(b)
    stuck = torch.zeros(b, dtype=torch.bool)
    for _ in range(limit):
        outer = ~done & ~inner
        if bool(outer.any()):
            dual = -(x @ q + lin)
            tol = 16 * n * _EPS * (x.abs() @ abs_q + abs_lin)
            candidates = outer[:, None] & ~passive & ~skipped & (dual > tol)
            found = candidates.any(dim=1)
            done |= outer & ~found
            new = outer & found
            t = torch.where(new, torch.where(candidates, dual, -torch.inf).argmax(dim=1), t)
            passive[rows[new], t[new]] = True
            inner |= new
            entering = new
        active = ~done & inner
        if not bool(active.any()):
            if bool(stuck.any()):
                warnings.warn(
                    "the active-set QP solver met a numerically singular subproblem and kept "
                    "its last feasible iterate, which may not be optimal",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return x
        both = passive[:, :, None] & passive[:, None, :]
        system = torch.where(both, q, 0.0) + (identity & ~passive[:, None, :]).to(q.dtype)
        factor, info = torch.linalg.cholesky_ex(system)
        rhs = torch.where(passive, -lin, 0.0)[:, :, None]
        z = torch.where(passive, torch.cholesky_solve(rhs, factor)[:, :, 0], 0.0)
        failed = active & (info != 0)
        accept = active & ~failed & ((z > 0) | ~passive).all(dim=1)
        x = torch.where(accept[:, None], z, x)
        inner &= ~accept
        z_t = z[rows, t]
        undo = active & ~accept & entering & (failed | (z_t <= 0))
        passive[rows[undo], t[undo]] = False
        skipped[rows[undo], t[undo]] = True
        inner &= ~undo
        # a failed solve after the first one (a subset of a positive definite system) is
        # rounding at its worst: keep the feasible iterate, and say so
        stuck |= active & failed & ~undo
        done |= stuck
        move = active & ~accept & ~undo & ~failed
        if bool(move.any()):
            blocking = move[:, None] & passive & (z <= 0)
            ratio = torch.where(blocking, x / (x - torch.where(blocking, z, -1.0)), torch.inf)
            step, k = ratio.min(dim=1)
            stepped = x + step.clamp(max=1.0)[:, None] * (z - x)
            stepped[rows, k] = 0.0
            leaving = move[:, None] & passive & (stepped <= 0)
            x = torch.where(move[:, None], stepped.clamp_min(0.0), x)
            passive &= ~leaving
        skipped &= ~(accept | move)[:, None]
        entering &= ~active
    warnings.warn(
        f"the active-set QP solver stopped after {limit} subproblem solves without meeting "
        "its optimality test; the result is feasible but may not be optimal",
        RuntimeWarning,
        stacklevel=2,
    )
    return x


def _torch_min_norm_weights(gramian: Tensor) -> Tensor:
    norms, nonzero, c = _torch_correlation(gramian)
    if not bool(nonzero.all()):
        zero = (~nonzero).to(torch.float64)
        return zero / zero.sum()
    a = norms.min() / norms
    v = _torch_nnqp(c + a[:, None] * a[None, :], -a[None, :])[0]
    w = v / norms
    return w / w.sum()


def _torch_dual_cone_weights(gramian: Tensor) -> Tensor:
    k = gramian.shape[0]
    norms, nonzero, c = _torch_correlation(gramian)
    out = torch.zeros(k, k, dtype=torch.float64)
    idx = nonzero.nonzero().squeeze(1)
    zero = (~nonzero).nonzero().squeeze(1)
    out[zero, zero] = 1.0
    if idx.numel() > 0:
        u = torch.eye(idx.numel(), dtype=torch.float64) + _torch_nnqp(c, c)
        n = norms[idx]
        out[idx[:, None], idx[None, :]] = n[:, None] * u / n[None, :]
    return out


# --- problems ---------------------------------------------------------------------------


def jacobian(kind: str, k: int, seed: int, dim: int = 64) -> Tensor:
    return seeded_jacobian(kind, k, seed, dim)


def gramian(kind: str, k: int, seed: int) -> Tensor:
    j = jacobian(kind, k, seed)
    return j @ j.T


def groups(kind: str, k: int) -> Tensor:
    """The K x m indicator of the groups of identical rows (the identity but for duplicates)."""
    if kind != "duplicates":
        return torch.eye(k, dtype=torch.float64)
    m = max(1, (k + 1) // 2)
    return (torch.arange(k)[:, None] % m == torch.arange(m)[None, :]).to(torch.float64)


def mgda_problem(g: Tensor) -> tuple[Tensor, Tensor]:
    norms, _, c = _torch_correlation(g)
    a = norms.min() / norms
    return c + a[:, None] * a[None, :], -a[None, :]


def upgrad_problem(g: Tensor) -> tuple[Tensor, Tensor]:
    _, _, c = _torch_correlation(g)
    return c, c


def assert_kkt(q: Tensor, lin: Tensor, x: Tensor) -> None:
    """``x`` is feasible, its dual values ``-(q x + lin)`` are <= 0 and complementary to it,
    up to rounding (relative to the magnitudes of the terms)."""
    grad = x @ q + lin
    tol = 1e-10 * (x.abs() @ q.abs() + lin.abs())
    assert bool((x >= 0).all())
    assert bool((grad >= -tol).all()), float((-grad - tol).max())
    assert bool((grad.abs() <= tol)[x > 0].all()), float((grad.abs() - tol)[x > 0].max())


def cases() -> Iterator[tuple[str, int, int]]:
    for kind in KINDS:
        for k in KS:
            for seed in SEEDS:
                yield kind, k, seed


# --- the solver against the oracle ------------------------------------------------------


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("kind", KINDS)
def test_correlation_is_bitwise_the_torch_one(kind: str, k: int) -> None:
    for seed in SEEDS:
        g = gramian(kind, k, seed)
        norms, nonzero, c = correlation(g)
        norms_old, nonzero_old, c_old = _torch_correlation(g)
        assert norms.dtype == c.dtype == torch.float64 and nonzero.dtype == torch.bool
        assert norms.device == nonzero.device == c.device == torch.device("cpu")
        # NumPy's square root is correctly rounded; torch's may be one ulp off
        assert norms.tolist() == [math.sqrt(v) for v in g.diagonal().tolist()]
        torch.testing.assert_close(norms, norms_old, rtol=2 * _EPS, atol=0.0)
        assert torch.equal(nonzero, nonzero_old)
        torch.testing.assert_close(c, c_old, rtol=8 * _EPS, atol=8 * _EPS)


@pytest.mark.parametrize("form", ["mgda", "upgrad"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("kind", KINDS)
def test_nnqp_matches_the_torch_solver(kind: str, k: int, form: str) -> None:
    problem = mgda_problem if form == "mgda" else upgrad_problem
    for seed in SEEDS:
        q, lin = problem(gramian(kind, k, seed))
        x, x_old = nnqp(q, lin), _torch_nnqp(q, lin)
        assert x.dtype == torch.float64 and x.device.type == "cpu"
        m = groups(kind, k)
        torch.testing.assert_close(x @ m, x_old @ m, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(x @ q + lin, x_old @ q + lin, rtol=RTOL, atol=ATOL)
        assert_kkt(q, lin, x)


UNIQUE = ("ordinary", "conflicting")  # full-rank, well-conditioned: the weights are unique


def assert_min_norm_optimal(g: Tensor, w: Tensor) -> None:
    """MGDA's KKT conditions: ``w`` on the simplex, ``(G w)_k >= w^T G w`` for every k, with
    equality where ``w_k > 0`` (up to rounding relative to the Gramian's scale)."""
    gw = g @ w
    tol = 1e-10 * (g.abs() @ w.abs())
    assert bool((w >= 0).all()) and abs(float(w.sum()) - 1.0) < 1e-12
    assert bool((gw - w @ gw >= -tol).all())
    assert bool(((gw - w @ gw).abs() <= tol)[w > 0].all())


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("kind", [*KINDS, "zero_rows"])
def test_weights_match_the_torch_composition(kind: str, k: int) -> None:
    """The weights come from SciPy's NNLS on the least-squares form (checked, with the
    active-set method behind it), the oracle from the torch active-set method: where the
    weights are not unique (rank-deficient and duplicate rows, the origin in the hull) the
    two may pick different optimal weights, so the comparison is on what is unique, MGDA's
    min-norm direction ``w @ J`` and UPGrad's projections ``u @ J``, plus optimality."""
    for seed in SEEDS:
        if kind == "zero_rows":
            j = jacobian("ordinary", k, seed)
            j[:: max(2, k // 2)] = 0.0
        else:
            j = jacobian(kind, k, seed)
        g = j @ j.T
        w, u = min_norm_weights(g), dual_cone_weights(g)
        assert w.dtype == u.dtype == torch.float64 and w.device == u.device == g.device
        w_old, u_old = _torch_min_norm_weights(g), _torch_dual_cone_weights(g)
        scale = float(j.norm(dim=1).max())
        torch.testing.assert_close(w @ j, w_old @ j, rtol=0.0, atol=1e-9 * scale)
        torch.testing.assert_close(u @ j, u_old @ j, rtol=0.0, atol=1e-9 * scale)
        assert_min_norm_optimal(g, w)
        if kind in UNIQUE:
            torch.testing.assert_close(w, w_old, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(u, u_old, rtol=RTOL, atol=ATOL)


def test_the_fast_path_solves_the_seeded_families_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """SciPy's NNLS answers, and passes the optimality check, on every seeded problem: the
    active-set method behind it is not needed there."""
    calls = []
    original = _qp._nnqp

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(_qp, "_nnqp", counting)
    for kind, k, seed in cases():
        g = gramian(kind, k, seed)
        min_norm_weights(g)
        dual_cone_weights(g)
    assert calls == []


@pytest.mark.parametrize("failure", ["raises", "wrong", "negative"])
def test_a_failed_fast_solve_falls_back_to_the_active_set(
    failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NNLS that hits its iteration limit, or returns a point that is not optimal, is
    caught by the check: the active-set method solves the problem and the weights are the
    oracle's."""

    def broken(a: Any, b: Any, **kwargs: Any) -> Any:
        if failure == "raises":
            raise RuntimeError("Maximum number of iterations reached.")
        x = np.full(a.shape[1], 0.5 if failure == "wrong" else -1.0)
        return x, 0.0

    monkeypatch.setattr(_qp.scipy.optimize, "nnls", broken)
    for kind in ("ordinary", "conflicting"):
        for k in (3, 10):
            g = gramian(kind, k, 0)
            torch.testing.assert_close(
                min_norm_weights(g), _torch_min_norm_weights(g), rtol=RTOL, atol=ATOL
            )
            torch.testing.assert_close(
                dual_cone_weights(g), _torch_dual_cone_weights(g), rtol=RTOL, atol=ATOL
            )


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_generic_nonnegative_least_squares(n: int) -> None:
    """NNLS problems on their normal equations: full rank (m > n) and singular (m < n)."""
    for m in (2 * n + 1, max(1, n // 2)):
        for seed in range(5):
            g = torch.Generator().manual_seed(100 * n + 10 * m + seed)
            a = torch.randn(m, n, generator=g, dtype=torch.float64)
            b = torch.randn(6, m, generator=g, dtype=torch.float64)
            q, lin = a.T @ a, -(b @ a)
            x = nnqp(q, lin)
            torch.testing.assert_close(x, _torch_nnqp(q, lin), rtol=RTOL, atol=ATOL)
            assert_kkt(q, lin, x)


# --- the safeguards follow the same path ------------------------------------------------


def run_both(
    q: Tensor, lin: Tensor, max_iter: int | None = None
) -> tuple[tuple[Tensor, list[str]], tuple[Tensor, list[str]]]:
    """Both solvers' results and the messages of their RuntimeWarnings."""
    out = []
    for solver in (nnqp, _torch_nnqp):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = solver(q, lin, max_iter)
        out.append((x, [str(w.message) for w in caught if w.category is RuntimeWarning]))
    return out[0], out[1]


def nnls_with_moves() -> Iterator[tuple[Tensor, Tensor]]:
    """Small NNLS problems whose solves include steps back to the boundary."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(10, 6, generator=g, dtype=torch.float64)
        b = torch.randn(1, 10, generator=g, dtype=torch.float64)
        yield a.T @ a, -(b @ a)


def test_the_iteration_guard_warns_alike() -> None:
    hit = 0
    for q, lin in nnls_with_moves():
        for limit in range(1, 12):
            (x, messages), (x_old, messages_old) = run_both(q, lin, limit)
            torch.testing.assert_close(x, x_old, rtol=RTOL, atol=ATOL)
            assert messages == messages_old
            hit += bool(messages)
    assert hit > 0
    assert "stopped after 3 subproblem solves" in run_both(q, lin, 3)[0][1][0]


def test_failed_factorisations_take_the_same_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the ``call``-th batched factorisation fail in both solvers (every problem of
    the batch): a failed entering solve is undone and skipped, a later one leaves the
    problem stuck with its feasible iterate and a warning."""
    numpy_solve = _qp._cholesky_solve
    torch_factor = torch.linalg.cholesky_ex
    state = {"call": 0, "fail": 0}

    def failing_numpy(system: Any, rhs: Any) -> Any:
        state["call"] += 1
        if state["call"] == state["fail"]:
            return np.zeros_like(rhs), np.ones(len(system), dtype=np.bool_)
        return numpy_solve(system, rhs)

    def failing_torch(system: Tensor) -> tuple[Tensor, Tensor]:
        state["call"] += 1
        factor, info = torch_factor(system)
        if state["call"] == state["fail"]:
            return factor, torch.ones_like(info)
        return factor, info

    monkeypatch.setattr(_qp, "_cholesky_solve", failing_numpy)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_torch)
    stuck = 0
    for q, lin in nnls_with_moves():
        for fail in range(1, 8):
            results = []
            for solver in (nnqp, _torch_nnqp):
                state.update(call=0, fail=fail)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    x = solver(q, lin)
                results.append((x, [str(w.message) for w in caught]))
            (x, messages), (x_old, messages_old) = results
            torch.testing.assert_close(x, x_old, rtol=RTOL, atol=ATOL)
            assert messages == messages_old
            stuck += any("numerically singular" in m for m in messages)
            assert bool((x >= 0).all())
    assert stuck > 0


def test_a_failed_factorisation_in_a_batch_is_found() -> None:
    """NumPy's batched Cholesky raises if any matrix fails: the fallback finds which, like
    ``cholesky_ex``'s ``info``, and still solves the others."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, 8, generator=g, dtype=torch.float64)
    system = a @ a.mT
    system[1] = torch.ones(5, 5, dtype=torch.float64)  # singular (rank one)
    system[4, 2, 2] = -1.0  # indefinite
    rhs = torch.randn(6, 5, generator=g, dtype=torch.float64)
    z, failed = _qp._cholesky_solve(system.numpy(), rhs.numpy())
    factor, info = torch_cholesky_ex(system)
    assert failed.tolist() == (info != 0).tolist() == [False, True, False, False, True, False]
    ok = ~torch.from_numpy(failed)
    expected = torch.cholesky_solve(rhs[:, :, None], factor)[:, :, 0]
    torch.testing.assert_close(torch.from_numpy(z)[ok], expected[ok], rtol=RTOL, atol=ATOL)
    assert not z[failed].any()
    # no failure: the batched path
    z, failed = _qp._cholesky_solve(system[ok].numpy(), rhs[ok].numpy())
    assert not failed.any()
    torch.testing.assert_close(torch.from_numpy(z), expected[ok], rtol=RTOL, atol=ATOL)


torch_cholesky_ex: Callable[[Tensor], tuple[Tensor, Tensor]] = torch.linalg.cholesky_ex


def test_warnings_point_at_the_caller() -> None:
    q = torch.eye(3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="active-set QP solver stopped") as record:
        nnqp(q, -torch.ones(1, 3, dtype=torch.float64), max_iter=1)
    assert record[0].filename == __file__
