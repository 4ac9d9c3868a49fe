"""Learned task relationships: a task-covariance regulariser, as in multi-task relationship
learning (MTRL).

Zhang and Yeung, "A Convex Formulation for Learning Task Relationships in Multi-Task
Learning", UAI 2010, https://arxiv.org/abs/1203.3536 (section 3). The K tasks' weights
``w_t`` (the selected weights of task t, flattened and concatenated over the layer groups)
are the columns of ``W`` (``d x K``), with a matrix-normal prior whose column covariance
``Omega`` (``K x K``) is the task covariance. The regulariser, and its minimiser in
``Omega`` for fixed ``W`` (the paper's closed form, eq. 9)::

    R(W, Omega) = tr(W Omega^{-1} W^T) + eps tr(Omega^{-1}),   Omega > 0,  tr(Omega) = 1
    Omega* = (W^T W + eps I)^{1/2} / tr((W^T W + eps I)^{1/2})

and ``R(W, Omega*) = (tr (W^T W + eps I)^{1/2})^2``: at ``eps = 0`` the squared trace norm
of ``W``. Training alternates as in the paper: before every step's penalty ``Omega`` is set
to ``Omega*`` of the current weights (no gradient), then the gradient step on the network
sees ``tr(W Omega^{-1} W^T)`` with ``Omega`` fixed. ``Omega`` (a buffer, saved in
checkpoints) is the learned relation: its correlations ``Omega_st / sqrt(Omega_ss Omega_tt)``
near +1 mean related tasks, near 0 unrelated ones, near -1 negatively related ones.

Deviations: the paper solves a kernel / linear model by block coordinate descent to
convergence; here ``W`` is a layer of a deep network and each ``Omega`` update follows one
stochastic gradient step (the scheme of Long and Wang's deep relationship networks). The
paper's ``lambda_1/2 tr(W W^T)`` term is ordinary weight decay (``optim.weight_decay``) and
is not repeated here; ``weight`` in the config is the paper's ``lambda_2 / 2``. ``eps``
(the paper adds ``eps I`` to keep ``Omega`` invertible) enters the objective as
``eps tr(Omega^{-1})``, so the update is the exact minimiser of the objective as written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...options import Limit
from .base import REGULARIZERS, TaskRegularizer

__all__ = ["TaskCovariance", "optimal_task_covariance", "psd_sqrt"]


def psd_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues
    below 0, from rounding, are clipped)."""
    values, vectors = torch.linalg.eigh(matrix)
    root: Tensor = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    return root


def optimal_task_covariance(columns: Tensor, eps: float) -> Tensor:
    """``(W^T W + eps I)^{1/2} / tr(...)`` for ``W = columns`` (``d x K``), in float64."""
    w = columns.double()
    gram = w.T @ w + eps * torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    root = psd_sqrt(gram)
    return root / root.trace()


@REGULARIZERS.register("task_covariance", limits={"eps": Limit(ge=0)})
class TaskCovariance(TaskRegularizer):
    """``tr(W Omega^{-1} W^T)`` with ``Omega`` learned in closed form (see module docs).

    Args:
        tasks: the task names (the order of Omega's rows).
        shapes: the shapes of the selected weights; within a layer group, every task's
            weight must have the same shape.
        eps: the ridge ``eps I`` added to ``W^T W`` before the update (> 0 keeps Omega
            invertible when W has rank below K, e.g. a task's weights at zero).
    """

    omega: Tensor

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        shapes: Sequence[Sequence[tuple[int, ...]]],
        eps: float = 1e-6,
    ) -> None:
        super().__init__(tasks, shapes)
        self._same_shapes("task_covariance")
        self.eps = float(eps)
        k = len(self.tasks)
        # the paper's initialisation: independent tasks
        self.register_buffer("omega", torch.eye(k, dtype=torch.float64) / k)

    def columns(self, layers: Sequence[Sequence[Tensor]]) -> Tensor:
        """``W`` (``d x K``): column t stacks task t's weights of every group."""
        per_task = [
            torch.cat([group[t].reshape(-1) for group in layers]) for t in range(len(self.tasks))
        ]
        return torch.stack(per_task, dim=1)

    def update(self, layers: Sequence[Sequence[Tensor]]) -> None:
        self.omega.copy_(optimal_task_covariance(self.columns(layers), self.eps))

    def penalty(self, layers: Sequence[Sequence[Tensor]]) -> Tensor:
        w = self.columns(layers)
        inverse = torch.linalg.inv(self.omega).to(w.dtype)
        quadratic: Tensor = ((w @ inverse) * w).sum()
        return quadratic

    def correlation(self) -> Tensor:
        """The task correlations ``Omega_st / sqrt(Omega_ss Omega_tt)``."""
        scale = self.omega.diagonal().clamp_min(1e-300).sqrt()
        return self.omega / (scale[:, None] * scale[None, :])

    def diagnostics(self) -> dict[str, Any]:
        corr = self.correlation().tolist()
        cov = self.omega.tolist()
        return {
            "covariance": {
                s: dict(zip(self.tasks, row, strict=True))
                for s, row in zip(self.tasks, cov, strict=True)
            },
            "correlation": {
                s: dict(zip(self.tasks, row, strict=True))
                for s, row in zip(self.tasks, corr, strict=True)
            },
        }

    def inspect(self) -> dict[str, Tensor]:
        return {
            "covariance": self.omega.float().cpu(),
            "correlation": self.correlation().float().cpu(),
        }
