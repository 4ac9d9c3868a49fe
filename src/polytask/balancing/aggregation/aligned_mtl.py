"""Aligned-MTL: the task gradients made orthogonal and of equal norm (condition number 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS
from ..gradient import GramianWeighting, Level
from ._qp import single_thread

__all__ = ["AlignedMTL", "AlignedMTLUB"]

Reduction = Literal["sum", "mean"]
ScaleMode = Literal["min", "median", "rmse"]


@BALANCERS.register("aligned_mtl")
class AlignedMTL(GramianWeighting):
    """Aligned-MTL (Senushkin et al., CVPR 2023, "Independent Component Alignment for
    Multi-Task Learning", Algorithm 1, https://openaccess.thecvf.com/content/CVPR2023/papers/
    Senushkin_Independent_Component_Alignment_for_Multi-Task_Learning_CVPR_2023_paper.pdf).

    With the SVD ``J = V S U^T`` of the K x n Jacobian, the gradients are replaced by the
    aligned ones ``J_hat = sigma V U^T``: orthogonal, all of norm ``sigma``, spanning the same
    space (condition number 1). The update is their sum ``1^T J_hat``. Since
    ``U^T = S^-1 V^T J``, this is a weighting of the original rows computed from the Gramian
    ``G = J J^T = V S^2 V^T`` alone::

        w = sigma V S^-1 V^T p,   d = w @ J

    with ``p = 1`` (``reduction="sum"``: the paper, the official code and LibMTL) or
    ``p = 1/K`` (``reduction="mean"``: TorchJD's default preference vector). The weights are
    invariant to the scale of the gradients, so ``d`` is equivariant to it.

    ``sigma`` is the smallest singular value (``scale_mode="min"``: the paper); the official
    code also offers the median (``"median"``: the lower median of the eigenvalues of ``G``,
    as TorchJD) and the root mean square (``"rmse"``: the square root of their mean).

    Rank deficiency (collinear or zero gradients) follows the official code: eigenvalues of
    ``G`` at or below ``K * eps * lambda_max`` are treated as zero, and ``V``, ``S`` keep only
    the other directions, so ``sigma`` is the smallest *retained* singular value and the
    aligned gradients span the retained subspace. ``eps`` is the machine epsilon of the
    gradients' dtype (:attr:`~polytask.balancing.gradient.GramianWeighting.input_eps`:
    float32's for float32 gradients, as in the official code, which trains in float32;
    float64's for float64 gradients, whose eigenvalue ratios of 1e-11 are real directions,
    not rounding), or the option ``rank_eps``. If every eigenvalue is cut (all gradients
    zero) the weights are ``p``, as in TorchJD (the official code fails there); the update is
    then 0 anyway.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
        reduction: ``"sum"`` (default) or ``"mean"``, see above.
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``, see above.
        rank_eps: the relative eigenvalue cut-off per task (times K times the largest
            eigenvalue); ``None`` (default): the machine epsilon of the gradients' dtype.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        reduction: Reduction = "sum",
        scale_mode: ScaleMode = "min",
        rank_eps: float | None = None,
    ) -> None:
        super().__init__(tasks, level)
        if rank_eps is not None and (
            isinstance(rank_eps, bool)
            or not isinstance(rank_eps, int | float)
            or not 0.0 <= float(rank_eps) < 1.0
        ):
            raise ConfigError(
                f"balancer.options.rank_eps: expected a number in [0, 1) or null, found "
                f"{rank_eps!r}."
            )
        self.rank_eps = None if rank_eps is None else float(rank_eps)
        if reduction not in get_args(Reduction):
            raise ConfigError(
                f"balancer.options.reduction: expected sum or mean, found {reduction!r}."
            )
        if scale_mode not in get_args(ScaleMode):
            raise ConfigError(
                f"balancer.options.scale_mode: expected min, median or rmse, found {scale_mode!r}."
            )
        self.reduction: Reduction = reduction
        self.scale_mode: ScaleMode = scale_mode

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        k = gramian.shape[0]
        g = gramian.detach().to(device="cpu", dtype=torch.float64)
        pref = torch.full((k,), 1.0 if self.reduction == "sum" else 1.0 / k, dtype=g.dtype)
        with single_thread():
            eigenvalues, vectors = torch.linalg.eigh((g + g.T) / 2)
        eps = self.input_eps if self.rank_eps is None else self.rank_eps
        keep = eigenvalues > k * eps * eigenvalues.max()
        if not bool(keep.any()):
            return pref.to(gramian.device)
        lam, v = eigenvalues[keep], vectors[:, keep]
        if self.scale_mode == "min":
            scale = lam.min()
        elif self.scale_mode == "median":
            scale = lam.median()
        else:
            scale = lam.mean()
        weights: Tensor = v @ ((scale / lam).sqrt() * (v.T @ pref))
        return weights.to(gramian.device)


@BALANCERS.register("aligned_mtl_ub")
class AlignedMTLUB(AlignedMTL):
    """Aligned-MTL-UB, the paper's cheaper variant (Senushkin et al., CVPR 2023, Section 4,
    "Aligned-MTL-UB"): the gradients of the task losses with respect to the shared
    representation (the encoder's output) are aligned instead of those with respect to the
    shared parameters, and the aligned sum is carried into the encoder by one backward pass,
    the task-specific decoders keeping their ordinary gradients.

    That is exactly :class:`AlignedMTL` at ``level=feature`` (the rows are the gradients at
    the architecture's shared representation, the update ``w @ J_Z`` is back-propagated once
    through the trunk and every other parameter gets the gradient of ``sum_k L_k``), as in the
    official code's ``AlignedMTLUBBalancer`` (``hrepr.backward(aligned_sum)``, decoder
    gradients unscaled by default). This name is that method with ``level`` defaulting to
    ``"feature"``; every option of ``aligned_mtl`` applies.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "feature",
        reduction: Reduction = "sum",
        scale_mode: ScaleMode = "min",
        rank_eps: float | None = None,
    ) -> None:
        super().__init__(tasks, level, reduction, scale_mode, rank_eps)
