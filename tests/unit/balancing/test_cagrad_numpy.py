"""CAGrad's NumPy solver against the torch implementation it replaced.

The functions ``_torch_*`` below are verbatim copies of the torch solver of
:mod:`polytask.balancing.aggregation.cagrad` before its internals moved to NumPy (only their
names carry the prefix, and the constants are repeated). They are the reference on seeded
problems: K in {1, 2, 3, 5, 10, 40}, six families of Jacobians (ordinary, nearly collinear,
rank-deficient, conflicting with many negative correlations, exact duplicate rows, some
zero rows) and c in {0.1, 0.5, 1.0, 2.0}, plus the ``rescale`` variants. The NumPy solver
must take the same path (the same number of face solves and barrier centrings) and give the
same results up to rounding.

Tolerance ``rtol=1e-9``, ``atol=1e-12``, not bitwise: the algorithm, its decisions, its
constants and its elementwise operations are the same, but the reductions (sums, means,
dot products) and the LU solves are different implementations (torch's and MKL's against
NumPy's pairwise sums and OpenBLAS/LAPACK), whose roundings differ in the last bits; the
barrier method, the face solves' square roots and the ``1 / ||g_w||`` factor amplify them a
little.

What is compared:

* Where the weights are unique (independent gradients) the coefficients themselves.
* With exact duplicate rows (and rank deficiency) the minimiser ``w`` is not unique: how the
  weight of a group of identical rows is shared between its copies is decided by rounding.
  There the comparison is on what is unique: the update ``coef @ J`` (CAGrad's direction),
  ``g_w = w @ J`` and the objective ``F(w)``.
* Where zero lies in the convex hull of the rows (rank-deficient families) and ``c >= 1``,
  the minimiser has ``g_w = 0``. The computed solutions (old and new alike) stop with
  ``||g_w||`` about 1e-9, the resolution of ``sqrt(w^T G w)`` computed from a float64
  Gramian, right at the threshold :data:`cagrad._ZERO_NORM`: whether the ``c >= 1``
  convention (coefficients 0) applies, and otherwise the direction of ``g_w`` (scaled by
  ``s / ||g_w||``, about 1e8), are decided by rounding in both implementations. Only the
  objective value, 0 up to the barrier's accuracy, is compared there.

The other seeded problems are all solved by the active-set method, so the barrier method is
also compared with the active-set method switched off in both solvers, on the families whose
faces are invertible (with duplicate or dependent rows the barrier's KKT system can become
exactly singular at large ``t``, and both implementations then raise).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import pytest
import torch
from torch import Tensor

from helpers import seeded_jacobian
from polytask.balancing.aggregation import cagrad
from polytask.balancing.aggregation._common import normalized_gramian
from polytask.balancing.aggregation.cagrad import cagrad_objective, cagrad_weights, solve_cagrad

RTOL = 1e-9
ATOL = 1e-12
KS = [1, 2, 3, 5, 10, 40]
KINDS = ["ordinary", "nearly_collinear", "rank_deficient", "conflicting", "duplicates", "zero_rows"]
CS = [0.1, 0.5, 1.0, 2.0]
SEEDS = range(3)
#: linearly independent rows: the minimiser, so the coefficients, are unique
UNIQUE = ("ordinary", "nearly_collinear", "conflicting", "zero_rows")
#: ``||g_w||`` (normalised units) below which the minimiser counts as ``g_w = 0``
DEGENERATE = 1e-6

# --- the torch oracle -------------------------------------------------------------------

_GAP = 1e-12
_ZERO_NORM = 1e-6  # the module's (raised from 1e-9 with the port: see cagrad._ZERO_NORM)


def _torch_cagrad_objective(gramian: Tensor, w: Tensor, b: Tensor, s: float) -> float:
    """``F(w) = w^T b + s sqrt(w^T G w)``, the function CAGrad minimises over the simplex."""
    return float(w @ b) + s * math.sqrt(max(0.0, float(w @ gramian @ w)))


def _torch_max_step(x: Tensor, step: Tensor, gramian: Tensor) -> float:
    """The largest ``a`` with ``x + a step`` strictly inside the cone and the orthant."""
    k = gramian.shape[0]
    w, tau, dw, dtau = x[:k], float(x[k]), step[:k], float(step[k])
    limit = math.inf
    shrinking = dw < 0
    if bool(shrinking.any()):
        limit = float((-w[shrinking] / dw[shrinking]).min())
    if dtau < 0:
        limit = min(limit, -tau / dtau)
    # slack(a) = tau(a)^2 - w(a)^T G w(a) = r0 + r1 a + r2 a^2 must stay positive
    gdw = gramian @ dw
    r0 = tau * tau - float(w @ gramian @ w)
    r1 = 2.0 * (tau * dtau - float(w @ gdw))
    r2 = dtau * dtau - float(dw @ gdw)
    roots = []
    if r2 != 0.0:
        disc = r1 * r1 - 4.0 * r2 * r0
        if disc >= 0.0:
            sq = math.sqrt(disc)
            roots = [(-r1 - sq) / (2.0 * r2), (-r1 + sq) / (2.0 * r2)]
    elif r1 < 0.0:
        roots = [-r0 / r1]
    positive = [r for r in roots if r > 0.0]
    if positive:
        limit = min(limit, min(positive))
    return limit


def _torch_centre(x: Tensor, t: float, gramian: Tensor, b: Tensor, s: float) -> Tensor:
    """Newton's method on the barrier problem for one ``t`` (equality-constrained, feasible).

    ``t (b^T w + s tau) - sum log w_i - log(tau^2 - w^T G w)`` subject to ``sum w = 1``; the
    step is the solution of the KKT system, cut to stay strictly feasible and shortened by
    backtracking until the barrier decreases enough.
    """
    k = gramian.shape[0]
    dtype = gramian.dtype
    cost = torch.cat([b, torch.tensor([s], dtype=dtype)])
    kkt = torch.zeros(k + 2, k + 2, dtype=dtype)
    kkt[:k, k + 1] = 1.0
    kkt[k + 1, :k] = 1.0

    def value(x: Tensor) -> float:
        w, tau = x[:k], float(x[k])
        slack = tau * tau - float(w @ gramian @ w)
        if slack <= 0.0 or bool((w <= 0).any()):
            return math.inf
        return t * float(cost @ x) - float(torch.log(w).sum()) - math.log(slack)

    for _ in range(50):
        w, tau = x[:k], float(x[k])
        gw = gramian @ w
        slack = tau * tau - float(w @ gw)
        grad_slack = torch.cat([-2.0 * gw, torch.tensor([2.0 * tau], dtype=dtype)])
        grad = t * cost - grad_slack / slack
        grad[:k] -= 1.0 / w
        hess = torch.outer(grad_slack, grad_slack) / (slack * slack)
        hess[:k, :k] += 2.0 * gramian / slack + torch.diag(1.0 / (w * w))
        hess[k, k] -= 2.0 / slack
        kkt[: k + 1, : k + 1] = hess
        # the constraint's residual is part of the step, so rounding cannot drift off it
        rhs = torch.cat([-grad, torch.tensor([1.0 - float(w.sum())], dtype=dtype)])
        step = torch.linalg.solve(kkt, rhs)[: k + 1]
        decrement = -float(grad @ step)
        if decrement <= 1e-10:
            break
        size = min(1.0, 0.99 * _torch_max_step(x, step, gramian))
        current = value(x)
        while size > 1e-16 and value(x + size * step) > current - 0.25 * size * decrement:
            size *= 0.5
        if size <= 1e-16:
            break
        x = x + size * step
    return x


def _torch_face(
    gramian: Tensor, b: Tensor, s: float, support: list[int]
) -> tuple[bool, Tensor] | None:
    """Minimise ``F`` on the affine hull of a face, ``{sum w = 1, w_i = 0 off support}``.

    With ``G_S`` invertible, stationarity ``b_S + s G_S w / ||g_w|| = -nu 1`` gives
    ``w = -G_S^{-1}(b_S + nu 1) / mu`` with ``mu = s / ||g_w||``, and ``||g_w|| = s / mu``
    becomes ``(b_S + nu 1)^T G_S^{-1} (b_S + nu 1) = s^2``: a quadratic in ``nu`` whose root
    with ``mu > 0`` is the minimiser. Without a real root, ``F`` decreases without bound on
    the hull, steepest along ``d = -G_S^{-1}(b_S + nu 1)`` with ``nu`` making ``sum d = 0``.

    Returns ``(True, w)`` (the minimiser, maybe outside the face), ``(False, d)`` (a
    direction of unbounded decrease), or ``None`` when ``G_S`` is singular.
    """
    index = torch.tensor(support)
    g_s = gramian[index][:, index]
    b_s = b[index]
    rhs = torch.stack([torch.ones_like(b_s), b_s], dim=1)
    # LU, not Cholesky: far cheaper on tiny CPU matrices with some BLAS builds
    solved, info = torch.linalg.solve_ex(g_s, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solved).all()):
        return None
    inv_one, inv_b = solved[:, 0], solved[:, 1]
    alpha, beta, gamma = float(inv_one.sum()), float(inv_b.sum()), float(b_s @ inv_b)
    if not alpha > 0.0:
        return None
    out = torch.zeros_like(b)
    disc = beta * beta - alpha * (gamma - s * s)
    if disc > 0.0:
        mu = math.sqrt(disc)
        nu = (-beta - mu) / alpha
        out[index] = -(inv_b + nu * inv_one) / mu
        return True, out
    out[index] = -(inv_b - (beta / alpha) * inv_one)
    return False, out


def _torch_slopes(gramian: Tensor, b: Tensor, s: float, w: Tensor) -> Tensor | None:
    """The gradient ``b + s G w / ||g_w||`` of ``F`` at ``w`` (None where ``g_w = 0``)."""
    norm = math.sqrt(max(0.0, float(w @ gramian @ w)))
    if norm <= _ZERO_NORM:
        return None
    return b + s * (gramian @ w) / norm


def _torch_is_optimal(gramian: Tensor, b: Tensor, s: float, w: Tensor) -> bool:
    """Whether ``w`` (on the simplex) satisfies the KKT conditions of the whole problem.

    With ``||g_w|| > 0`` the gradient of ``F`` must be equal (to ``-nu``) on the support of
    ``w`` and not smaller off it. ``F`` is convex, so these conditions certify the global
    minimum.
    """
    slope = _torch_slopes(gramian, b, s, w)
    if slope is None or bool((w < 0).any()):
        return False
    support = w > 0
    level = float(slope[support].mean())
    tol = 1e-10 * (float(slope.abs().max()) + 1.0)
    on_face = float((slope[support] - level).abs().max())
    below = float((level - slope[~support]).max()) if bool((~support).any()) else -math.inf
    return on_face <= tol and below <= tol


def _torch_active_set(gramian: Tensor, b: Tensor, s: float) -> Tensor | None:
    """A primal active-set method with exact face solutions; None if it cannot proceed.

    Start at the best vertex. Repeatedly: add the task whose slope is lowest below the
    face's (the most improving direction); minimise on the enlarged face by :func:`_torch_face`;
    if the minimiser leaves the face (or ``F`` is unbounded on its hull), walk towards it
    until a weight reaches zero (``F`` decreases along the way, being convex) and drop that
    task. Every step decreases ``F`` and visits faces, so it ends in a few solves of size at
    most the support. It needs invertible ``G_S`` on the faces it visits (linearly
    independent gradients); otherwise the caller falls back to the barrier method.
    """
    k = b.shape[0]
    norms = gramian.diagonal().clamp_min(0).sqrt()
    start = int(torch.argmin(b + s * norms))
    w = torch.zeros_like(b)
    w[start] = 1.0
    support = [start]
    for _ in range(10 * k + 10):
        slope = _torch_slopes(gramian, b, s, w)
        if slope is None:
            return None
        level = float(slope[support].mean())
        outside = [j for j in range(k) if j not in support]
        if not outside:
            return w
        gains = slope[outside] - level
        best = int(torch.argmin(gains))
        if float(gains[best]) >= -1e-10 * (float(slope.abs().max()) + 1.0):
            return w
        support = sorted([*support, outside[best]])
        for _ in range(k + 1):
            face = _torch_face(gramian, b, s, support)
            if face is None:
                return None
            bounded, target = face
            direction = target - w if bounded else target
            if bounded and bool((target[support] > 0).all()):
                w = target
                break
            falling = [i for i in support if float(direction[i]) < 0.0]
            if not falling:
                return None
            ratios = [-float(w[i]) / float(direction[i]) for i in falling]
            step = min(ratios)
            if bounded:
                step = min(step, 1.0)
            w = (w + step * direction).clamp_min(0.0)
            blocked = falling[ratios.index(min(ratios))]
            w[blocked] = 0.0
            w = w / w.sum()
            support = [i for i in support if float(w[i]) > 0.0]
        else:
            return None
    return None


def _torch_certified_face(gramian: Tensor, b: Tensor, s: float, w: Tensor) -> Tensor | None:
    """The exact solution on a face suggested by a barrier iterate ``w``, if certified.

    Candidate supports: the tasks whose weight lies above one of the three largest ratio
    gaps in the sorted weights (plus all tasks): on the central path the weights of inactive
    tasks shrink like ``1/t`` while the active ones converge.
    """
    k = w.shape[0]
    ranked = torch.argsort(w, descending=True, stable=True).tolist()
    sorted_w = w[ranked].clamp_min(1e-300)
    ratios = sorted_w[:-1] / sorted_w[1:]
    sizes = [k] + [int(i) + 1 for i in torch.argsort(ratios, descending=True, stable=True)[:3]]
    for size in dict.fromkeys(sizes):
        face = _torch_face(gramian, b, s, sorted(ranked[:size]))
        if face is not None and face[0] and _torch_is_optimal(gramian, b, s, face[1]):
            return face[1]
    return None


def _torch_solve_cagrad(gramian: Tensor, b: Tensor, s: float) -> Tensor:
    """``argmin_{w in simplex} w^T b + s sqrt(w^T G w)`` (float64, CPU), to high accuracy.

    First an active-set method whose faces are solved exactly in closed form
    (:func:`_torch_active_set`); its result is returned when it satisfies the optimality
    conditions of the whole problem (:func:`_torch_is_optimal`: a certificate, ``F`` being
    convex). Otherwise (singular faces: collinear or linearly dependent gradients, or zero
    in the convex hull) the problem is solved as a second-order cone program in
    ``(w, tau)``::

        min  b^T w + s tau   s.t.  tau >= sqrt(w^T G w),  w >= 0,  sum w = 1

    by a log-barrier (path-following) method: Newton steps on the barrier problems
    (:func:`_torch_centre`) for ``t`` growing tenfold, trying after each centring to certify an
    exact face solution, until the duality gap bound ``(K + 2) / t`` is below about 1e-12
    (relative) or ``||g_w||`` is zero to the precision of :data:`_ZERO_NORM`.
    """
    k = gramian.shape[0]
    dtype = gramian.dtype
    if k == 1:
        return torch.ones(1, dtype=dtype)
    exact = _torch_active_set(gramian, b, s)
    if exact is not None and _torch_is_optimal(gramian, b, s, exact):
        return exact
    w = torch.full((k,), 1.0 / k, dtype=dtype)
    tau = math.sqrt(max(0.0, float(w @ gramian @ w))) + 1.0
    x = torch.cat([w, torch.tensor([tau], dtype=dtype)])
    gap = _GAP * min(1.0, s)
    t = 1.0
    while True:
        x = _torch_centre(x, t, gramian, b, s)
        w = x[:k] / x[:k].sum()
        exact = _torch_certified_face(gramian, b, s, w)
        if exact is not None:
            return exact
        # on the central path ||g_w|| tends to its optimal value; once it is below the
        # threshold the minimiser has g_w = 0 (to that precision) and the caller's
        # convention applies, whatever further digits the barrier would find
        if (k + 2) / t < gap or float(w @ gramian @ w) <= _ZERO_NORM**2:
            return w
        t *= 10.0


def _torch_cagrad_weights(gramian: Tensor, c: float, rescale: Literal[0, 1, 2] = 0) -> Tensor:
    """CAGrad's coefficients ``1/K + (c ||g_0|| / ||g_w||) w`` from the Gramian.

    ``g_0`` is the mean gradient and ``w`` solves
    ``min_{w in simplex} <g_w, g_0> + c ||g_0|| ||g_w||`` (:func:`_torch_solve_cagrad`), computed on
    the Gramian normalised by the mean squared gradient norm, so the coefficients do not
    depend on the scale of the gradients. ``rescale`` divides by 1 (0, the paper),
    ``1 + c^2`` (1) or ``1 + c`` (2), the options of the official code.

    Special cases:

    - ``c = 0`` or ``g_0 = 0`` give the mean (``1/K``).
    - A task whose gradient is exactly zero has ``<g_i, d> = 0`` whatever ``d``; it is left
      out of the minimisation (weight ``1/K``, its share of ``g_0``, only). The result is
      still a solution of the paper's primal problem
      ``max_{||d - g_0|| <= c ||g_0||} min_i <g_i, d>`` (the one that best serves the other
      tasks), where keeping the zero row would make ``g_w = 0`` optimal and the formula
      undefined.
    - When the minimiser has ``g_w = 0`` (zero lies in the convex hull of the gradients: a
      Pareto-stationary point) the paper's formula is undefined; then ``c >= 1`` gives 0, an
      exact solution of the primal problem (value 0), and ``c < 1`` gives ``g_0``, the limit
      the official code takes (the paper proves convergence to a stationary point of the
      mean loss for ``c < 1``, so the step goes on along it).
    """
    device = gramian.device
    g, _ = normalized_gramian(gramian.detach().to("cpu", torch.float64))
    k = g.shape[0]
    mean = torch.full((k,), 1.0 / k, dtype=torch.float64)
    divisor = (1.0, 1.0 + c * c, 1.0 + c)[rescale]
    g0_norm = math.sqrt(max(0.0, float(mean @ g @ mean)))
    s = c * g0_norm
    if s <= 0.0:
        return (mean / divisor).to(device)
    live = g.diagonal() > 0
    index = live.nonzero().squeeze(1)
    g_live = g[index][:, index]
    b = (g @ mean)[index]
    w_live = _torch_solve_cagrad(g_live, b, s)
    gw_norm = math.sqrt(max(0.0, float(w_live @ g_live @ w_live)))
    coef = mean.clone()
    if gw_norm > _ZERO_NORM:
        coef[index] += (s / gw_norm) * w_live
    elif c >= 1.0:
        coef.zero_()
    return (coef / divisor).to(device)


# --- problems ---------------------------------------------------------------------------


def jacobian(kind: str, k: int, seed: int, dim: int = 64) -> Tensor:
    return seeded_jacobian(kind, k, seed, dim)


def problem(j: Tensor, c: float) -> tuple[Tensor, Tensor, float, Tensor]:
    """What :func:`cagrad_weights` hands the solver: the normalised Gramian of the non-zero
    rows, ``b``, ``s``, and those rows of the Jacobian in the same units."""
    k = j.shape[0]
    g, scale = normalized_gramian(j @ j.T)
    mean = torch.full((k,), 1.0 / k, dtype=torch.float64)
    live = g.diagonal() > 0
    s = c * math.sqrt(max(0.0, float(mean @ g @ mean)))
    return g[live][:, live], (g @ mean)[live], s, j[live] / math.sqrt(float(scale))


def cases() -> Iterator[tuple[str, int, int, float]]:
    for kind in KINDS:
        for k in KS:
            for seed in SEEDS:
                for c in CS:
                    yield kind, k, seed, c


def gw_norm(g: Tensor, w: Tensor) -> float:
    return math.sqrt(max(0.0, float(w @ g @ w)))


def assert_on_simplex(w: Tensor) -> None:
    assert bool((w >= 0).all())
    assert abs(float(w.sum()) - 1.0) <= 1e-12


# --- the solver against the oracle ------------------------------------------------------


def test_the_constants_are_the_oracle_ones() -> None:
    assert cagrad._GAP == _GAP and cagrad._ZERO_NORM == _ZERO_NORM


def count_calls(
    monkeypatch: pytest.MonkeyPatch, module: Any, names: dict[str, str]
) -> Counter[str]:
    """Count the calls of ``module``'s functions ``names`` (function name -> counter key)."""
    counts: Counter[str] = Counter()
    for name, key in names.items():
        original: Callable[..., Any] = getattr(module, name)

        def counting(*args: Any, _f: Callable[..., Any] = original, _k: str = key) -> Any:
            counts[_k] += 1
            return _f(*args)

        monkeypatch.setattr(module, name, counting)
    return counts


def count_both(monkeypatch: pytest.MonkeyPatch) -> tuple[Counter[str], Counter[str]]:
    """Counters of the face solves and barrier centrings of both solvers."""
    new = count_calls(monkeypatch, cagrad, {"_face": "face", "_centre": "centre"})
    old = count_calls(
        monkeypatch, sys.modules[__name__], {"_torch_face": "face", "_torch_centre": "centre"}
    )
    return new, old


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("kind", KINDS)
def test_solve_cagrad_matches_the_torch_solver(
    kind: str, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same results and the same decisions (as many face solves and barrier centrings),
    the degenerate problems aside (see the module docstring), where only ``F`` is compared."""
    new, old = count_both(monkeypatch)
    for seed in SEEDS:
        for c in CS:
            g, b, s, j = problem(jacobian(kind, k, seed), c)
            if s <= 0.0:
                continue
            new.clear()
            old.clear()
            w, w_old = solve_cagrad(g, b, s), _torch_solve_cagrad(g, b, s)
            assert isinstance(w, Tensor) and w.dtype == torch.float64 and w.device == g.device
            assert_on_simplex(w)
            f, f_old = cagrad_objective(g, w, b, s), _torch_cagrad_objective(g, w_old, b, s)
            if min(gw_norm(g, w), gw_norm(g, w_old)) < DEGENERATE:
                # zero in the hull, c >= 1: the minimum is F = 0 at g_w = 0
                assert c >= 1.0
                # F = <g_0, g_w> + s ||g_w|| with ||g_w|| at most the zero threshold
                bound = 4 * _ZERO_NORM * (1.0 + s)
                assert abs(f) <= bound and abs(f_old) <= bound
                continue
            assert new == old, (seed, c)
            assert f == pytest.approx(f_old, rel=RTOL, abs=ATOL)
            torch.testing.assert_close(w @ j, w_old @ j, rtol=RTOL, atol=ATOL)
            if kind in UNIQUE:
                torch.testing.assert_close(w, w_old, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("kind", KINDS)
def test_weights_match_the_torch_oracle(kind: str, k: int) -> None:
    for seed in SEEDS:
        j = jacobian(kind, k, seed)
        gram = j @ j.T
        for c in CS:
            coef = cagrad_weights(gram, c)
            assert coef.dtype == torch.float64 and coef.device == gram.device
            assert coef.shape == (k,)
            g, b, s, _ = problem(j, c)
            if s > 0.0 and gw_norm(g, solve_cagrad(g, b, s)) < DEGENERATE:
                continue  # the coefficients are decided by rounding (see the module docstring)
            coef_old = _torch_cagrad_weights(gram, c)
            scale = float(j.norm(dim=1).max())
            torch.testing.assert_close(coef @ j, coef_old @ j, rtol=RTOL, atol=1e-12 * scale)
            if kind in UNIQUE:
                torch.testing.assert_close(coef, coef_old, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("rescale", [1, 2])
@pytest.mark.parametrize("kind", ["ordinary", "conflicting", "duplicates"])
def test_rescale_variants_match_the_torch_oracle(kind: str, rescale: Literal[1, 2]) -> None:
    for k in (2, 5, 10, 40):
        j = jacobian(kind, k, 0)
        gram = j @ j.T
        for c in CS:
            coef = cagrad_weights(gram, c, rescale)
            coef_old = _torch_cagrad_weights(gram, c, rescale)
            torch.testing.assert_close(coef @ j, coef_old @ j, rtol=RTOL, atol=1e-12)
            if kind != "duplicates":
                torch.testing.assert_close(coef, coef_old, rtol=RTOL, atol=ATOL)
            divisor = 1.0 + c * c if rescale == 1 else 1.0 + c
            torch.testing.assert_close(
                coef * divisor, cagrad_weights(gram, c), rtol=1e-15, atol=0.0
            )


#: the families with invertible faces: with duplicate or linearly dependent rows the forced
#: barrier method can meet an exactly singular KKT system at large ``t`` (and raise, in both
#: implementations, on problems that rounding decides)
BARRIER_CASES = [
    *(
        (kind, k, 0)
        for kind in ("ordinary", "nearly_collinear", "conflicting", "zero_rows")
        for k in (2, 3, 5, 10)
    ),
    ("ordinary", 40, 0),
    ("conflicting", 40, 1),
]


def test_the_barrier_path_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The barrier method and the certified faces after it (:func:`cagrad._centre`,
    :func:`cagrad._max_step`, :func:`cagrad._certified_face`), forced by making the
    active-set method give up in both solvers (on the seeded families the barrier is only
    reached by degenerate problems, whose results are decided by rounding). The same number
    of centrings and face solves, and the same results."""
    monkeypatch.setattr(cagrad, "_active_set", lambda *args: None)
    monkeypatch.setattr(sys.modules[__name__], "_torch_active_set", lambda *args: None)
    new, old = count_both(monkeypatch)
    compared = 0
    for kind, k, seed in BARRIER_CASES:
        for c in CS:
            g, b, s, j = problem(jacobian(kind, k, seed), c)
            new.clear()
            old.clear()
            w, w_old = solve_cagrad(g, b, s), _torch_solve_cagrad(g, b, s)
            if min(gw_norm(g, w), gw_norm(g, w_old)) < DEGENERATE:
                continue
            assert new == old, (kind, k, seed, c)
            assert new["centre"] > 0 or g.shape[0] == 1  # K = 1: nothing to solve
            assert_on_simplex(w)
            f, f_old = cagrad_objective(g, w, b, s), _torch_cagrad_objective(g, w_old, b, s)
            assert f == pytest.approx(f_old, rel=RTOL, abs=ATOL)
            torch.testing.assert_close(w @ j, w_old @ j, rtol=RTOL, atol=ATOL)
            if kind in UNIQUE:
                torch.testing.assert_close(w, w_old, rtol=RTOL, atol=ATOL)
            compared += 1
    assert compared > 0


def test_centring_steps_match() -> None:
    """One barrier problem at a time from the same start (:func:`cagrad._centre`)."""
    for kind in ("ordinary", "conflicting", "rank_deficient"):
        g, b, s, _ = problem(jacobian(kind, 5, 0), 0.5)
        k = g.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64)
        tau = math.sqrt(float(w @ g @ w)) + 1.0
        x_old = torch.cat([w, torch.tensor([tau], dtype=torch.float64)])
        x = x_old.numpy().copy()
        for t in (1.0, 10.0, 100.0, 1e3):
            x = cagrad._centre(x, t, g.numpy(), b.numpy(), s)
            x_old = _torch_centre(x_old, t, g, b, s)
            torch.testing.assert_close(torch.from_numpy(x), x_old, rtol=RTOL, atol=ATOL)
            step = torch.linspace(-1.0, 1.0, k + 1, dtype=torch.float64)
            assert cagrad._max_step(x, step.numpy(), g.numpy()) == pytest.approx(
                _torch_max_step(x_old, step, g), rel=RTOL
            )


def test_face_solves_match_including_singular_and_unbounded() -> None:
    """:func:`cagrad._face` against the oracle on faces of every size, with exactly singular
    Gramians (an exactly zero LU pivot: None, like ``solve_ex``'s info) and with ``s`` so
    small that ``F`` is unbounded on the hull (a direction, ``bounded`` False)."""
    seen = Counter[str]()
    for kind in ("ordinary", "conflicting", "duplicates"):
        for k in (2, 5, 10):
            g, b, s, _ = problem(jacobian(kind, k, 0), 0.5)
            gn, bn = g.numpy(), b.numpy()
            for scale in (1.0, 1e-4):
                for size in range(1, k + 1):
                    support = list(range(0, k, max(1, k // size)))[:size]
                    face = cagrad._face(gn, bn, s * scale, np.array(support, dtype=np.intp))
                    face_old = _torch_face(g, b, s * scale, support)
                    if face_old is None:
                        assert face is None
                        seen["none"] += 1
                        continue
                    assert face is not None
                    assert face[0] == face_old[0]
                    seen[str(face[0])] += 1
                    torch.testing.assert_close(
                        torch.from_numpy(face[1]), face_old[1], rtol=RTOL, atol=1e-12
                    )
    singular = torch.ones(2, 2, dtype=torch.float64)
    b = torch.tensor([0.5, -0.5], dtype=torch.float64)
    assert _torch_face(singular, b, 0.1, [0, 1]) is None
    assert cagrad._face(singular.numpy(), b.numpy(), 0.1, np.array([0, 1])) is None
    assert seen["True"] > 0 and seen["False"] > 0


def test_special_cases_match_the_torch_oracle() -> None:
    """K = 1, c = 0, every gradient zero, float32 input, a Gramian that requires grad."""
    j = jacobian("conflicting", 5, 0)
    cases_: list[tuple[Tensor, float]] = [
        (torch.tensor([[4.0]], dtype=torch.float64), 0.5),
        (j @ j.T, 0.0),
        (torch.zeros(3, 3, dtype=torch.float64), 0.5),
        ((j @ j.T).float(), 0.5),
        ((j @ j.T).requires_grad_(), 0.5),
    ]
    for gram, c in cases_:
        coef, coef_old = cagrad_weights(gram, c), _torch_cagrad_weights(gram, c)
        assert coef.dtype == torch.float64 and not coef.requires_grad
        torch.testing.assert_close(coef, coef_old, rtol=RTOL, atol=ATOL)
    assert solve_cagrad(torch.ones(1, 1, dtype=torch.float64), torch.ones(1), 1.0).tolist() == [1.0]


@pytest.mark.parametrize("k", [3, 5, 10])
def test_dependent_rows_with_a_duplicate_neither_raise_nor_blow_up(k: int) -> None:
    """Rank-deficient Jacobians with a duplicated row (zero often in the hull): the barrier's
    KKT system used to turn numerically singular and raise (18 of these 360 problems), and
    an ``||g_w||`` of rounding size (1e-9) used to be scaled up to weights of 1e8. Now every
    result is finite and feasible for the primal problem, ``||d - g_0|| <= c ||g_0||``."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        r = max(1, k // 3)
        j = torch.randn(k, r, generator=g, dtype=torch.float64) @ torch.randn(
            r, 64, generator=g, dtype=torch.float64
        )
        j[-1] = j[0]
        for c in (0.5, 0.9, 2.0):
            coef = cagrad_weights(j @ j.T, c)
            assert bool(torch.isfinite(coef).all())
            d, g0 = coef @ j, j.mean(dim=0)
            assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9)
