"""NTKMTL: each task's gradient weighted by the inverse of its NTK eigenvalue, share of the
trace, to a power (``w_k = (tr G / G_kk)^exponent``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import BALANCERS
from ..gradient import GramianWeighting, Level
from ._common import check_number_option

__all__ = ["NTKMTL", "ntk_weights"]


def ntk_weights(gramian: Tensor, exponent: float) -> Tensor:
    """``w_k = (sum_j G_jj / G_kk)^exponent`` (float64); 0 for a task whose gradient is 0.

    With one sample per task the task's NTK is the 1 x 1 matrix ``||g_k||^2 = G_kk``, its
    largest eigenvalue ``lambda_k = G_kk``, and ``sum_j lambda_j = tr G``.
    """
    g = gramian.detach().to(dtype=torch.float64)
    diagonal = g.diagonal().clamp_min(0.0)
    trace = diagonal.sum()
    live = diagonal > 0
    weights = torch.zeros_like(diagonal)
    weights[live] = (trace / diagonal[live]) ** exponent
    return weights


@BALANCERS.register("ntkmtl")
class NTKMTL(GramianWeighting):
    r"""NTKMTL (Qin, Wang, Liao and Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task
    Learning from Neural Tangent Kernel Perspective", NeurIPS 2025,
    https://arxiv.org/abs/2510.18258; official code https://github.com/jianke0604/NTKMTL,
    ``methods/weight_methods.py``, class ``NTKMTL``).

    Under gradient flow, task ``k``'s residual on ``n`` samples decays along the eigen-directions
    of its NTK ``J_k J_k^T`` (``J_k``: the ``n`` per-sample gradients of the shared
    parameters), fastest along the largest eigenvalue ``lambda_k``. NTKMTL scales each task
    so that these rates match: with ``n = 1`` sample (the mean loss of the batch, the setting
    of all the paper's comparisons and of the official code) ``lambda_k = ||g_k||^2 = G_kk``
    and the update is

    .. math::
        d = \sum_k w_k g_k, \qquad
        w_k = \left(\frac{\sum_j \lambda_j}{\lambda_k}\right)^{e}
            = \left(\frac{\operatorname{tr} G}{G_{kk}}\right)^{e},
        \qquad G = J J^T.

    The paper takes the square root, ``e = 0.5`` (the official ``--ntk_exp``, default 0.5;
    its README suggests trying up to 0.75): then every ``w_k g_k`` has the same norm
    ``sqrt(tr G)``. The weights are invariant to a common scale of the gradients, so ``d`` is
    scale-equivariant (``d(cJ) = c d(J)``) and equivariant to the order of the tasks. A task
    whose gradient is exactly zero gets weight 0 (the formula's ``1 / 0``; its row adds
    nothing); if every gradient is zero the update is zero.

    Levels: ``"parameter"`` (default) is the paper's NTKMTL (``n = 1``). ``"feature"`` uses
    the gradients of the shared representation, the rows NTKMTL-SR reads; with ``n = 1`` it
    is that approximation's weights applied to the representation's gradient.

    Deviations from the official code:

    - It multiplies the combined gradient by ``K`` ("to match the sum loss") and its trainer
      clips the shared parameters' gradient to norm ``max_norm = 1`` afterwards. Here the
      update is the paper's ``d``; ``max_norm > 0`` scales the weights down so that
      ``||d|| <= max_norm`` (as ``nash_mtl``'s option), and ``optim.grad_clip`` clips the
      whole gradient. With Adam, the optimizer of every official experiment, a constant
      factor such as ``K`` only changes the effect of Adam's epsilon.
    - Not implemented: ``n > 1`` samples per task (the paper's general form, left commented
      out in the official code as "not used in experiments") and NTKMTL-SR's ``n = 4``
      (per-part representation gradients, eigenvalues of ``n x n`` kernels, the weights
      applied to the losses, so that the task heads are weighted too). NTKMTL-SR needs the
      representation of each part of a batch, which the balancing contract does not give:
      the trainer refuses a balancer that both cuts batches into parts
      (``batch_parts > 1``) and reads the representation. Here every other parameter, a
      task's head included, gets the unweighted gradient of ``sum_k L_k``, as in the
      official ``NTKMTL`` class.

    Args:
        tasks: task names.
        level: ``"parameter"`` (the paper) or ``"feature"``.
        exponent: ``e``, the power of the eigenvalue ratio, in [0, 10] (0: the sum of the
            gradients; 0.5: the paper).
        max_norm: if positive, the weights are scaled down so that ``||d|| <= max_norm``;
            0 (default) keeps the paper's update.

    State: none (the weights are a function of the step's Gramian).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        exponent: float = 0.5,
        max_norm: float = 0.0,
    ) -> None:
        super().__init__(tasks, level)
        self.exponent = check_number_option("exponent", exponent, low=0.0, high=10.0)
        self.max_norm = check_number_option("max_norm", max_norm, low=0.0)

    def extra_repr(self) -> str:
        return f"exponent={self.exponent:g}, max_norm={self.max_norm:g}, level={self.level!r}"

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        """``(tr G / G_kk)^exponent`` per task, scaled down to ``max_norm`` if set."""
        g = gramian.detach().to(dtype=torch.float64)
        weights = ntk_weights(g, self.exponent)
        if self.max_norm > 0:
            norm = math.sqrt(max(float(weights @ g @ weights), 0.0))
            if norm > self.max_norm:
                weights = weights * (self.max_norm / norm)
        return weights.to(gramian.device)
