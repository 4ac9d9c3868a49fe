"""Exact solvers for the tiny quadratic programs of Gramian-based methods.

Two K x K problems, both convex quadratic programs in the task weights:

* the **min-norm point of the convex hull** of the task gradients (MGDA)::

      min_w  w^T G w   subject to  w >= 0,  sum(w) = 1

* the **projection of each task gradient onto the dual cone** ``{v : J v >= 0}`` (UPGrad).
  Projecting ``g_i = J^T e_i`` gives ``J^T u`` with, by Proposition 1 of Quinton & Rey (2024)::

      u = argmin_u  u^T G u   subject to  u >= e_i

  (its KKT conditions ``G u = mu >= 0``, ``mu^T (u - e_i) = 0`` are exactly those of the
  projection: ``J (J^T u) = mu >= 0`` and ``J^T u - g_i = J^T (u - e_i)`` with
  ``u - e_i >= 0`` orthogonal to the active constraints).

Both are reduced to non-negative least squares, written on its normal equations (a
non-negative QP in K variables, :func:`nnqp`) and solved by the active-set method of Lawson &
Hanson (*Solving Least Squares Problems*, 1974, chapter 23): finite termination, exact up to
floating point, and rank deficiency handled by construction (a variable enters the passive
set only if its column is not in the span of the passive ones, so every equality-constrained
subproblem is positive definite). No regulariser is added anywhere.

Numerical conventions:

* Everything runs on the CPU in float64: the matrices are K x K, so moving one to the CPU
  (one device synchronisation per step) costs far less than a loop of tiny kernels. The
  work runs with a single intra-op thread (:func:`single_thread`): at this size waking
  worker threads costs far more than the arithmetic, and on a machine whose cores are busy
  (data-loading workers, other jobs) it made the solvers 15-20 times slower (K = 3 MGDA:
  48 ms instead of 2 ms on a loaded 2-core machine).
* The Gramian is first reduced to the correlation matrix ``C = N^-1 G N^-1`` with
  ``N = diag(||g_k||)``. Both problems have an exact change of variables to ``C``, which makes
  the result invariant to the scale of every task's gradient (not just to a global scale), keeps
  the directions of small-norm tasks as accurate as those of large ones, and gives every
  tolerance a fixed meaning (cosines).
* Tasks with an exactly zero gradient (``G_kk == 0``) are handled in closed form; collinear or
  nearly collinear gradients make ``C`` singular, which the active-set method handles without
  any ridge.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["correlation", "dual_cone_weights", "min_norm_weights", "nnqp", "single_thread"]

_EPS = float(torch.finfo(torch.float64).eps)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed tiny CPU computations with one intra-op thread, then restore.

    Only with PyTorch's OpenMP threading backend, where the setting is cheap to change (the
    native thread pool refuses changes once started).
    """
    threads = torch.get_num_threads()
    openmp = torch.backends.openmp.is_available()  # type: ignore[no-untyped-call]
    if threads == 1 or not openmp:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _to_cpu_float64(gramian: Tensor) -> Tensor:
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square K x K Gramian, found shape {tuple(gramian.shape)}")
    g = gramian.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("the Gramian has non-finite entries")
    return (g + g.T) / 2


def correlation(gramian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The correlation form of a Gramian (CPU, float64).

    Returns ``(norms, nonzero, c)``: the gradient norms ``sqrt(G_kk)``, the mask of tasks with a
    non-zero gradient, and the correlation matrix ``C_ij = G_ij / (|g_i| |g_j|)`` restricted to
    those tasks (unit diagonal, entries clamped to [-1, 1]).
    """
    g = _to_cpu_float64(gramian)
    norms = g.diagonal().clamp_min(0.0).sqrt()
    nonzero = norms > 0
    n = norms[nonzero]
    c = (g[nonzero][:, nonzero] / (n[:, None] * n[None, :])).clamp(-1.0, 1.0)
    c.fill_diagonal_(1.0)
    return norms, nonzero, c


def nnqp(q: Tensor, lin: Tensor, max_iter: int | None = None) -> Tensor:
    """``argmin_{x >= 0} x^T q x / 2 + lin_b^T x`` for every row ``lin_b`` of ``lin``.

    ``q`` is n x n symmetric positive semi-definite, ``lin`` is B x n (CPU, float64); the B
    problems share ``q`` and are solved together, batched. This is Lawson and Hanson's NNLS
    active-set method written on the normal equations (``q = A^T A``, ``lin = -A^T b``):
    with ``x`` optimal on the passive set ``P``, the variable with the largest positive dual
    value ``-(q x + lin)_t`` enters ``P``; the equality-constrained subproblem
    ``q_PP z_P = -lin_P`` is solved (Cholesky); if some ``z_j <= 0`` the iterate moves to
    the boundary along ``z - x`` and those variables leave ``P``. Every outer step strictly
    decreases the objective, so the method terminates; it stops when no dual value exceeds
    its rounding-error bound ``16 n eps (|q| |x| + |lin|)``.

    Singular ``q`` (collinear gradients) needs no regulariser: a variable enters only when
    its dual value is positive, which in exact arithmetic means its column is not in the
    span of the passive ones, so ``q_PP`` stays positive definite. A variable whose entry
    makes the subproblem numerically singular or gives it a non-positive coefficient (its
    dual value was rounding noise) is skipped until the iterate moves (Lawson and Hanson's
    own safeguard).

    ``max_iter`` (default ``10 n + 20``) bounds the number of batched subproblem solves as a
    guard against cycling through rounding; reaching it (or a subproblem that turns
    singular after its first solve, which exact arithmetic rules out) is reported with a
    ``RuntimeWarning`` and the last (feasible) iterates are returned.
    """
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


def min_norm_weights(gramian: Tensor) -> Tensor:
    """The weights of the min-norm point of the convex hull of the rows (MGDA's QP).

    Solves ``min_w w^T G w`` subject to ``w >= 0`` and ``sum(w) = 1``; returns ``w`` (float64
    on ``gramian``'s device).

    In correlation form (``w_k`` proportional to ``v_k / |g_k|``) the problem is
    ``min v^T C v`` subject to ``v >= 0`` and ``a^T v = 1`` with ``a_k = 1/|g_k|``. Its KKT
    conditions (``C v - nu a >= 0``, complementary to ``v``) are those of the non-negative
    least-squares problem ``min ||R v||^2 + (gamma a^T v - 1)^2`` (``R^T R = C``, any
    ``gamma > 0``) once its solution is divided by ``a^T v`` (Wolfe's reduction; the solution
    is never 0, where the gradient is ``-gamma a < 0``). On the normal equations that is
    :func:`nnqp` with ``q = C + gamma^2 a a^T`` and ``lin = -gamma a``;
    ``gamma = min_k |g_k|`` keeps ``gamma a`` in (0, 1].

    If a task's gradient is exactly zero the origin is in the hull, the minimum norm is 0 and
    the weights are spread equally over the zero-gradient tasks (every optimal ``w`` gives
    the same, zero, combined gradient; this choice is symmetric in the tasks).
    """
    with single_thread():
        norms, nonzero, c = correlation(gramian)
        if not bool(nonzero.all()):
            zero = (~nonzero).to(torch.float64)
            return (zero / zero.sum()).to(gramian.device)
        a = norms.min() / norms
        v = nnqp(c + a[:, None] * a[None, :], -a[None, :])[0]
        w = v / norms
        return (w / w.sum()).to(gramian.device)


def dual_cone_weights(gramian: Tensor) -> Tensor:
    """Row ``i``: the ``u`` with ``J^T u`` the projection of ``g_i`` onto ``{v : J v >= 0}``.

    Solves ``min_u u^T G u`` subject to ``u >= e_i`` for every task ``i``; returns the K x K
    matrix of solutions, one per row (float64 on ``gramian``'s device).

    In correlation form ``u_j = (|g_i| / |g_j|) (e_i + x)_j`` with
    ``x = argmin_{x >= 0} (e_i + x)^T C (e_i + x)``, i.e. :func:`nnqp` with ``q = C`` and
    ``lin = C e_i``; the K problems are solved together. A gradient that conflicts with no
    other (``C_ij >= 0`` for all ``j``) is its own projection: ``x = 0`` passes the
    optimality test at once. A task with a zero gradient is its own projection too; in the
    other tasks' problems its coefficient stays at its lower bound 0 (it does not change
    ``J^T u``).
    """
    k = gramian.shape[0]
    with single_thread():
        norms, nonzero, c = correlation(gramian)
        out = torch.zeros(k, k, dtype=torch.float64)
        idx = nonzero.nonzero().squeeze(1)
        zero = (~nonzero).nonzero().squeeze(1)
        out[zero, zero] = 1.0
        if idx.numel() > 0:
            u = torch.eye(idx.numel(), dtype=torch.float64) + nnqp(c, c)
            n = norms[idx]
            out[idx[:, None], idx[None, :]] = n[:, None] * u / n[None, :]
    return out.to(gramian.device)
