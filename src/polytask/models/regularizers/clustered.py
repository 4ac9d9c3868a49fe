"""Clustered multi-task learning: the convex relaxation of Jacob, Bach and Vert.

Jacob, Bach and Vert, "Clustered Multi-Task Learning: A Convex Formulation", NIPS 2008,
https://arxiv.org/abs/0809.2085. The K tasks' weights ``w_t`` (flattened and concatenated
over the layer groups) are the columns of ``W``. If the tasks fall into ``r`` clusters with
the projection ``M`` onto cluster-constant vectors, ``U = 1 1^T / K`` and ``Pi = I - U``,
the paper penalises the mean weight, the spread of the cluster means around it and the
spread within each cluster::

    eps_M tr(W U W^T) + eps_B tr(W (M - U) W^T) + eps_W tr(W (I - M) W^T)

which is ``eps_M tr(W U W^T) + tr(W Pi Sigma^{-1} Pi W^T)`` with ``Sigma^{-1}`` equal to
``eps_B`` on the between-cluster directions and ``eps_W`` on the within-cluster ones. The
unknown clusters make this non-convex; the convex relaxation lets ``Sigma`` range over the
convex hull of those matrices::

    R(W) = eps_M tr(W U W^T) + min_{Sigma in S} tr(W Pi Sigma^{-1} Pi W^T)
    S = {Sigma symmetric: alpha I <= Sigma <= beta I, tr Sigma = gamma},
    alpha = 1 / eps_W,  beta = 1 / eps_B,  gamma = (K - r + 1) alpha + (r - 1) beta

For fixed ``W`` the minimiser has the eigenvectors of ``A = Pi W^T W Pi`` and eigenvalues
``sigma_i = clip(sqrt(a_i) / nu, alpha, beta)``, ``nu`` such that they sum to ``gamma``
(found by bisection): the update made before every training step's penalty. Since
``Sigma`` then minimises the objective for the current weights, the gradient of the penalty
with ``Sigma`` fixed is the gradient of ``R(W)`` itself (Danskin's theorem), so training
takes gradient steps on the convex penalty.

The learned relation is ``Sigma``: tasks in one cluster have strongly correlated rows (its
large eigenvalues, up to ``beta``, span the between-cluster directions).

Deviations: the paper minimises over ``W`` and ``Sigma`` jointly on linear models; here
``Sigma`` is updated once per step of a deep network, as for the other regularisers. When
``A`` has fewer than ``r - 1`` non-zero eigenvalues the trace left over is spread evenly
over the directions where ``A`` is zero (any split there gives the same penalty).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from ...options import Limit
from .base import REGULARIZERS, TaskRegularizer

__all__ = ["ClusteredTasks", "optimal_cluster_covariance"]


def _eigenvalues(a: Tensor, alpha: float, beta: float, gamma: float) -> Tensor:
    """``sigma_i`` minimising ``sum a_i / sigma_i`` with ``alpha <= sigma_i <= beta`` and
    ``sum sigma_i = gamma`` (``a >= 0``, float64)."""
    roots = a.clamp_min(0).sqrt()
    positive = roots > roots.max() * 1e-12  # all False when A = 0
    n_free = int((~positive).sum())
    most = float(positive.sum()) * beta + n_free * alpha
    if most <= gamma:  # every non-zero direction at beta; the zero ones share the rest
        sigma = torch.where(positive, torch.full_like(a, beta), torch.full_like(a, alpha))
        if n_free:
            extra = (gamma - most) / n_free
            sigma = torch.where(positive, sigma, sigma + extra)
        return sigma

    def total(t: float) -> float:
        return float(torch.where(positive, (t * roots).clamp(alpha, beta), alpha).sum())

    low, high = 0.0, 1.0
    while total(high) < gamma:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2
        if total(mid) < gamma:
            low = mid
        else:
            high = mid
    t = (low + high) / 2
    return torch.where(positive, (t * roots).clamp(alpha, beta), torch.full_like(a, alpha))


def optimal_cluster_covariance(columns: Tensor, alpha: float, beta: float, gamma: float) -> Tensor:
    """The minimiser over ``S`` of ``tr(W Pi Sigma^{-1} Pi W^T)``, ``W = columns``, float64."""
    w = columns.double()
    centred = w - w.mean(dim=1, keepdim=True)  # W Pi
    values, vectors = torch.linalg.eigh(centred.T @ centred)
    sigma = _eigenvalues(values, alpha, beta, gamma)
    covariance: Tensor = (vectors * sigma) @ vectors.T
    return covariance


@REGULARIZERS.register(
    "clustered",
    limits={
        "clusters": Limit(ge=1),
        "eps_mean": Limit(ge=0),
        "eps_between": Limit(gt=0),
        "eps_within": Limit(gt=0),
    },
)
class ClusteredTasks(TaskRegularizer):
    """The convex clustered multi-task penalty with ``Sigma`` learned in closed form.

    Args:
        tasks: the task names (the order of Sigma's rows).
        shapes: the shapes of the selected weights; within a layer group, every task's
            weight must have the same shape.
        clusters: ``r``, the number of clusters (1 to K).
        eps_mean: ``eps_M``, the weight of the mean weight's norm.
        eps_between: ``eps_B``, the weight of the spread of the cluster means.
        eps_within: ``eps_W`` (>= ``eps_B``), the weight of the spread inside clusters.
    """

    sigma: Tensor

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        shapes: Sequence[Sequence[tuple[int, ...]]],
        clusters: int = 2,
        eps_mean: float = 1.0,
        eps_between: float = 1.0,
        eps_within: float = 10.0,
    ) -> None:
        super().__init__(tasks, shapes)
        self._same_shapes("clustered")
        k = len(self.tasks)
        if clusters > k:
            raise ConfigError(
                f"clustered: expected `clusters` between 1 and the number of tasks ({k}), "
                f"found {clusters}."
            )
        if eps_within < eps_between:
            raise ConfigError(
                "clustered: expected `eps_within` >= `eps_between` (spread inside a cluster "
                f"costs at least as much as between clusters), found {eps_within} < "
                f"{eps_between}."
            )
        self.clusters = int(clusters)
        self.eps_mean = float(eps_mean)
        self.alpha = 1.0 / float(eps_within)
        self.beta = 1.0 / float(eps_between)
        self.gamma = (k - clusters + 1) * self.alpha + (clusters - 1) * self.beta
        # a feasible start: the trace spread evenly
        self.register_buffer("sigma", torch.eye(k, dtype=torch.float64) * (self.gamma / k))

    def columns(self, layers: Sequence[Sequence[Tensor]]) -> Tensor:
        """``W`` (``d x K``): column t stacks task t's weights of every group."""
        per_task = [
            torch.cat([group[t].reshape(-1) for group in layers]) for t in range(len(self.tasks))
        ]
        return torch.stack(per_task, dim=1)

    def update(self, layers: Sequence[Sequence[Tensor]]) -> None:
        self.sigma.copy_(
            optimal_cluster_covariance(self.columns(layers), self.alpha, self.beta, self.gamma)
        )

    def penalty(self, layers: Sequence[Sequence[Tensor]]) -> Tensor:
        w = self.columns(layers)
        mean = w.mean(dim=1)
        centred = w - mean[:, None]
        inverse = torch.linalg.inv(self.sigma).to(w.dtype)
        value: Tensor = (
            self.eps_mean * len(self.tasks) * mean.square().sum()
            + ((centred @ inverse) * centred).sum()
        )
        return value

    def correlation(self) -> Tensor:
        """``Sigma``'s correlations: near 1 for tasks the penalty treats as one cluster."""
        scale = self.sigma.diagonal().clamp_min(1e-300).sqrt()
        return self.sigma / (scale[:, None] * scale[None, :])

    def diagnostics(self) -> dict[str, Any]:
        corr = self.correlation().tolist()
        return {
            "correlation": {
                s: dict(zip(self.tasks, row, strict=True))
                for s, row in zip(self.tasks, corr, strict=True)
            },
            "eigenvalues": torch.linalg.eigvalsh(self.sigma).tolist(),
        }

    def inspect(self) -> dict[str, Tensor]:
        return {
            "covariance": self.sigma.float().cpu(),
            "correlation": self.correlation().float().cpu(),
        }
