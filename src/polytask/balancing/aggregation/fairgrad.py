"""FairGrad: alpha-fair weights, the positive root of ``G w = w^(-1/alpha)``, solved exactly."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from ...errors import ConfigError, TrainingDiverged
from ..base import BALANCERS, BackwardContext
from ..gradient import GramianWeighting, Level
from ._common import check_int_option, check_number_option
from ._qp import single_thread

__all__ = ["FairGrad", "FairGradNotConverged", "fair_weights"]

OnFailure = Literal["raise", "warn"]

_EPS = float(torch.finfo(torch.float64).eps)
#: the largest rounding error of the residual for which a solution is accepted (as Nash-MTL)
_ACCEPTABLE = 1e-2


class FairGradNotConverged(TrainingDiverged):
    """The FairGrad solver did not converge (``on_failure="raise"``; exit code 3)."""


def _objective(g: Tensor, w: Tensor, alpha: float) -> float:
    """``F(w) = w^T G w / 2 - sum_i h(w_i)`` with ``h' (w) = w^(-1/alpha)``."""
    if alpha == 1.0:
        concave = float(torch.log(w).sum())
    else:
        p = 1.0 - 1.0 / alpha
        concave = float((w**p).sum()) / p
    return 0.5 * float(w @ g @ w) - concave


def fair_weights(
    g: Tensor, alpha: float, start: Tensor, max_iter: int, tol: float
) -> tuple[Tensor, float, float, int]:
    """Solve ``(G w)_i = w_i^(-1/alpha)`` for ``w > 0`` (CPU, float64).

    ``w`` is the unique minimiser of the strictly convex function
    ``F(w) = w^T G w / 2 - sum_i h(w_i)`` on ``w > 0``, with ``h(w) = log w`` for
    ``alpha = 1`` and ``h(w) = w^p / p``, ``p = 1 - 1/alpha``, otherwise (``h`` is strictly
    concave for every ``alpha > 0``, and ``F``'s gradient is ``G w - w^(-1/alpha)``). Each
    iteration rescales ``w`` to the minimum of ``F`` along its ray
    (``t^(1 + 1/alpha) = sum_i w_i^p / w^T G w``), then takes a Newton step in relative form:
    with ``D = diag(w)``, ``(D G D + diag(w^p) / alpha) z = -D r``, ``r = G w - w^(-1/alpha)``,
    and ``w <- w exp(t z)`` (positive whatever ``t``) with ``t`` halved from
    ``min(1, 4 / max_i |z_i|)`` (no weight moves by more than ``e^4`` in a step) until ``F``
    decreases by Armijo's rule, or, where that decrease is below ``F``'s rounding (weights
    spanning many orders of magnitude), until the residual decreases (a descent method on a strictly convex function: it converges
    to the minimiser, quadratically near it, where the full step is taken).

    It stops when the relative residual ``max_i |w_i^(1/alpha) (G w)_i - 1|`` is at most
    ``tol`` or at most the rounding error of computing it,
    ``bound = 4 K eps max_i w_i^(1/alpha) (|G| w)_i``, provided that bound is at most 1e-2.
    Returns ``w``, the residual, the bound and the number of Newton steps. A solution exists
    if and only if no non-negative, non-zero combination of the gradients is 0.
    """
    k = start.shape[0]
    inv = 1.0 / alpha
    p = 1.0 - inv
    abs_g = g.abs()
    w = start
    for step in range(max_iter + 1):
        quad = float(w @ g @ w)
        mass = float((w**p).sum())
        if quad > 0 and math.isfinite(quad) and math.isfinite(mass):
            w = w * (mass / quad) ** (1.0 / (1.0 + inv))
        gw = g @ w
        root = w**inv
        rel = root * gw - 1.0
        residual = float(rel.abs().max())
        bound = 4 * k * _EPS * float((root * (abs_g @ w)).max())
        if not (math.isfinite(residual) and math.isfinite(bound)):
            return w, math.inf, 0.0, step
        if (bound <= _ACCEPTABLE and residual <= max(tol, bound)) or step == max_iter:
            return w, residual, bound, step
        # relative Newton system: D H D z = -D grad F, H = G + diag(w^(-1/alpha - 1)) / alpha
        rhs = -(w * gw - w**p)
        system = w[:, None] * g * w[None, :] + torch.diag(w**p) * inv
        # symmetric Jacobi scaling: its diagonal spans as many orders as the weights
        scale = system.diagonal().rsqrt()
        y, info = torch.linalg.solve_ex(scale[:, None] * system * scale[None, :], scale * rhs)
        z = scale * y
        if int(info) != 0 or not bool(torch.isfinite(z).all()):
            return w, residual, bound, step
        value = _objective(g, w, alpha)
        slope = float(-(rhs @ z))  # directional derivative of F along w * z (negative)
        # the step is taken multiplicatively, w exp(t z) (the same first-order step as
        # w (1 + t z), and always positive: a weight that must shrink by orders of magnitude
        # does so in a few steps); near the root (Newton decrement below 1/10) the full step,
        # since there the decrease of F is below its rounding and Armijo's test cannot see it
        close = -slope < 1e-2
        # no weight moves by more than a factor e^4 in one step: far from the root the
        # relative Newton step can ask a weight to fall below zero (z_i < -1), which exp()
        # would turn into an underflow to 0
        t = min(1.0, 4.0 / max(float(z.abs().max()), 1e-300))
        for _ in range(60):
            trial = w * torch.exp(t * z)
            if close and bool(torch.isfinite(trial).all()):
                break
            new = _objective(g, trial, alpha)
            if math.isfinite(new) and new <= value + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            # F's decrease is below its rounding (F is dominated by the largest weights while
            # the step moves tiny ones): accept the longest step that lowers the residual
            fallback = _residual_step(g, w, z, inv, residual)
            if fallback is None:
                return w, residual, bound, step
            trial = fallback
        w = trial
    raise AssertionError("unreachable")


def _continuation(
    g: Tensor, alpha: float, max_iter: int, tol: float
) -> tuple[Tensor, float, float, int]:
    """:func:`fair_weights` along ``alpha_0 = 1 (Nash-MTL), ..., alpha``, geometric steps of
    at most a factor 1.25, each solve started from the previous root (the roots move
    continuously with alpha). For problems whose root spans many orders of magnitude, where
    a cold start fails; returns the last solve (the steps are summed), which is for an
    intermediate alpha if that one failed."""
    stages = max(1, math.ceil(abs(math.log(alpha)) / math.log(1.25)))
    w = g.diagonal().rsqrt()
    total = 0
    residual, bound = math.inf, 0.0
    for i in range(stages + 1):
        a = alpha ** (i / stages)
        w, residual, bound, steps = fair_weights(g, a, w, max_iter, tol)
        total += steps
        if not (bound <= _ACCEPTABLE and residual <= max(tol, bound)):
            break
    return w, residual, bound, total


def _residual_step(g: Tensor, w: Tensor, z: Tensor, inv: float, residual: float) -> Tensor | None:
    """``w exp(t z)`` for the largest ``t = 2^-i`` whose residual
    ``max_i |w_i^(1/alpha) (G w)_i - 1|`` is below ``(1 - t/4)`` times ``residual``."""
    t = min(1.0, 4.0 / max(float(z.abs().max()), 1e-300))
    for _ in range(60):
        trial = w * torch.exp(t * z)
        value = float(((trial**inv) * (g @ trial) - 1.0).abs().max())
        if math.isfinite(value) and value <= (1.0 - t / 4) * residual:
            return trial
        t *= 0.5
    return None


@BALANCERS.register("fairgrad")
class FairGrad(GramianWeighting):
    """FairGrad (Ban & Ji, ICML 2024, "Fair Resource Allocation in Multi-Task Learning",
    https://arxiv.org/abs/2402.15638).

    The update ``d = w @ J`` maximises the alpha-fair utility of the tasks' rates of
    improvement ``g_i . d`` over a ball; its optimality condition (the paper's Equation 4) is::

        G w = w^(-1/alpha)   (element-wise),   w > 0,   G = J J^T

    so ``g_i . d = w_i^(-1/alpha) > 0`` for every task. ``alpha = 1`` is proportional
    fairness, Nash-MTL's condition ``(G w)_i = 1/w_i`` (the same weights as ``nash_mtl``);
    ``alpha -> 0`` tends to linear scalarisation, ``alpha -> inf`` to max-min fairness.
    Scaling the gradients by ``c`` scales ``w`` by ``c^(-2 alpha / (1 + alpha))`` and ``d`` by
    ``c^((1 - alpha) / (1 + alpha))``: the update is scale-equivariant only for
    ``alpha -> 0``, scale-invariant for ``alpha = 1``. That is the paper's formula, computed
    at any scale.

    Solver: the official code and TorchJD 0.18 hand ``G w - w^(-1/alpha)`` to
    ``scipy.optimize.least_squares`` (bounds ``w >= 0``, from the uniform start) and use
    whatever it stops at, without checking the residual (TorchJD also caps the number of
    evaluations with ``max_iters``); at small or large gradient scales it stops far from
    the root. Here the equation is solved exactly by damped Newton steps on a strictly
    convex function (:func:`fair_weights`; if a cold start fails, again by continuation from
    ``alpha = 1`` in steps of at most a factor 1.25), on the Gramian divided by its mean
    diagonal ``s`` (the root for ``G`` is that for ``G / s`` times ``s^(-alpha / (1 + alpha))``),
    warm-started from the previous step's weights. It stops when
    ``max_i |w_i^(1/alpha) (G w)_i - 1| <= tol`` (or, for nearly Pareto-stationary
    gradients, when that residual is within its own float64 rounding, at most 1e-2).

    No silent fallback: when ``max_iter`` steps do not reach ``tol`` (in particular when no
    solution exists: some non-negative combination of the gradients is 0, such as two
    exactly opposite gradients), ``on_failure="raise"`` raises :class:`FairGradNotConverged`
    (a :class:`~polytask.errors.TrainingDiverged`, exit code 3) and ``"warn"`` (default) emits
    a ``RuntimeWarning`` naming the step and the residual and keeps the previous step's
    weights (tasks without one get the solver's starting point).

    A task whose gradient is exactly zero has no solution of its condition; it gets weight 0
    and the others are solved among themselves (as in ``nash_mtl``). If every gradient is
    zero the weights are 0.

    Args:
        tasks: task names.
        level: ``"parameter"`` (the paper) or ``"feature"``.
        alpha: the fairness parameter, ``> 0`` (the paper's experiments use 1, 2, 5, 10).
        max_iter: Newton steps per solve.
        tol: tolerance on ``max_i |w_i^(1/alpha) (G w)_i - 1|``.
        on_failure: ``"warn"`` (default) or ``"raise"``, see above.

    State (saved in checkpoints): the last weight of each task.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        alpha: float = 1.0,
        max_iter: int = 200,
        tol: float = 1e-10,
        on_failure: OnFailure = "warn",
    ) -> None:
        super().__init__(tasks, level)
        self.alpha = check_number_option("alpha", alpha, low=0.0)
        if self.alpha <= 0 or not 1e-3 <= self.alpha <= 1e3:
            raise ConfigError(
                f"balancer.options.alpha: expected a number in [0.001, 1000] (alpha > 0; "
                f"beyond that range w^(-1/alpha) leaves float64), found {alpha!r}."
            )
        self.max_iter = check_int_option("max_iter", max_iter, low=1)
        self.tol = check_number_option("tol", tol, low=0.0, high=1.0)
        if not 0 < self.tol < 1:
            raise ConfigError(f"balancer.options.tol: expected a number in (0, 1), found {tol!r}.")
        if on_failure not in get_args(OnFailure):
            raise ConfigError(
                f"balancer.options.on_failure: expected raise or warn, found {on_failure!r}."
            )
        self.on_failure: OnFailure = on_failure
        self._weights: dict[str, float] = {}
        self._tasks: tuple[str, ...] | None = None
        self._step: int | None = None
        self._calls = 0
        #: residual ``max_i |w_i^(1/alpha) (G w)_i - 1|`` and Newton steps of the last solve
        self.last_residual: float = math.nan
        self.last_iterations: int = 0

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, level={self.level!r}"

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
        """``w`` for the tasks of the current step (all tasks when called directly)."""
        tasks = self._tasks if self._tasks is not None else self.task_names
        if len(tasks) != gramian.shape[0]:
            raise ValueError(
                f"a {gramian.shape[0]} x {gramian.shape[0]} Gramian for {len(tasks)} tasks; "
                "call backward() or pass the Gramian of all tasks"
            )
        call = self._calls
        self._calls += 1
        g = gramian.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("the Gramian has non-finite entries")
        g = (g + g.T) / 2
        weights = torch.zeros(len(tasks), dtype=torch.float64)
        live = g.diagonal() > 0
        idx = torch.nonzero(live).flatten()
        if idx.numel() == 0:
            return weights.to(gramian.device)
        sub = g[idx][:, idx]
        s = float(sub.diagonal().mean())
        sub = sub / s
        factor = s ** (-self.alpha / (1.0 + self.alpha))
        names = [tasks[i] for i in idx.tolist()]
        previous = torch.tensor([self._weights.get(t, math.nan) for t in names])
        previous = previous.to(torch.float64)
        known = torch.isfinite(previous) & (previous > 0)
        # the root scales as 1 / sqrt(diag) when the tasks do not interact: a start of that shape
        start = torch.where(known, previous / factor, sub.diagonal().rsqrt())
        with single_thread():
            w, residual, bound, steps = fair_weights(
                sub, self.alpha, start, self.max_iter, self.tol
            )
            if not (bound <= _ACCEPTABLE and residual <= max(self.tol, bound)):
                found = _continuation(sub, self.alpha, self.max_iter, self.tol)
                if found[2] <= _ACCEPTABLE and found[1] <= max(self.tol, found[2]):
                    w, residual, bound, steps = found
        self.last_residual, self.last_iterations = residual, steps
        if bound <= _ACCEPTABLE and residual <= max(self.tol, bound):
            weights[idx] = w * factor
            self._weights.update(zip(names, (w * factor).tolist(), strict=True))
            return weights.to(gramian.device)
        where = f"step {self._step + 1}" if self._step is not None else f"call {call + 1}"
        message = (
            f"fairgrad: the solver of G w = w^(-1/alpha) did not converge at {where}: residual "
            f"max_i |w_i^(1/alpha) (G w)_i - 1| = {residual:.3g} > tol = {self.tol:g} after "
            f"{steps} Newton steps (balancer.options.max_iter={self.max_iter}; float64 "
            f"rounding of the residual: {bound:.3g}). A solution exists only if no "
            "non-negative combination of the task gradients is zero; with a small alpha or "
            "nearly opposite gradients of very different norms it may lie beyond float64."
        )
        if self.on_failure == "raise":
            raise FairGradNotConverged(message + " Raise max_iter or use on_failure=warn.")
        warnings.warn(message + " Keeping the previous weights.", RuntimeWarning, stacklevel=2)
        weights[idx] = torch.where(known, previous, start * factor)
        return weights.to(gramian.device)

    def get_extra_state(self) -> dict[str, object]:
        return {"weights": dict(self._weights)}

    def set_extra_state(self, state: object) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("weights", {}), dict):
            from ...errors import CheckpointError

            raise CheckpointError(
                f"the fairgrad balancer state should be a dict with a 'weights' dict, found "
                f"{type(state).__name__}"
            )
        self._weights = {str(t): float(v) for t, v in state.get("weights", {}).items()}
