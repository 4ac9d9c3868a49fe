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

:func:`min_norm_weights` and :func:`dual_cone_weights` first hand their problems, in
least-squares form, to SciPy's compiled implementation of the same Lawson-Hanson method
(``scipy.optimize.nnls``, Householder updates instead of a factorisation per step), and keep
its answer only if it passes the KKT conditions of the problem as posed here (up to rounding);
otherwise the NumPy active-set method below solves it again (:func:`_nnqp_factored`). The
check makes the fast path safe and the active-set method the reference; on the seeded test
families the fast path answers every problem. At K = 40 MGDA's weights cost 0.7 ms that way
instead of 7-8 ms.

Numerical conventions:

* Everything runs on the CPU in float64, in NumPy: the matrices are K x K, so moving one to
  the CPU (one device synchronisation per step) costs far less than a loop of tiny kernels,
  and on arrays this small a NumPy operation costs a fraction of a torch one (0.3-1 us
  against 1.5-5 us), which is most of the solvers' time. Tensors come in and go out (the
  results on the Gramian's device). No torch intra-op threads are involved; NumPy's BLAS
  (OpenBLAS) keeps its own threading, and at these sizes one or two threads made no
  measurable difference. (:func:`single_thread` stays for other methods' tiny torch
  computations: with torch, waking worker threads costs far more than the arithmetic, and on
  a machine whose cores are busy it made these solvers 15-20 times slower.)
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

import numpy as np
import numpy.typing as npt
import scipy.optimize
import torch
from torch import Tensor

__all__ = ["correlation", "dual_cone_weights", "min_norm_weights", "nnqp", "single_thread"]

_EPS = float(np.finfo(np.float64).eps)

_Float = npt.NDArray[np.float64]
_Bool = npt.NDArray[np.bool_]


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed tiny CPU computations with one intra-op thread, then restore.

    Only with PyTorch's OpenMP threading backend, where the setting is cheap to change (the
    native thread pool refuses changes once started). The solvers of this module no longer
    need it (they run in NumPy); other methods' tiny torch computations use it.
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


def _float64(tensor: Tensor) -> _Float:
    """``tensor`` as a float64 NumPy array on the CPU (it may share the tensor's memory)."""
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy(force=True)


def _symmetric(gramian: Tensor) -> _Float:
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square K x K Gramian, found shape {tuple(gramian.shape)}")
    g = _float64(gramian)
    if not bool(np.isfinite(g).all()):
        raise ValueError("the Gramian has non-finite entries")
    sym: _Float = (g + g.T) / 2
    return sym


def _correlation(gramian: Tensor) -> tuple[_Float, _Bool, _Float]:
    """:func:`correlation` as NumPy arrays."""
    g = _symmetric(gramian)
    norms: _Float = np.sqrt(np.maximum(np.diagonal(g), 0.0))
    nonzero: _Bool = norms > 0
    if bool(nonzero.all()):
        n, sub = norms, g
    else:
        n, sub = norms[nonzero], g[np.ix_(nonzero, nonzero)]
    c: _Float = np.clip(sub / (n[:, None] * n[None, :]), -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    return norms, nonzero, c


def correlation(gramian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The correlation form of a Gramian (CPU, float64).

    Returns ``(norms, nonzero, c)``: the gradient norms ``sqrt(G_kk)``, the mask of tasks with a
    non-zero gradient, and the correlation matrix ``C_ij = G_ij / (|g_i| |g_j|)`` restricted to
    those tasks (unit diagonal, entries clamped to [-1, 1]).
    """
    norms, nonzero, c = _correlation(gramian)
    return torch.from_numpy(norms), torch.from_numpy(nonzero), torch.from_numpy(c)


def _cholesky_solve(system: _Float, rhs: _Float) -> tuple[_Float, _Bool]:
    """Solve every ``system[i] z_i = rhs[i]`` by Cholesky; also say which factorisations failed.

    ``system`` is m x w x w, ``rhs`` m x w. A failed factorisation (a system that is not
    numerically positive definite: LAPACK's ``potrf`` info != 0, as in
    ``torch.linalg.cholesky_ex``) gives ``failed[i]`` and a zero solution. NumPy's batched
    Cholesky raises if any system fails, so on a failure (rare) the systems are factored one
    by one to find which. NumPy has no triangular solve: the two triangular systems are
    solved with ``np.linalg.solve`` (LU of the factor); one whose factor LU calls singular
    (only possible through rounding, the factor's diagonal being positive) counts as failed.
    """
    try:
        return _factor_and_solve(system, rhs), np.zeros(len(system), dtype=np.bool_)
    except np.linalg.LinAlgError:
        pass
    solution = np.zeros_like(rhs)
    failed = np.zeros(len(system), dtype=np.bool_)
    for i in range(len(system)):
        try:
            solution[i] = _factor_and_solve(system[i], rhs[i])
        except np.linalg.LinAlgError:
            failed[i] = True
    return solution, failed


def _factor_and_solve(system: _Float, rhs: _Float) -> _Float:
    factor = np.linalg.cholesky(system)
    half = np.linalg.solve(factor, rhs[..., None])
    solution: _Float = np.linalg.solve(np.swapaxes(factor, -1, -2), half)[..., 0]
    return solution


def _passive_solve(
    q: _Float, lin: _Float, passive: _Bool, sel: npt.NDArray[np.intp], eye: _Float
) -> tuple[_Float, _Bool]:
    """``z`` with ``q_PP z_P = -lin_P`` and ``z = 0`` off ``P``, for the problems ``sel``.

    Returns ``z`` (B x n, zero in the rows not in ``sel``) and the rows whose subproblem could
    not be factored. Only the problems still being solved are factored (the others' results
    would be discarded), and each system is the passive block alone (its variables in their
    order, padded with the identity up to the largest passive set of the batch): the same
    solutions as the identity-padded n x n systems of all B problems, for less work.
    """
    b, n = passive.shape
    p = passive[sel]
    size = p.sum(axis=1)
    w = max(int(size.max()), 1)
    # the passive variables first, in increasing order (a stable sort of "not passive")
    var = np.argsort(~p, axis=1, kind="stable")[:, :w]
    keep = np.arange(w) < size[:, None]
    system = np.where(
        keep[:, :, None] & keep[:, None, :], q[var[:, :, None], var[:, None, :]], eye[:w, :w]
    )
    rhs = np.where(keep, -lin[sel[:, None], var], 0.0)
    solution, bad = _cholesky_solve(system, rhs)
    z = np.zeros((b, n))
    z[sel[:, None], var] = np.where(keep, solution, 0.0)
    failed = np.zeros(b, dtype=np.bool_)
    failed[sel] = bad
    return z, failed


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

    The work is done in NumPy (float64); the result is a CPU float64 tensor.
    """
    x = _nnqp(_float64(q), _float64(lin), max_iter, stacklevel=3)
    return torch.from_numpy(x)


def _nnqp(q: _Float, lin: _Float, max_iter: int | None, stacklevel: int = 2) -> _Float:
    """:func:`nnqp` on NumPy arrays; ``stacklevel`` is that of its warnings."""
    b, n = lin.shape
    limit = 10 * n + 20 if max_iter is None else max_iter
    x = np.zeros((b, n))
    passive = np.zeros((b, n), dtype=np.bool_)
    skipped = np.zeros((b, n), dtype=np.bool_)
    done = np.zeros(b, dtype=np.bool_)
    inner = np.zeros(b, dtype=np.bool_)
    entering = np.zeros(b, dtype=np.bool_)
    t = np.zeros(b, dtype=np.intp)
    eye = np.eye(n)
    abs_q, abs_lin = np.abs(q), np.abs(lin)
    scale = 16 * n * _EPS
    rows = np.arange(b)
    stuck = np.zeros(b, dtype=np.bool_)
    for _ in range(limit):
        outer = ~done & ~inner
        if bool(outer.any()):
            dual = -(x @ q + lin)
            tol = scale * (np.abs(x) @ abs_q + abs_lin)
            candidates = outer[:, None] & ~passive & ~skipped & (dual > tol)
            found = candidates.any(axis=1)
            done |= outer & ~found
            new = outer & found
            t = np.where(new, np.where(candidates, dual, -np.inf).argmax(axis=1), t)
            passive[rows[new], t[new]] = True
            inner |= new
            entering = new
        active = ~done & inner
        sel = np.flatnonzero(active)
        if sel.size == 0:
            if bool(stuck.any()):
                warnings.warn(
                    "the active-set QP solver met a numerically singular subproblem and kept "
                    "its last feasible iterate, which may not be optimal",
                    RuntimeWarning,
                    stacklevel=stacklevel,
                )
            return x
        z, failed = _passive_solve(q, lin, passive, sel, eye)
        accept = active & ~failed & ((z > 0) | ~passive).all(axis=1)
        x = np.where(accept[:, None], z, x)
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
            # 0 / 0 (a blocking variable already at 0) gives NaN, as in the torch original
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(blocking, x / (x - np.where(blocking, z, -1.0)), np.inf)
            k = ratio.argmin(axis=1)
            step = ratio[rows, k]
            stepped = x + np.minimum(step, 1.0)[:, None] * (z - x)
            stepped[rows, k] = 0.0
            leaving = move[:, None] & passive & (stepped <= 0)
            x = np.where(move[:, None], np.maximum(stepped, 0.0), x)
            passive &= ~leaving
        skipped &= ~(accept | move)[:, None]
        entering &= ~active
    warnings.warn(
        f"the active-set QP solver stopped after {limit} subproblem solves without meeting "
        "its optimality test; the result is feasible but may not be optimal",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
    return x


# tolerance factor of the optimality check of the fast path (times n eps and the magnitudes)
_CHECK = 256


def _factor(c: _Float) -> _Float:
    """An ``R`` with ``R^T R = C`` (C symmetric positive semi-definite), from C's
    eigendecomposition; eigenvalues below zero (rounding) count as zero."""
    lam, vec = np.linalg.eigh(c)
    r: _Float = np.sqrt(np.maximum(lam, 0.0))[:, None] * vec.T
    return r


def _optimal(q: _Float, lin: _Float, x: _Float) -> bool:
    """The KKT conditions of ``min_{x >= 0} x^T q x / 2 + lin^T x`` hold for ``x`` up to
    rounding: ``x >= 0``, ``q x + lin >= 0``, and ``q x + lin = 0`` where ``x > 0``."""
    grad = q @ x + lin
    tol = _CHECK * q.shape[0] * _EPS * (np.abs(q) @ np.abs(x) + np.abs(lin))
    return bool(
        np.isfinite(x).all()
        and (x >= 0).all()
        and (grad >= -tol).all()
        and (np.abs(grad) <= tol)[x > 0].all()
    )


def _nnqp_factored(q: _Float, lin: _Float, a: _Float, b: _Float) -> _Float:
    """:func:`_nnqp` for problems also given in least-squares form.

    Row ``i`` of ``lin`` must equal ``-a^T b_i`` and ``q`` must be ``a^T a`` (up to
    rounding): then ``argmin_{x >= 0} ||a x - b_i||^2`` is the same problem. That form is
    solved first by SciPy's compiled Lawson-Hanson NNLS (``scipy.optimize.nnls``, the same
    active-set method with Householder updates instead of one factorisation per step: at
    K = 40 a tenth of the time of the batched NumPy loop, whose cost is per-step overhead).
    Every solution is then checked against the KKT conditions of ``(q, lin_i)``; a row
    whose solution fails the check, or whose NNLS hit its iteration limit, is solved again
    by :func:`_nnqp`, which then decides (and warns if it cannot finish). Rows whose
    optimum is ``x = 0`` (no dual value above rounding at the origin, such as UPGrad's
    tasks that conflict with none) are not handed to either solver.
    """
    rows, n = lin.shape
    x = np.zeros((rows, n))
    todo: list[int] = []
    tol = 16 * n * _EPS * np.abs(lin)
    for i in range(rows):
        if not bool((-lin[i] > tol[i]).any()):
            continue  # x = 0 is optimal: the active-set method's first test
        try:
            xi, _ = scipy.optimize.nnls(a, b[i], maxiter=10 * n + 20)
        except RuntimeError:  # its iteration limit
            todo.append(i)
            continue
        if _optimal(q, lin[i], xi):
            x[i] = xi
        else:
            todo.append(i)
    if todo:
        x[todo] = _nnqp(q, lin[todo], None, stacklevel=3)
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
    norms, nonzero, c = _correlation(gramian)
    if not bool(nonzero.all()):
        zero = (~nonzero).astype(np.float64)
        return torch.from_numpy(zero / zero.sum()).to(gramian.device)
    a = norms.min() / norms
    # least-squares form: || [R; a^T] v - e_last ||^2 with R^T R = C
    ls = np.vstack([_factor(c), a[None, :]])
    target = np.zeros((1, ls.shape[0]))
    target[0, -1] = 1.0
    v = _nnqp_factored(c + a[:, None] * a[None, :], -a[None, :], ls, target)[0]
    w = v / norms
    return torch.from_numpy(w / w.sum()).to(gramian.device)


def dual_cone_weights(gramian: Tensor, eps: float = _EPS) -> Tensor:
    """Row ``i``: the ``u`` with ``J^T u`` the projection of ``g_i`` onto ``{v : J v >= 0}``.

    ``eps`` is the relative precision of the rows behind ``gramian`` (float64's by default;
    float32's for float32 gradients): where the optimal ``u`` is not unique, the bounded,
    minimum-norm one is returned, at that precision (see :func:`_dual_cone_problems`).

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
    norms, nonzero, c = _correlation(gramian)
    k = norms.shape[0]
    if bool(nonzero.all()):
        u = np.eye(k) + _dual_cone_problems(c, eps)
        out = norms[:, None] * u / norms[None, :]
    else:
        out = np.zeros((k, k))
        idx = np.flatnonzero(nonzero)
        zero = np.flatnonzero(~nonzero)
        out[zero, zero] = 1.0
        if idx.size > 0:
            u = np.eye(idx.size) + _dual_cone_problems(c, eps)
            n = norms[idx]
            out[np.ix_(idx, idx)] = n[:, None] * u / n[None, :]
    return torch.from_numpy(out).to(gramian.device)


def _dual_cone_problems(c: _Float, eps: float = _EPS) -> _Float:
    """Row ``i``: the minimum-norm ``argmin_{x >= 0} (e_i + x)^T C (e_i + x)``, i.e. of
    ``||R x + R e_i||^2``, for rows known to relative precision ``eps``.

    The minimiser is unique exactly when no non-negative combination of the rows of ``C``
    involved is zero. When one is (a *weakly stationary* Jacobian: ``J^T v = 0`` for some
    ``v >= 0``, ``v != 0``), every ``x + t v`` is optimal too, the optimal set is unbounded,
    and an active-set solver may return coefficients of 1e11 or more whose combination
    ``J^T u`` is lost to cancellation. Such rows are solved again, regularised:
    ``argmin_{x >= 0} ||R (e_i + x)||^2 + delta^2 ||x||^2`` with ``delta^2 = K eps``, whose
    solution is unique, never longer than the minimum-norm optimum (hence bounded) and tends
    to it as ``delta -> 0``; its objective exceeds the optimum by at most
    ``delta^2 ||x_min||^2``, and its KKT conditions give ``C (e_i + x) >= -delta^2 x``: the
    projection conflicts with no task beyond rounding. A row is solved again when a
    coefficient exceeds ``1 / sqrt(eps)`` (on the correlation scale, where every diagonal
    entry is 1, a coefficient that large means more than half of the digits of ``J^T u``
    would cancel). With float32 rows (``eps`` float32's) the same holds for an optimal set
    that is unbounded only up to the rows' own rounding: the Gramian does not know them
    better than that.
    """
    r = _factor(c)
    x = _nnqp_factored(c, c, r, -r.T)
    bound = 1.0 / np.sqrt(eps)
    redo = np.flatnonzero(~np.isfinite(x).all(axis=1) | (np.abs(x).max(axis=1) > bound))
    if redo.size:
        k = c.shape[0]
        delta2 = k * eps
        q = c + delta2 * np.eye(k)
        a = np.vstack([r, np.sqrt(delta2) * np.eye(k)])
        b = np.hstack([-r.T, np.zeros((k, k))])
        x[redo] = _nnqp_factored(q, c[redo], a, b[redo])
    return x
