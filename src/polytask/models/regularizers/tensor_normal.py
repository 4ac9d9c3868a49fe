"""The tensor-normal prior of Deep Relationship Networks, with flip-flop covariance updates.

Long, Cao, Wang and Yu, "Learning Multiple Tasks with Multilinear Relationship Networks",
NIPS 2017 (first circulated as Long and Wang, "Learning Multiple Tasks with Deep
Relationship Networks", 2015, https://arxiv.org/abs/1506.02117), section 4.

For one task-specific layer, the K tasks' weights ``W_t`` (``D1 x D2``: outputs by inputs; a
convolution's trailing dimensions are flattened into the inputs) are stacked into a tensor
``T`` (``D1 x D2 x K``) with the prior ``vec(T) ~ N(0, Sigma3 (x) Sigma2 (x) Sigma1)``:
``Sigma1`` is the covariance of the layer's outputs, ``Sigma2`` of its inputs and ``Sigma3``
of the tasks. Its negative log-likelihood (up to a constant) is::

    NLL = 1/2 vec(T)^T (Sigma3 (x) Sigma2 (x) Sigma1)^{-1} vec(T)
          + D2 K / 2 log|Sigma1| + D1 K / 2 log|Sigma2| + D1 D2 / 2 log|Sigma3|

and, for the other two fixed, each covariance has the closed-form minimiser (the paper's
flip-flop updates, eq. 9-11, with ``T_(n)`` the mode-n unfolding)::

    Sigma1 = T_(1) (Sigma3 (x) Sigma2)^{-1} T_(1)^T / (D2 K) + eps I
    Sigma2 = T_(2) (Sigma3 (x) Sigma1)^{-1} T_(2)^T / (D1 K) + eps I
    Sigma3 = T_(3) (Sigma2 (x) Sigma1)^{-1} T_(3)^T / (D1 D2) + eps I

The penalty the network's gradient step sees is the quadratic form
``R = vec(T)^T (Sigma3 (x) Sigma2 (x) Sigma1)^{-1} vec(T)`` (the log-determinants do not
depend on the weights), computed with mode products, never with the Kronecker product.
Before every step's penalty the three covariances are updated once, in the order above
(one sweep of flip-flop; the paper alternates one update of the covariances with the
back-propagation of a mini-batch in the same way). ``Sigma3`` is the learned task relation.

Deviations: the prior's scale is not identifiable (``c Sigma1`` and ``Sigma3 / c`` give the
same distribution, and at ``eps = 0`` the same likelihood); after each sweep ``Sigma1`` and
``Sigma2`` are rescaled to mean eigenvalue 1 and ``Sigma3`` takes the scale, so ``eps`` acts
at a fixed scale and the factors cannot drift apart. ``feature_covariances=False`` keeps
``Sigma1 = Sigma2 = I`` and learns the task covariance only (a matrix-normal prior over the
tasks). The layer's bias is not part of the prior (the paper leaves it out too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...options import Limit
from .base import REGULARIZERS, TaskRegularizer

__all__ = ["TensorNormal", "flip_flop", "tensor_normal_quadratic"]


def _stack(group: Sequence[Tensor]) -> Tensor:
    """``T`` (``D1 x D2 x K``) from the K tasks' weights of a layer."""
    return torch.stack([w.reshape(w.shape[0], -1) for w in group], dim=2)


def _mode_product(t: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``T x_1 a x_2 b x_3 c`` (each matrix multiplies one mode)."""
    x = torch.einsum("ai,ijk->ajk", a, t)
    x = torch.einsum("bj,ajk->abk", b, x)
    return torch.einsum("ck,abk->abc", c, x)


def tensor_normal_quadratic(t: Tensor, sigmas: Sequence[Tensor]) -> Tensor:
    """``vec(T)^T (Sigma3 (x) Sigma2 (x) Sigma1)^{-1} vec(T)`` for ``T`` (``D1 x D2 x K``)."""
    inverses = [torch.linalg.inv(s).to(t.dtype) for s in sigmas]
    return (_mode_product(t, *inverses) * t).sum()


def flip_flop(
    t: Tensor, sigmas: Sequence[Tensor], eps: float, features: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """One sweep of the closed-form updates (``Sigma1``, then ``Sigma2``, then ``Sigma3``,
    each with the latest others), in float64; ``features=False`` updates ``Sigma3`` only."""
    t = t.double()
    d1, d2, k = t.shape
    s1, s2, s3 = (s.double() for s in sigmas)

    def eye(n: int) -> Tensor:
        return torch.eye(n, dtype=t.dtype, device=t.device)

    if features:
        i2, i3 = torch.linalg.inv(s2), torch.linalg.inv(s3)
        s1 = torch.einsum("abc,bj,ck,ijk->ai", t, i2, i3, t) / (d2 * k) + eps * eye(d1)
        i1 = torch.linalg.inv(s1)
        s2 = torch.einsum("abc,ai,ck,ijk->bj", t, i1, i3, t) / (d1 * k) + eps * eye(d2)
    i1, i2 = torch.linalg.inv(s1), torch.linalg.inv(s2)
    s3 = torch.einsum("abc,ai,bj,ijk->ck", t, i1, i2, t) / (d1 * d2) + eps * eye(k)
    sym = [(s + s.T) / 2 for s in (s1, s2, s3)]
    return sym[0], sym[1], sym[2]


@REGULARIZERS.register("tensor_normal", limits={"eps": Limit(gt=0)})
class TensorNormal(TaskRegularizer):
    """The tensor-normal prior of DRN / MRN over each selected layer (see module docs).

    Args:
        tasks: the task names (the order of ``Sigma3``'s rows).
        shapes: the shapes of the selected weights; within a layer group every task's
            weight must have the same shape.
        eps: the ridge added to every covariance update (> 0: the covariances stay
            invertible when a layer has fewer weights than a covariance has entries).
        feature_covariances: learn ``Sigma1`` and ``Sigma2`` too (the paper); False: only
            the task covariance, the feature covariances fixed at the identity.
    """

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        shapes: Sequence[Sequence[tuple[int, ...]]],
        eps: float = 1e-3,
        feature_covariances: bool = True,
    ) -> None:
        super().__init__(tasks, shapes)
        self._same_shapes("tensor_normal")
        self.eps = float(eps)
        self.feature_covariances = bool(feature_covariances)
        k = len(self.tasks)
        for g, group in enumerate(self.shapes):
            d1 = group[0][0]
            d2 = 1
            for n in group[0][1:]:
                d2 *= n
            for name, n in (("output", d1), ("input", d2), ("task", k)):
                self.register_buffer(f"{name}_covariance_{g}", torch.eye(n, dtype=torch.float64))

    def covariances(self, group: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(Sigma1, Sigma2, Sigma3)`` of a layer group: outputs, inputs, tasks."""
        return (
            self.get_buffer(f"output_covariance_{group}"),
            self.get_buffer(f"input_covariance_{group}"),
            self.get_buffer(f"task_covariance_{group}"),
        )

    def update(self, layers: Sequence[Sequence[Tensor]]) -> None:
        for g, group in enumerate(layers):
            current = self.covariances(g)
            s1, s2, s3 = flip_flop(_stack(group), current, self.eps, self.feature_covariances)
            if self.feature_covariances:
                c1 = s1.trace() / s1.shape[0]
                c2 = s2.trace() / s2.shape[0]
                s1, s2, s3 = s1 / c1, s2 / c2, s3 * (c1 * c2)
            for old, new in zip(current, (s1, s2, s3), strict=True):
                old.copy_(new)

    def penalty(self, layers: Sequence[Sequence[Tensor]]) -> Tensor:
        terms = [
            tensor_normal_quadratic(_stack(group), self.covariances(g))
            for g, group in enumerate(layers)
        ]
        return torch.stack(terms).sum()

    def correlation(self, group: int) -> Tensor:
        """The task correlations of a layer group, from ``Sigma3``."""
        s3 = self.covariances(group)[2]
        scale = s3.diagonal().clamp_min(1e-300).sqrt()
        return s3 / (scale[:, None] * scale[None, :])

    def diagnostics(self) -> dict[str, Any]:
        def named(matrix: Tensor) -> dict[str, dict[str, float]]:
            rows = matrix.tolist()
            return {
                s: dict(zip(self.tasks, r, strict=True))
                for s, r in zip(self.tasks, rows, strict=True)
            }

        return {
            "layers": [
                {
                    "task_covariance": named(self.covariances(g)[2]),
                    "task_correlation": named(self.correlation(g)),
                }
                for g in range(len(self.shapes))
            ]
        }

    def inspect(self) -> dict[str, Tensor]:
        result: dict[str, Tensor] = {}
        for g in range(len(self.shapes)):
            s1, s2, s3 = self.covariances(g)
            result[f"{g}/task_covariance"] = s3.float().cpu()
            result[f"{g}/task_correlation"] = self.correlation(g).float().cpu()
            result[f"{g}/output_covariance"] = s1.float().cpu()
            result[f"{g}/input_covariance"] = s2.float().cpu()
        return result
