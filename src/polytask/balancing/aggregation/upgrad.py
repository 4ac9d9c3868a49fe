"""UPGrad: the mean of the task gradients projected onto the dual cone, solved exactly."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..base import BALANCERS
from ..gradient import GramianWeighting, Level
from ._qp import dual_cone_weights

__all__ = ["UPGrad"]


@BALANCERS.register("upgrad")
class UPGrad(GramianWeighting):
    """Unconflicting projection of gradients (Quinton & Rey 2024, "Jacobian Descent for
    Multi-Objective Optimization", https://arxiv.org/abs/2406.16232).

    Every task gradient ``g_i`` is projected onto the dual cone of the rows,
    ``{v : J v >= 0}``, and the projections are averaged::

        d = (1/K) sum_i pi_J(g_i),   pi_J(g_i) = J^T u^(i),
        u^(i) = argmin_{u >= e_i} u^T G u          (the paper's Proposition 1)

    so the weights are ``w = (1/K) sum_i u^(i)`` and ``d = w @ J``. Each projection lies in
    the dual cone, hence so does their mean: ``J d >= 0``, the combined gradient conflicts
    with no task, including tasks whose gradient is tiny compared with the others.

    Conventions: the mean over projections with a uniform preference, as in the paper and in
    TorchJD's default ``UPGrad()`` (TorchJD projects ``e_i / K`` and sums, the same thing by
    homogeneity). Every ``u^(i) >= e_i``, so every weight is at least ``1/K``.

    Deviation from TorchJD 0.18: TorchJD divides the Gramian by its trace (replacing it by
    zero when the trace is below 1e-4) and adds ``1e-4 I`` before calling quadprog. The ridge
    changes the problem: the output can conflict with a small-norm task on conflicting
    inputs, and at a 1e-6 gradient scale the Gramian is zeroed and the plain mean is
    returned. Here each QP is solved exactly with no regulariser (active-set method; see
    :mod:`._qp`), on the correlation form of the Gramian, so the weights are invariant to
    the scale of every task's gradient and the combined gradient is equivariant to it.

    Weakly stationary Jacobians (a non-negative combination of the task gradients is zero,
    e.g. 20 tasks of rank below 20) make the optimal ``u^(i)`` non-unique and unbounded;
    the minimum-norm one is taken, at the precision of the gradients' dtype (see
    :func:`._qp.dual_cone_weights`), so the weights stay bounded and ``d = w @ J``
    conflicts with no task beyond rounding.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
    """

    def __init__(self, tasks: Sequence[str], level: Level = "parameter") -> None:
        super().__init__(tasks, level)

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        return dual_cone_weights(gramian, self.input_eps).mean(dim=0)
