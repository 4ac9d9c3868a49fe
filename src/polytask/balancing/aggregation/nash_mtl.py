"""Nash-MTL: the Nash bargaining solution between tasks, solved by damped Newton steps."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ...errors import CheckpointError, ConfigError, TrainingDiverged
from ..base import BALANCERS, BackwardContext
from ..gradient import GramianWeighting, Level
from ._qp import correlation, single_thread

__all__ = ["NashMTL", "NashMTLNotConverged", "bargaining_solution"]

OnFailure = Literal["raise", "warn"]

_EPS = float(torch.finfo(torch.float64).eps)
#: the largest rounding error of the residual for which a solution is accepted (1%: ten
#: times the official code's stopping threshold); beyond it the problem is too ill-conditioned for
#: float64 to tell a solution from none (e.g. exactly opposite gradients, whose rounded
#: Gramian is barely positive definite)
_ACCEPTABLE = 1e-2


def _converged(residual: float, bound: float, tol: float) -> bool:
    return bound <= _ACCEPTABLE and residual <= max(tol, bound)


class NashMTLNotConverged(TrainingDiverged):
    """The Nash-MTL bargaining solver did not converge (``on_failure="raise"``; exit code 3)."""


def bargaining_solution(
    c: Tensor, start: Tensor, max_iter: int, tol: float
) -> tuple[Tensor, float, float, int]:
    """Solve ``beta_i (C beta)_i = 1`` for ``beta > 0`` (CPU, float64).

    ``beta`` is the minimiser of the strictly convex, self-concordant function
    ``f(beta) = beta^T C beta / 2 - sum_i log beta_i`` (its gradient is ``C beta - 1/beta``).
    Each iteration first rescales ``beta`` to the minimum of ``f`` along its ray
    (``beta^T C beta = K``, which the solution satisfies), then takes a Newton step, damped
    by ``1 / (1 + lambda)`` while the Newton decrement ``lambda`` is at least 1/4 (Nesterov's
    damped Newton method: it stays in ``beta > 0``, decreases ``f`` at every step and
    converges quadratically once ``lambda < 1/4``). The Newton system is solved in the
    scaled form ``(D C D + I) z = 1 - beta * (C beta)``, ``D = diag(beta)``, whose matrix has
    every eigenvalue at least 1 even when ``C`` is singular.

    It stops when the residual ``max_i |beta_i (C beta)_i - 1|`` is at most ``tol``, or at
    most the rounding error of computing it, ``bound = 4 K eps max_i beta_i (|C| beta)_i``
    (nearly Pareto-stationary gradients make ``beta`` huge and the residual cannot get below
    that in float64), provided that bound is at most 1e-2: beyond it float64 cannot tell a
    solution from none. Returns ``beta``, the residual, the rounding bound and the number of
    Newton steps; converged means ``bound <= 1e-2 and residual <= max(tol, bound)``. A
    solution exists if and only if no non-negative, non-zero combination of the gradients is
    0 (otherwise ``f`` is unbounded below and the iterates diverge along that combination).
    """
    k = start.shape[0]
    identity = torch.eye(k, dtype=torch.float64)
    abs_c = c.abs()
    beta = start
    for step in range(max_iter + 1):
        quad = float(beta @ c @ beta)
        if quad > 0 and math.isfinite(quad):
            beta = beta * math.sqrt(k / quad)
        rho = beta * (c @ beta) - 1.0
        residual = float(rho.abs().max())
        bound = 4 * k * _EPS * float((beta * (abs_c @ beta)).max())
        if not (math.isfinite(residual) and math.isfinite(bound)):
            return beta, math.inf, 0.0, step
        if _converged(residual, bound, tol) or step == max_iter:
            return beta, residual, bound, step
        z, info = torch.linalg.solve_ex(beta[:, None] * c * beta[None, :] + identity, -rho)
        if int(info) != 0:
            return beta, residual, bound, step
        decrement = math.sqrt(max(float(-(rho @ z)), 0.0))
        beta = beta * (1.0 + (1.0 if decrement < 0.25 else 1.0 / (1.0 + decrement)) * z)
    raise AssertionError("unreachable")


@BALANCERS.register("nash_mtl")
class NashMTL(GramianWeighting):
    """Nash-MTL (Navon et al., ICML 2022, "Multi-Task Learning as a Bargaining Game",
    https://arxiv.org/abs/2202.01017).

    The update is the Nash bargaining solution ``d = alpha @ J`` with ``alpha > 0`` solving
    the paper's condition (Section 3.1)::

        (G alpha)_i = 1 / alpha_i   for every task i,     G = J J^T

    (the maximiser of ``sum_i log(g_i . d)`` over a ball). It follows that
    ``alpha^T G alpha = K``: the update has norm ``sqrt(K)`` whatever the gradients' scale,
    and ``g_i . d = 1/alpha_i > 0`` for every task. So, unlike most gradient methods, the
    weights scale as ``1/c`` when the gradients are multiplied by ``c`` and the combined
    gradient is scale-*invariant*: that is the paper's formula, and it is what this class
    computes at any scale.

    Solver: the official code (and TorchJD) linearise the problem and call a convex solver
    (cvxpy/ECOS) at most ``optim_niter = 20`` times, stopping at a residual of 1e-3; the
    solution is missed at gradient scales of 1e-6 and 1e6 and after warm-started steps.
    Here the condition is solved exactly by damped Newton steps on a strictly convex
    function (:func:`bargaining_solution`), in the correlation form of the Gramian
    (``beta_i = |g_i| alpha_i``, invariant to the scale of every gradient), warm-started from
    the previous step's ``alpha``. It stops when ``max_i |alpha_i (G alpha)_i - 1| <= tol``,
    which bounds the relative residual ``||G alpha - 1/alpha|| / ||1/alpha||`` by ``tol``
    (or, for nearly Pareto-stationary gradients where float64 cannot do better, when the
    residual is within its own rounding error, provided that is at most 1e-2).

    No silent fallback: if ``max_iter`` Newton steps do not reach ``tol`` (in particular when
    no solution exists, i.e. some non-negative combination of the gradients is 0, such as two
    exactly opposite gradients), ``on_failure="raise"`` raises :class:`NashMTLNotConverged`
    (a :class:`~polytask.errors.TrainingDiverged`, exit code 3) and ``"warn"`` emits a
    ``RuntimeWarning`` naming the step and the residual and keeps the previous step's
    ``alpha`` (tasks without one get the solver's starting point, the best multiple of
    ``1/|g_i|``).

    A task whose gradient is exactly zero cannot enter the bargaining (its condition has no
    solution); it gets weight 0 (which does not change the update) and the others bargain.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
        max_iter: Newton steps per solve.
        tol: tolerance on ``max_i |alpha_i (G alpha)_i - 1|``.
        update_weights_every: solve every this many calls and reuse ``alpha`` in between
            (the official option; it re-solves whenever the set of tasks differs from that
            of the last solve).
        max_norm: if positive, ``alpha`` is scaled down so that ``||alpha @ J|| <= max_norm``
            (the official code clips the shared gradient to norm 1 after the backward pass;
            TorchJD clips ``alpha``). 0 (default) keeps the paper's condition.
        on_failure: ``"warn"`` (default) or ``"raise"``, see above.

    State (saved in checkpoints): the last ``alpha`` of each task, the number of calls and the
    tasks of the last solve.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        max_iter: int = 100,
        tol: float = 1e-10,
        update_weights_every: int = 1,
        max_norm: float = 0.0,
        on_failure: OnFailure = "warn",
    ) -> None:
        super().__init__(tasks, level)
        for key, value in (("max_iter", max_iter), ("update_weights_every", update_weights_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"balancer.options.{key}: expected a positive integer, found {value!r}."
                )
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise ConfigError(f"balancer.options.tol: expected a number in (0, 1), found {tol!r}.")
        if (
            isinstance(max_norm, bool)
            or not isinstance(max_norm, (int, float))
            or not (math.isfinite(max_norm) and max_norm >= 0)
        ):
            raise ConfigError(
                f"balancer.options.max_norm: expected a number >= 0 (0: no clipping), "
                f"found {max_norm!r}."
            )
        if on_failure not in get_args(OnFailure):
            raise ConfigError(
                f"balancer.options.on_failure: expected raise or warn, found {on_failure!r}."
            )
        self.max_iter = max_iter
        self.tol = float(tol)
        self.update_weights_every = update_weights_every
        self.max_norm = float(max_norm)
        self.on_failure: OnFailure = on_failure
        self._alpha: dict[str, float] = {}
        self._calls = 0
        self._solved_for: tuple[str, ...] = ()
        self._tasks: tuple[str, ...] | None = None
        self._step: int | None = None
        #: residual ``max_i |alpha_i (G alpha)_i - 1|`` and Newton steps of the last solve
        self.last_residual: float = math.nan
        self.last_iterations: int = 0

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        self._step = ctx.step
        try:
            return super().backward(losses, ctx)
        finally:
            self._step = None

    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        self._tasks = tuple(tasks)
        try:
            return super().aggregate(jacobian, tasks)
        finally:
            self._tasks = None

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        """``alpha`` for the tasks of the current step (all tasks when called directly)."""
        tasks = self._tasks if self._tasks is not None else self.task_names
        if len(tasks) != gramian.shape[0]:
            raise ValueError(
                f"a {gramian.shape[0]} x {gramian.shape[0]} Gramian for {len(tasks)} tasks; "
                "call backward() or pass the Gramian of all tasks"
            )
        call = self._calls
        self._calls += 1
        reuse = (
            call % self.update_weights_every != 0
            and tasks == self._solved_for
            and all(t in self._alpha for t in tasks)
        )
        if reuse:
            alpha = torch.tensor([self._alpha[t] for t in tasks], dtype=torch.float64)
        else:
            alpha = self._solve(gramian, tasks, call)
        if self.max_norm > 0:
            g = gramian.detach().to(device="cpu", dtype=torch.float64)
            norm = math.sqrt(max(float(alpha @ g @ alpha), 0.0))
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return alpha.to(gramian.device)

    def _solve(self, gramian: Tensor, tasks: tuple[str, ...], call: int) -> Tensor:
        norms, nonzero, c = correlation(gramian)
        alpha = torch.zeros(len(tasks), dtype=torch.float64)
        idx = nonzero.nonzero().squeeze(1)
        if idx.numel() == 0:
            self.last_residual, self.last_iterations = 0.0, 0
            return alpha
        n = norms[idx]
        names = [tasks[i] for i in idx.tolist()]
        previous = torch.tensor([self._alpha.get(t, math.nan) for t in names], dtype=n.dtype)
        known = torch.isfinite(previous) & (previous > 0)
        start = torch.where(known, previous * n, 1.0)
        quad = float(start @ c @ start)
        if quad > 0:
            start = start * math.sqrt(len(names) / quad)
        with single_thread():
            beta, residual, bound, steps = bargaining_solution(c, start, self.max_iter, self.tol)
        self.last_residual, self.last_iterations = residual, steps
        if _converged(residual, bound, self.tol):
            alpha[idx] = beta / n
            self._alpha.update(zip(names, (beta / n).tolist(), strict=True))
            self._solved_for = tasks
            return alpha
        where = f"step {self._step + 1}" if self._step is not None else f"call {call + 1}"
        message = (
            f"nash_mtl: the bargaining solver did not converge at {where}: residual "
            f"max_i |alpha_i (G alpha)_i - 1| = {residual:.3g} > tol = {self.tol:g} after "
            f"{steps} Newton steps (balancer.options.max_iter={self.max_iter}). A solution "
            "exists only if no non-negative combination of the task gradients is zero."
        )
        if self.on_failure == "raise":
            raise NashMTLNotConverged(message + " Raise max_iter or use on_failure=warn.")
        warnings.warn(message + " Keeping the previous weights.", RuntimeWarning, stacklevel=2)
        alpha[idx] = torch.where(known, previous, start / n)
        return alpha

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "alpha": dict(self._alpha),
            "calls": self._calls,
            "solved_for": list(self._solved_for),
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("alpha", {}), dict):
            raise CheckpointError(
                f"the nash_mtl balancer state should be a dict with an 'alpha' dict, found "
                f"{type(state).__name__}"
            )
        alpha = state.get("alpha", {})
        self._alpha = {str(t): float(a) for t, a in alpha.items()}
        self._calls = int(state.get("calls", 0))
        self._solved_for = tuple(str(t) for t in state.get("solved_for", ()))
