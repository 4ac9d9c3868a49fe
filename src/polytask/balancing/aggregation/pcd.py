"""PCD: follow a primary task's gradient, guaranteeing each other task a share of progress."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import CheckpointError, ConfigError
from ..base import BALANCERS
from ..gradient import Level
from ._common import TaskGramianWeighting, check_number_option, task_indices
from ._qp import min_norm_weights, nnqp

__all__ = ["PCD", "pcd_weights"]


def pcd_weights(normalized: Tensor, tau: float, precision: float) -> Tensor:
    """The coefficients ``c`` (``d~ = c @ J~``) of PCD's projection for the Gramian of the
    normalised rows, primary first (CPU, float64).

    ``argmin_d |d - g~_1|^2 / 2`` subject to ``g~_j . d >= tau |g~_j|^2`` (``j >= 2``) has
    ``d = g~_1 + sum_j lambda_j g~_j`` with ``lambda >= 0`` the solution of its dual, the
    non-negative QP ``min_{lambda >= 0} (e_1 + lambda)^T G (e_1 + lambda) / 2 -
    tau sum_j lambda_j G_jj`` (:func:`._qp.nnqp`, exact active-set). The constraints are
    infeasible exactly when ``tau > 0`` and a non-negative combination of the non-zero
    secondary rows is zero (Gordan; a zero row's constraint is ``0 >= 0``): then ``c = e_1``
    (they are dropped, as in TorchJD).
    """
    k = normalized.shape[0]
    c = torch.zeros(k, dtype=torch.float64)
    c[0] = 1.0
    if k == 1:
        return c
    sec = normalized[1:, 1:]
    live = sec.diagonal() > 0  # a zero row's constraint, 0 >= 0, always holds
    if tau > 0 and bool(live.any()):
        sub = sec[live][:, live]
        v = min_norm_weights(sub).to(torch.float64)
        norms = sub.diagonal().sqrt()
        if float(v @ sub @ v) <= precision * float(v.abs() @ norms) ** 2:
            return c
    lin = (normalized[1:, 0] - tau * sec.diagonal())[None, :]
    lam = nnqp(sec, lin)[0]
    c[1:] = lam
    return c


@BALANCERS.register("pcd")
class PCD(TaskGramianWeighting):
    """Priority-Constrained Descent ("Not All Objectives Are Born Equal: Priority-Constrained
    Descent for Hierarchical Multi-Objective Optimization", TMLR 2026,
    https://openreview.net/forum?id=HT01yGHLEt; reference code
    github.com/DaraVaram/priority-constrained-descent; TorchJD's ``PCD``).

    One task is primary; the update follows its gradient as closely as possible while every
    other task gets at least a fraction ``tau`` of the first-order progress of a step along
    its own normalised gradient::

        d~ = argmin_d |d - g~_1|^2 / 2   subject to   g~_j . d >= tau |g~_j|^2   (j != 1)
        d  = d~ |g_1| / |d~|

    with ``g~_i = s_i g_i``, ``s_i = 1 / sqrt(v_i + eps)`` and ``v_i`` the bias-corrected
    exponential moving average (decay ``beta``) of ``|g_i|^2`` over the steps. The QP is solved
    exactly through its dual (:func:`pcd_weights`); no regulariser. Special cases as in
    TorchJD: ``g_1 = 0`` gives 0; infeasible constraints (``tau > 0`` and a non-negative
    combination of the other gradients is 0) are dropped, giving ``g_1``; a ``d~`` that is
    zero up to rounding gives 0.

    Differences from TorchJD 0.18: the moving averages are kept per task name, each with its
    own step count for the bias correction (TorchJD keeps one vector and clears it whenever
    the number of rows changes), so a task without labels in a step keeps its average; a step
    without the primary task gives no update to the shared part (as ``g_1 = 0``). ``tau`` is one
    number for every secondary task (TorchJD also takes a vector). The averages are saved in
    checkpoints.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
        primary: the primary task (default: the first task).
        tau: the guaranteed fraction, in [0, 1].
        beta: the decay of the moving averages, in [0, 1).
        eps: added to the averages before the inverse square root, ``>= 0``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        primary: str | None = None,
        tau: float = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks, level)
        if primary is None:
            primary = self.task_names[0]
        if primary not in self.task_names:
            raise ConfigError(
                f"balancer.options.primary: expected one of the tasks "
                f"{', '.join(self.task_names)}, found {primary!r}."
            )
        self.primary = primary
        self.tau = check_number_option("tau", tau, low=0.0, high=1.0)
        self.beta = check_number_option("beta", beta, low=0.0, high=1.0)
        if self.beta >= 1.0:
            raise ConfigError(
                f"balancer.options.beta: expected a number in [0, 1), found {beta!r}."
            )
        self.eps = check_number_option("eps", eps, low=0.0)
        self._ema: dict[str, float] = {}
        self._steps: dict[str, int] = {}

    def weights_for(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        task_indices(self.task_names, tasks)
        g = gramian.detach().to(device="cpu", dtype=torch.float64)
        g = (g + g.T) / 2
        k = g.shape[0]
        weights = torch.zeros(k, dtype=torch.float64)
        if not bool(torch.isfinite(g).all()):
            return torch.full((k,), math.nan, dtype=torch.float64, device=gramian.device)
        sq = g.diagonal().clamp_min(0)
        scales = torch.zeros(k, dtype=torch.float64)
        for i, t in enumerate(tasks):
            ema = self.beta * self._ema.get(t, 0.0) + (1.0 - self.beta) * float(sq[i])
            steps = self._steps.get(t, 0) + 1
            self._ema[t], self._steps[t] = ema, steps
            denominator = math.sqrt(ema / (1.0 - self.beta**steps) + self.eps)
            scales[i] = 1.0 / denominator if denominator > 0 else 0.0
        if self.primary not in tasks:
            return weights.to(gramian.device)
        p = list(tasks).index(self.primary)
        order = [p] + [i for i in range(k) if i != p]
        if float(sq[p]) <= 0:
            return weights.to(gramian.device)
        precision = 10.0 * self.input_eps
        normalized = g[order][:, order] * torch.outer(scales[order], scales[order])
        c = pcd_weights(normalized, self.tau, max(1e-9, precision))
        length = float(c @ normalized @ c)
        magnitude = float(c.abs() @ normalized.diagonal().clamp_min(0).sqrt()) ** 2
        if length > precision * magnitude:
            weights[order] = c * scales[order] * math.sqrt(float(sq[p]) / length)
        return weights.to(gramian.device)

    def get_extra_state(self) -> dict[str, Any]:
        return {"ema": dict(self._ema), "steps": dict(self._steps)}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("ema", {}), dict):
            raise CheckpointError(
                f"the pcd balancer state should be a dict with an 'ema' dict, found "
                f"{type(state).__name__}"
            )
        self._ema = {str(t): float(v) for t, v in state.get("ema", {}).items()}
        self._steps = {str(t): int(v) for t, v in state.get("steps", {}).items()}
