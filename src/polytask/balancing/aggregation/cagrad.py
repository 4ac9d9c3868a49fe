"""CAGrad: the update in a ball around the mean gradient that best helps the worst task.

The solver works on K x K arrays (K the number of tasks) in float64 on the CPU, in NumPy:
at these sizes a NumPy operation costs a fraction of a torch one, and that per-operation
overhead was most of the solver's time (at K = 40, with about half the gradients in
conflict, a call took 15-25 ms with torch operations and takes 3-6 ms, mostly the face
solves of the active-set method). The public functions take and return tensors
(:func:`cagrad_weights` returns its coefficients on the Gramian's device); NumPy arrays are
used inside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS
from ..gradient import GramianWeighting, Level
from ._common import check_number_option

__all__ = ["CAGrad", "cagrad_objective", "cagrad_weights", "solve_cagrad"]

#: relative accuracy of the barrier method (duality gap, in units where the mean squared
#: gradient norm is 1); the face solve that follows is exact to rounding when it applies
_GAP = 1e-12
#: ``||g_w||`` below this (same units) counts as zero: 0 lies in the convex hull of the rows.
#: ``w^T G w`` evaluated from a float64 Gramian carries an absolute rounding error of about
#: ``K eps`` here, so norms below ``sqrt(K eps)`` (1e-7 at K = 40) are not resolved; below
#: 1e-6 the direction ``g_w`` would be rounding noise scaled up by ``s / ||g_w||`` (weights
#: of 1e8 were seen with a threshold of 1e-9), and the float32 combination ``w @ J`` could
#: not carry it either
_ZERO_NORM = 1e-6

_Float = npt.NDArray[np.float64]
_Index = npt.NDArray[np.intp]


def _float64(tensor: Tensor) -> _Float:
    """``tensor`` as a float64 NumPy array on the CPU (it may share the tensor's memory)."""
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy(force=True)


def _quadratic(gramian: _Float, w: _Float) -> float:
    """``w^T G w``."""
    return float(w @ gramian @ w)


def _mean(x: _Float) -> float:
    """The mean of a non-empty array (``x.mean()``'s value, with less overhead)."""
    return float(x.sum()) / len(x)


def cagrad_objective(gramian: Tensor, w: Tensor, b: Tensor, s: float) -> float:
    """``F(w) = w^T b + s sqrt(w^T G w)``, the function CAGrad minimises over the simplex."""
    g, w_, b_ = _float64(gramian), _float64(w), _float64(b)
    return float(w_ @ b_) + s * math.sqrt(max(0.0, _quadratic(g, w_)))


def _max_step(x: _Float, step: _Float, gramian: _Float) -> float:
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
    r0 = tau * tau - _quadratic(gramian, w)
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


def _centre(x: _Float, t: float, gramian: _Float, b: _Float, s: float) -> _Float:
    """Newton's method on the barrier problem for one ``t`` (equality-constrained, feasible).

    ``t (b^T w + s tau) - sum log w_i - log(tau^2 - w^T G w)`` subject to ``sum w = 1``; the
    step is the solution of the KKT system, cut to stay strictly feasible and shortened by
    backtracking until the barrier decreases enough.
    """
    k = gramian.shape[0]
    cost = np.append(b, s)
    kkt = np.zeros((k + 2, k + 2))
    kkt[:k, k + 1] = 1.0
    kkt[k + 1, :k] = 1.0

    def value(x: _Float) -> float:
        w, tau = x[:k], float(x[k])
        slack = tau * tau - _quadratic(gramian, w)
        if slack <= 0.0 or bool((w <= 0).any()):
            return math.inf
        return t * float(cost @ x) - float(np.log(w).sum()) - math.log(slack)

    for _ in range(50):
        w, tau = x[:k], float(x[k])
        gw = gramian @ w
        slack = tau * tau - float(w @ gw)
        grad_slack = np.append(-2.0 * gw, 2.0 * tau)
        grad = t * cost - grad_slack / slack
        grad[:k] -= 1.0 / w
        hess = np.outer(grad_slack, grad_slack) / (slack * slack)
        hess[:k, :k] += 2.0 * gramian / slack + np.diag(1.0 / (w * w))
        hess[k, k] -= 2.0 / slack
        kkt[: k + 1, : k + 1] = hess
        # the constraint's residual is part of the step, so rounding cannot drift off it
        rhs = np.append(-grad, 1.0 - float(w.sum()))
        try:
            step: _Float = np.linalg.solve(kkt, rhs)[: k + 1]
        except np.linalg.LinAlgError:
            # numerically singular near g_w = 0 (linearly dependent gradients whose hull
            # holds the origin): keep the strictly feasible iterate, as the other stops do
            break
        if not bool(np.isfinite(step).all()):
            break
        decrement = -float(grad @ step)
        if decrement <= 1e-10:
            break
        size = min(1.0, 0.99 * _max_step(x, step, gramian))
        current = value(x)
        while size > 1e-16 and value(x + size * step) > current - 0.25 * size * decrement:
            size *= 0.5
        if size <= 1e-16:
            break
        x = x + size * step
    return x


def _face(gramian: _Float, b: _Float, s: float, support: _Index) -> tuple[bool, _Float] | None:
    """Minimise ``F`` on the affine hull of a face, ``{sum w = 1, w_i = 0 off support}``.

    With ``G_S`` invertible, stationarity ``b_S + s G_S w / ||g_w|| = -nu 1`` gives
    ``w = -G_S^{-1}(b_S + nu 1) / mu`` with ``mu = s / ||g_w||``, and ``||g_w|| = s / mu``
    becomes ``(b_S + nu 1)^T G_S^{-1} (b_S + nu 1) = s^2``: a quadratic in ``nu`` whose root
    with ``mu > 0`` is the minimiser. Without a real root, ``F`` decreases without bound on
    the hull, steepest along ``d = -G_S^{-1}(b_S + nu 1)`` with ``nu`` making ``sum d = 0``.

    ``support`` holds the face's indices in increasing order. Returns ``(True, w)`` (the
    minimiser, maybe outside the face), ``(False, d)`` (a direction of unbounded decrease),
    or ``None`` when ``G_S`` is singular (LAPACK's LU finds an exactly zero pivot, or the
    solution is not finite).
    """
    # LU (LAPACK's gesv), not Cholesky, as before the port. take and a filled empty array
    # give the same values as np.ix_ and np.stack, for less of the overhead that dominates
    # at these sizes
    g_s = gramian.take(support, 0).take(support, 1)
    b_s = b[support]
    rhs = np.empty((support.size, 2))
    rhs[:, 0] = 1.0
    rhs[:, 1] = b_s
    try:
        solved = np.linalg.solve(g_s, rhs)
    except np.linalg.LinAlgError:
        return None
    if not bool(np.isfinite(solved).all()):
        return None
    inv_one, inv_b = solved[:, 0], solved[:, 1]
    alpha, beta, gamma = float(inv_one.sum()), float(inv_b.sum()), float(b_s @ inv_b)
    if not alpha > 0.0:
        return None
    out = np.zeros(b.shape[0])
    disc = beta * beta - alpha * (gamma - s * s)
    if disc > 0.0:
        mu = math.sqrt(disc)
        nu = (-beta - mu) / alpha
        out[support] = -(inv_b + nu * inv_one) / mu
        return True, out
    out[support] = -(inv_b - (beta / alpha) * inv_one)
    return False, out


def _slopes(gramian: _Float, b: _Float, s: float, w: _Float) -> _Float | None:
    """The gradient ``b + s G w / ||g_w||`` of ``F`` at ``w`` (None where ``g_w = 0``)."""
    norm = math.sqrt(max(0.0, _quadratic(gramian, w)))
    if norm <= _ZERO_NORM:
        return None
    slope: _Float = b + s * (gramian @ w) / norm
    return slope


def _is_optimal(gramian: _Float, b: _Float, s: float, w: _Float) -> bool:
    """Whether ``w`` (on the simplex) satisfies the KKT conditions of the whole problem.

    With ``||g_w|| > 0`` the gradient of ``F`` must be equal (to ``-nu``) on the support of
    ``w`` and not smaller off it. ``F`` is convex, so these conditions certify the global
    minimum.
    """
    slope = _slopes(gramian, b, s, w)
    if slope is None or bool((w < 0).any()):
        return False
    support = w > 0
    level = _mean(slope[support])
    tol = 1e-10 * (float(np.abs(slope).max()) + 1.0)
    on_face = float(np.abs(slope[support] - level).max())
    below = float((level - slope[~support]).max()) if bool((~support).any()) else -math.inf
    return on_face <= tol and below <= tol


def _active_set(gramian: _Float, b: _Float, s: float) -> _Float | None:
    """A primal active-set method with exact face solutions; None if it cannot proceed.

    Start at the best vertex. Repeatedly: add the task whose slope is lowest below the
    face's (the most improving direction); minimise on the enlarged face by :func:`_face`;
    if the minimiser leaves the face (or ``F`` is unbounded on its hull), walk towards it
    until a weight reaches zero (``F`` decreases along the way, being convex) and drop that
    task. Every step decreases ``F`` and visits faces, so it ends in a few solves of size at
    most the support. It needs invertible ``G_S`` on the faces it visits (linearly
    independent gradients); otherwise the caller falls back to the barrier method.
    """
    k = b.shape[0]
    norms = np.sqrt(np.maximum(np.diagonal(gramian), 0.0))
    start = int(np.argmin(b + s * norms))
    w = np.zeros(k)
    w[start] = 1.0
    in_support = np.zeros(k, dtype=np.bool_)
    in_support[start] = True
    for _ in range(10 * k + 10):
        slope = _slopes(gramian, b, s, w)
        if slope is None:
            return None
        level = _mean(slope[in_support])
        outside = np.nonzero(~in_support)[0]
        if outside.size == 0:
            return w
        gains = slope[outside] - level
        best = int(np.argmin(gains))
        if float(gains[best]) >= -1e-10 * (float(np.abs(slope).max()) + 1.0):
            return w
        in_support[outside[best]] = True
        for _ in range(k + 1):
            support = np.nonzero(in_support)[0]
            face = _face(gramian, b, s, support)
            if face is None:
                return None
            bounded, target = face
            direction = target - w if bounded else target
            if bounded and bool((target[support] > 0).all()):
                w = target
                break
            falling = support[direction[support] < 0.0]
            if falling.size == 0:
                return None
            ratios = -w[falling] / direction[falling]
            first = int(np.argmin(ratios))  # the first of the smallest ratios
            step = float(ratios[first])
            if bounded:
                step = min(step, 1.0)
            w = np.maximum(w + step * direction, 0.0)
            w[falling[first]] = 0.0
            w = w / w.sum()
            in_support &= w > 0.0
        else:
            return None
    return None


def _certified_face(gramian: _Float, b: _Float, s: float, w: _Float) -> _Float | None:
    """The exact solution on a face suggested by a barrier iterate ``w``, if certified.

    Candidate supports: the tasks whose weight lies above one of the three largest ratio
    gaps in the sorted weights (plus all tasks): on the central path the weights of inactive
    tasks shrink like ``1/t`` while the active ones converge.
    """
    k = w.shape[0]
    # decreasing order, ties in index order (a stable sort of the negated weights)
    ranked = np.argsort(-w, kind="stable")
    sorted_w = np.maximum(w[ranked], 1e-300)
    ratios = sorted_w[:-1] / sorted_w[1:]
    sizes = [k] + [int(i) + 1 for i in np.argsort(-ratios, kind="stable")[:3]]
    for size in dict.fromkeys(sizes):
        face = _face(gramian, b, s, np.sort(ranked[:size]))
        if face is not None and face[0] and _is_optimal(gramian, b, s, face[1]):
            return face[1]
    return None


def _solve(gramian: _Float, b: _Float, s: float) -> _Float:
    """:func:`solve_cagrad` on NumPy arrays."""
    k = gramian.shape[0]
    if k == 1:
        return np.ones(1)
    exact = _active_set(gramian, b, s)
    if exact is not None and _is_optimal(gramian, b, s, exact):
        return exact
    w: _Float = np.full(k, 1.0 / k)
    tau = math.sqrt(max(0.0, _quadratic(gramian, w))) + 1.0
    x = np.append(w, tau)
    gap = _GAP * min(1.0, s)
    t = 1.0
    while True:
        x = _centre(x, t, gramian, b, s)
        w = x[:k] / x[:k].sum()
        certified = _certified_face(gramian, b, s, w)
        if certified is not None:
            return certified
        # on the central path ||g_w|| tends to its optimal value; once it is below the
        # threshold the minimiser has g_w = 0 (to that precision) and the caller's
        # convention applies, whatever further digits the barrier would find
        if (k + 2) / t < gap or _quadratic(gramian, w) <= _ZERO_NORM**2:
            return w
        t *= 10.0


def solve_cagrad(gramian: Tensor, b: Tensor, s: float) -> Tensor:
    """``argmin_{w in simplex} w^T b + s sqrt(w^T G w)`` (float64), to high accuracy.

    Computed in NumPy on the CPU; the result is a float64 tensor on the Gramian's device.

    First an active-set method whose faces are solved exactly in closed form
    (:func:`_active_set`); its result is returned when it satisfies the optimality
    conditions of the whole problem (:func:`_is_optimal`: a certificate, ``F`` being
    convex). Otherwise (singular faces: collinear or linearly dependent gradients, or zero
    in the convex hull) the problem is solved as a second-order cone program in
    ``(w, tau)``::

        min  b^T w + s tau   s.t.  tau >= sqrt(w^T G w),  w >= 0,  sum w = 1

    by a log-barrier (path-following) method: Newton steps on the barrier problems
    (:func:`_centre`) for ``t`` growing tenfold, trying after each centring to certify an
    exact face solution, until the duality gap bound ``(K + 2) / t`` is below about 1e-12
    (relative) or ``||g_w||`` is zero to the precision of :data:`_ZERO_NORM`.
    """
    w = _solve(_float64(gramian), _float64(b), s)
    return torch.from_numpy(w).to(gramian.device)


def cagrad_weights(gramian: Tensor, c: float, rescale: Literal[0, 1, 2] = 0) -> Tensor:
    """CAGrad's coefficients ``1/K + (c ||g_0|| / ||g_w||) w`` from the Gramian.

    ``g_0`` is the mean gradient and ``w`` solves
    ``min_{w in simplex} <g_w, g_0> + c ||g_0|| ||g_w||`` (:func:`solve_cagrad`), computed on
    the Gramian normalised by the mean squared gradient norm, so the coefficients do not
    depend on the scale of the gradients. ``rescale`` divides by 1 (0, the paper),
    ``1 + c^2`` (1) or ``1 + c`` (2), the options of the official code. The computation runs
    in float64 NumPy on the CPU; the coefficients are a float64 tensor on the Gramian's
    device.

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
    raw = _float64(gramian)
    k = raw.shape[0]
    # the normalisation of :func:`._common.normalized_gramian`: by the mean squared norm
    scale = float(np.diagonal(raw).sum()) / max(k, 1)
    g = raw / (scale if scale > 0 else 1.0)
    mean = np.full(k, 1.0 / k)
    divisor = (1.0, 1.0 + c * c, 1.0 + c)[rescale]
    g0_norm = math.sqrt(max(0.0, _quadratic(g, mean)))
    s = c * g0_norm
    if s <= 0.0:
        return torch.from_numpy(mean / divisor).to(device)
    index = np.flatnonzero(np.diagonal(g) > 0)
    g_live = g[np.ix_(index, index)]
    b = (g @ mean)[index]
    w_live = _solve(g_live, b, s)
    gw_norm = math.sqrt(max(0.0, _quadratic(g_live, w_live)))
    coef = mean.copy()
    if gw_norm > _ZERO_NORM:
        coef[index] += (s / gw_norm) * w_live
    elif c >= 1.0:
        coef[:] = 0.0
    return torch.from_numpy(coef / divisor).to(device)


@BALANCERS.register("cagrad")
class CAGrad(GramianWeighting):
    """Conflict-Averse Gradient descent (Liu et al., "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021, https://arxiv.org/abs/2110.14048).

    The update ``d`` maximises the worst task's improvement ``min_i <g_i, d>`` within a ball
    around the mean gradient ``g_0``: ``||d - g_0|| <= c ||g_0||``. Its dual is a K-dimensional
    problem over the simplex::

        w* = argmin_{w in simplex}  <g_w, g_0> + c ||g_0|| ||g_w||,    g_w = sum_k w_k g_k
        d  = g_0 + (c ||g_0|| / ||g_w*||) g_w*

    solved here in float64 NumPy on the CPU (:func:`solve_cagrad`: an active-set method with
    closed-form faces, certified by the optimality conditions, exact to rounding; a barrier
    method for singular cases; no cvxpy or scipy). The update is the paper's, based on the
    **mean** gradient; the effective weights are the coefficients of ``d``.

    Conventions and deviations:

    - ``rescale=0`` (default) is the paper's update. The official code (and LibMTL, whose
      default it is) can divide it by ``1 + c^2`` (``rescale=1``) or ``1 + c``
      (``rescale=2``); those are offered as options, not the default.
    - Scale: the problem is solved on the Gramian normalised by the mean squared gradient
      norm, so ``f(cJ) = c f(J)`` exactly up to rounding. TorchJD 0.18 thresholds the
      normalisation with an absolute epsilon and returns exactly zero for gradients of norm
      about 1e-6; LibMTL's solver does not move at large scales.
    - Where ``g_w* = 0`` the paper's formula is undefined; see :func:`cagrad_weights`.
      TorchJD returns zero there.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
        c: radius of the ball relative to ``||g_0||`` (``c >= 0``; 0 is the mean gradient).
        rescale: 0 (paper), 1 (divide by ``1 + c^2``) or 2 (divide by ``1 + c``).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        c: float = 0.5,
        rescale: Literal[0, 1, 2] = 0,
    ) -> None:
        super().__init__(tasks, level)
        self.c = check_number_option("c", c, low=0.0)
        if isinstance(rescale, bool) or rescale not in (0, 1, 2):
            raise ConfigError(f"balancer.options.rescale: expected 0, 1 or 2, found {rescale!r}.")
        self.rescale: Literal[0, 1, 2] = rescale

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        return cagrad_weights(gramian, self.c, self.rescale)
