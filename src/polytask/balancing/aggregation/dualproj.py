"""DualProj: the mean of the task gradients projected onto the dual cone, solved exactly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..base import BALANCERS
from ..gradient import Level
from ._common import TaskGramianWeighting, task_indices
from ._qp import _EPS, _correlation, _factor, _Float, _nnqp_factored
from .linear import task_vector_option

__all__ = ["DualProj", "dual_projection_weights"]


def dual_projection_weights(gramian: Tensor, pref: Tensor, eps: float = _EPS) -> Tensor:
    """The ``u`` with ``J^T u`` the projection of ``J^T p`` onto ``{v : J v >= 0}``.

    By Proposition 1 of Quinton & Rey (2024), ``u = argmin_{u >= p} u^T G u`` (its KKT
    conditions are those of the projection), for ``p >= 0``. In correlation form
    (``G = N C N``, ``N = diag(|g_k|)``): ``u = p + y / |g|`` with
    ``y = argmin_{y >= 0} (s + y)^T C (s + y)``, ``s = N p``, the same non-negative QP as
    UPGrad's (:func:`._qp.dual_cone_weights`) with ``s`` in place of ``e_i``, solved by the
    same checked active-set method, with no regulariser. Where the optimal ``y`` is not unique
    and unbounded (a weakly stationary Jacobian) the bounded minimum-norm one is taken at the
    precision ``eps`` of the rows, exactly as for UPGrad. Tasks with a zero gradient keep
    ``u_k = p_k`` (their coefficient does not change ``J^T u``). Returns float64 weights on
    the Gramian's device.
    """
    norms, nonzero, c = _correlation(gramian)
    p = pref.detach().to(device="cpu", dtype=torch.float64).numpy(force=True)
    out: _Float = p.copy()
    idx = np.flatnonzero(nonzero)
    if idx.size == 0:
        return torch.from_numpy(out).to(gramian.device)
    n = norms[idx]
    s = n * p[idx]
    top = float(s.max())
    if top > 0:
        s = s / top  # the QP is homogeneous in s: solve it at unit scale
        r = _factor(c)
        y = _nnqp_factored(c, (c @ s)[None, :], r, -(r @ s)[None, :])[0]
        if not bool(np.isfinite(y).all()) or float(np.abs(y).max()) > 1.0 / np.sqrt(eps):
            k = c.shape[0]
            delta2 = k * eps
            q = c + delta2 * np.eye(k)
            a = np.vstack([r, np.sqrt(delta2) * np.eye(k)])
            b = np.concatenate([-(r @ s), np.zeros(k)])[None, :]
            y = _nnqp_factored(q, (c @ s)[None, :], a, b)[0]
        out[idx] = p[idx] + top * y / n
    return torch.from_numpy(out).to(gramian.device)


@BALANCERS.register("dualproj")
class DualProj(TaskGramianWeighting):
    """DualProj: the mean of the task gradients projected onto the dual cone of the rows, as
    in TorchJD (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization",
    https://arxiv.org/abs/2406.16232; the projection is Equation 11 of Lopez-Paz & Ranzato,
    "Gradient Episodic Memory for Continual Learning", NeurIPS 2017)::

        d = pi_J(J^T p) = argmin_{v : J v >= 0} |v - J^T p|^2,    p = 1/K (the mean)

    computed as ``d = u @ J`` with ``u = argmin_{u >= p} u^T G u``
    (:func:`dual_projection_weights`). ``d`` conflicts with no task (``J d >= 0``); unlike
    UPGrad, which projects each gradient and averages, the mean is projected once, so ``d``
    is not equivariant to per-task rescaling but is to a common one.

    Deviation from TorchJD 0.18: TorchJD divides the Gramian by its trace (replacing it by
    zero below 1e-4) and adds ``1e-4 I`` before calling quadprog; at a 1e-6 gradient scale
    that returns the plain mean, and on conflicting inputs the ridge can leave a conflict
    with a small-norm task. Here the QP is solved exactly with no regulariser, on the
    correlation form of the Gramian, so ``u`` is invariant to the scale of the gradients and
    ``d`` equivariant to it.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
        pref_vector: the non-negative preference ``p`` (a list in the order of the tasks or a
            mapping from task to number) in place of the mean; tasks without labels in a
            step are left out (the others keep their values).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        pref_vector: Sequence[float] | Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(tasks, level)
        self.pref: dict[str, float] | None = (
            None
            if pref_vector is None
            else task_vector_option("pref_vector", pref_vector, self.task_names, positive_sum=True)
        )

    def weights_for(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        task_indices(self.task_names, tasks)
        if self.pref is None:
            values = [1.0 / len(tasks)] * len(tasks)
        else:
            values = [self.pref[t] for t in tasks]
        pref = torch.tensor(values, dtype=torch.float64)
        return dual_projection_weights(gramian, pref, self.input_eps)
