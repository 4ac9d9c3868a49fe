"""IMTL: IMTL-G, the combination of the gradients with equal projections on every task's
direction, and the full method, IMTL-G on losses scaled by IMTL-L's learnable scales."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..base import BALANCERS, BackwardContext
from ..gradient import GramianWeighting, Level
from ._common import normalized_gramian, task_indices

__all__ = ["IMTL", "IMTLG", "imtl_g_weights"]


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


@BALANCERS.register("imtl")
class IMTL(IMTLG):
    """IMTL, the full hybrid of Impartial Multi-Task Learning (Liu et al., ICLR 2021,
    "Towards Impartial Multi-task Learning", Algorithm 1 "IMTL"): IMTL-L's learnable loss
    scales combined with IMTL-G.

    IMTL-L gives every task a learnable ``s_k`` (initially 0) and the scaled loss::

        L'_k = e^{s_k} L_k - s_k

    whose minimisation over ``s_k`` drives ``e^{s_k} L_k`` to 1 (scale-balanced losses; the
    ``- s_k`` term keeps ``s_k`` from running to minus infinity). Each step:

    - the shared part gets IMTL-G's combination of the gradients of the scaled losses,
      ``d = sum_k alpha_k e^{s_k} g_k`` with ``alpha = IMTL-G(e^{s_k} g_k)`` (only the
      factors ``e^{s_k}``, taken as constants, reach the Jacobian; ``- s_k`` has no gradient
      with respect to the model);
    - every other parameter of the model gets the gradient of ``sum_k e^{s_k} L_k``;
    - ``s_k`` gets ``dL'_k / ds_k = e^{s_k} L_k - 1`` (an ordinary gradient, stepped by the
      optimizer in the balancer's own parameter group).

    The effective weight logged per task is ``alpha_k e^{s_k}``, the coefficient of the raw
    gradient ``g_k``. IMTL-G's projections do not depend on the norms of the rows, but its
    weights ``alpha`` (summing to 1) do, so the scales change the update's length and the
    balance of the non-shared parameters; with ``s = 0`` the first step equals ``imtl_g``.

    Deviations and conventions: the paper takes the gradients with respect to the shared
    features (``level=feature``), which is this class's default; ``level=parameter`` is
    available. The paper does not fix the scales' learning rate; by default they share the
    model's (``lr`` None; ``balancer.lr`` overrides it). ``imtl_g`` stays available for
    IMTL-G alone.

    Args:
        tasks: task names.
        level: ``"feature"`` (default, the paper) or ``"parameter"``.
    """

    def __init__(self, tasks: Sequence[str], level: Level = "feature") -> None:
        super().__init__(tasks, level)
        #: IMTL-L's ``s_k``, one learnable scalar per task
        self.log_scales = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in self.task_names)

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        names = list(losses)
        params = [self.log_scales[i] for i in task_indices(self.task_names, names)]
        factors = {
            t: torch.exp(p.detach()).to(losses[t].dtype) for t, p in zip(names, params, strict=True)
        }
        scaled = {t: factors[t] * losses[t] for t in names}
        weights = super().backward(scaled, ctx)
        # dL'_k / ds_k = e^{s_k} L_k - 1, through the loss scaler like the model's gradients
        total = torch.stack(
            [
                torch.exp(p) * losses[t].detach().to(p.dtype) - p
                for t, p in zip(names, params, strict=True)
            ]
        ).sum()
        ctx.scale(total).backward()  # type: ignore[no-untyped-call]
        return {t: (weights[t] * factors[t].to(weights[t].dtype)).detach() for t in names}
