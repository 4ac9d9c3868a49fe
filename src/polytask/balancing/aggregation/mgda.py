"""MGDA: the min-norm point of the convex hull of the task gradients, solved exactly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS, BackwardContext
from ..gradient import GramianWeighting, Level
from ._qp import min_norm_weights

__all__ = ["MGDA", "Normalization"]

Normalization = Literal["none", "l2", "loss", "loss+"]


@BALANCERS.register("mgda")
class MGDA(GramianWeighting):
    """Multiple-gradient descent (Sener & Koltun, NeurIPS 2018, "Multi-Task Learning as
    Multi-Objective Optimization", https://arxiv.org/abs/1810.04650).

    The weights are the solution of the min-norm problem over the simplex::

        w = argmin_{w >= 0, sum(w) = 1} || sum_k w_k g_k ||^2 = argmin w^T G w

    and the combined gradient is ``d = w @ J``: the min-norm point of the convex hull of the
    task gradients. It never conflicts with a task: ``g_k . d >= ||d||^2 >= 0`` for every
    ``k`` (the KKT conditions), and ``d = 0`` exactly when the point is Pareto-stationary.

    With ``level="feature"`` the rows are the gradients with respect to the shared
    representation, which is the paper's MGDA-UB (its upper-bound variant, Section 3.3): the
    weights come from the representation's Gramian and one backward pass carries
    ``sum_k w_k dL_k/dZ`` through the trunk.

    The paper solves the QP with Frank-Wolfe (Algorithm 2); the public implementations stop
    it early (up to 0.9 relative error in the direction) and one of them fails at large
    gradient scales. Here the QP is solved exactly (active-set method, finite termination;
    see :mod:`._qp`), in a form invariant to the scale of every gradient.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"`` (MGDA-UB).
        normalization: the gradient normalisation of the official code (Sener & Koltun's
            ``gradient_normalizers``; "optional and not included in the paper"): the QP is
            solved for the gradients ``g_k / n_k`` with ``n_k = 1`` (``"none"``, the paper),
            ``||g_k||`` (``"l2"``), the task's loss ``L_k`` (``"loss"``) or
            ``L_k ||g_k||`` (``"loss+"``). As in the official code the resulting weights
            multiply the *unnormalised* gradients, ``d = sum_k w_k g_k`` (LibMTL applies them
            to the normalised ones instead). A zero gradient keeps ``n_k = 1`` under ``"l2"``;
            the loss-based ones need positive, finite losses (a :class:`ConfigError` otherwise).

    Conventions: the weights sum to 1 (the paper and the official code; Nash-MTL's copy
    multiplies them by K). When some task's gradient is exactly zero the min-norm point is
    0, and the weights are spread equally over the zero-gradient tasks.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        normalization: Normalization = "none",
    ) -> None:
        super().__init__(tasks, level)
        if normalization not in get_args(Normalization):
            raise ConfigError(
                "balancer.options.normalization: expected one of "
                f"{', '.join(get_args(Normalization))}, found {normalization!r}."
            )
        self.normalization: Normalization = normalization
        self._losses: Tensor | None = None

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        if self.normalization in ("loss", "loss+"):
            self._losses = torch.stack([loss.detach().double() for loss in losses.values()])
        try:
            return super().backward(losses, ctx)
        finally:
            self._losses = None

    def normalizers(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """The K divisors ``n_k`` of the gradients (see ``normalization``)."""
        ones = torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        if self.normalization == "none":
            return ones
        norms = gramian.diagonal().clamp_min(0).sqrt()
        if self.normalization == "l2":
            return torch.where(norms > 0, norms, ones)
        losses = self._losses if losses is None else losses
        if losses is None:
            raise ValueError(
                f"MGDA with normalization={self.normalization!r} needs the task losses: "
                "call backward(), or weights_from_gramian(gramian, losses)."
            )
        losses = losses.to(gramian)
        if not bool(((losses > 0) & torch.isfinite(losses)).all()):
            raise ConfigError(
                f"balancer.options.normalization={self.normalization}: the losses must be "
                f"positive and finite, found {losses.tolist()}; use normalization=l2 or none."
            )
        if self.normalization == "loss":
            return losses
        return torch.where(norms > 0, losses * norms, losses)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        n = self.normalizers(gramian, losses)
        return min_norm_weights(gramian / (n[:, None] * n[None, :]))
