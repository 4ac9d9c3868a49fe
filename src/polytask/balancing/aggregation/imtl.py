"""IMTL-G: the combination of the gradients with equal projections on every task's direction."""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import BALANCERS
from ..gradient import GramianWeighting
from ._common import normalized_gramian

__all__ = ["IMTLG", "imtl_g_weights"]


def imtl_g_weights(gramian: Tensor) -> Tensor:
    """IMTL-G's coefficients ``alpha`` (summing to 1) from the Gramian.

    ``d = sum_k alpha_k g_k`` must have the same projection on every unit gradient
    ``u_k = g_k / ||g_k||``. With ``E = diag(1/||g_k||) G`` (``E_ik = <u_i, g_k>``, so
    ``E alpha`` are the projections), the conditions are linear in ``alpha``::

        (E_i - mean_j E_j) alpha = 0   for every task i      (equal projections)
        sum_k alpha_k = 1                                     (the paper's normalisation)

    When the paper's matrix ``D U^T`` is invertible this system has exactly one solution,
    the paper's closed form ``alpha_{2..K} = g_1 U^T (D U^T)^{-1}``,
    ``alpha_1 = 1 - sum_{k>1} alpha_k``. When it is singular (collinear gradients) the minimum-norm solution is taken, through the
    pseudo-inverse of the system (which, unlike the paper's form, treats every task alike,
    so the result does not depend on which task comes first); where no combination has
    equal projections the least-squares one is.

    Zero gradients have no direction: their tasks get weight 0 and no condition (the
    others are balanced among themselves); if every gradient is zero the weights are
    ``1/K``. Computed on the Gramian normalised by the mean squared gradient norm (no
    epsilon: invariant to the scale of the gradients), in float64 on the Gramian's device,
    without a host synchronisation.
    """
    g, _ = normalized_gramian(gramian.detach().to(torch.float64))
    k = g.shape[0]
    norms = g.diagonal().clamp_min(0).sqrt()
    live = norms > 0
    mask = live.to(g.dtype)
    count = mask.sum()
    safe_norms = torch.where(live, norms, torch.ones_like(norms))
    proj = g / safe_norms[:, None] * mask[:, None] * mask[None, :]
    mean_proj = (mask @ proj) / count.clamp_min(1.0)
    system = torch.cat([(proj - mean_proj) * mask[:, None], mask[None, :]], dim=0)
    rhs = torch.zeros(k + 1, dtype=g.dtype, device=g.device)
    rhs[k] = 1.0
    alpha = (torch.linalg.pinv(system) @ rhs) * mask
    uniform = torch.full_like(alpha, 1.0 / k)
    return torch.where(count > 0, alpha, uniform)


@BALANCERS.register("imtl_g")
class IMTLG(GramianWeighting):
    """IMTL-G, the gradient part of Impartial Multi-Task Learning (Liu et al., "Towards
    Impartial Multi-task Learning", ICLR 2021, https://discovery.ucl.ac.uk/id/eprint/10120667/).

    The update ``d = sum_k alpha_k g_k`` with ``sum_k alpha_k = 1`` has equal projections on
    all task directions: ``<d, u_i> = <d, u_j>`` with ``u_k = g_k / ||g_k||``. The paper's
    closed form, with ``D = [g_1 - g_2, ..., g_1 - g_K]`` and ``U = [u_1 - u_2, ...]`` (rows),
    is ``alpha_{2..K} = g_1 U^T (D U^T)^{-1}``, ``alpha_1 = 1 - sum_{k>1} alpha_k``; every
    entry of ``D U^T`` and ``g_1 U^T`` is a ratio of Gramian entries, so the method works on
    the Gramian only (:func:`imtl_g_weights`). The effective weights are ``alpha``.

    Conventions and deviations:

    - Singular systems (collinear gradients, exactly opposite ones) are solved in the
      minimum-norm least-squares sense, symmetric in the tasks; zero gradients get weight 0.
      TorchJD 0.18 computes ``pinv(G) ||g|| / sum`` (the same as the paper where ``G`` is
      invertible), which returns zero weights when the sum vanishes, e.g. for two opposite
      gradients, where the paper's formula (and polytask) give ``(1/2, 1/2)``.
    - For efficiency the paper takes the gradients with respect to the shared features
      rather than the shared parameters (``level=feature`` here), and combines IMTL-G with
      IMTL-L loss scaling; this class is IMTL-G alone, at either level.
    - The paper's formula is followed even where the common projection is negative (possible
      with three or more tasks of very different gradient norms).

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
    """

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        return imtl_g_weights(gramian)
