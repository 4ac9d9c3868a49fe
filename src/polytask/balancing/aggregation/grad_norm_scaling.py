"""Loss scaling by gradient magnitude: the sum of the unit task gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import BALANCERS
from ..gradient import GramianWeighting, Level

__all__ = ["GradNormScaling"]


@BALANCERS.register("grad_norm_scaling")
class GradNormScaling(GramianWeighting):
    r"""Each task's loss divided by the norm of its gradient (detached):

    .. math::
        d = \sum_k \frac{g_k}{\lVert g_k \rVert}, \qquad w_k = \frac{1}{\lVert g_k \rVert},

    i.e. the gradient of ``sum_k L_k / sg(||g_k||)``: the sum of the unit task gradients.
    ``g_k`` are the rows the engine computes: gradients with respect to the shared parameters
    (``level=parameter``) or to the shared representation (``level=feature``); a task's own
    head gets the ordinary gradient of its loss, as with every gradient method here. A task
    whose gradient is exactly zero gets weight 0 (it contributes nothing either way).

    It is a simple gradient-magnitude baseline in the spirit of the studies that compare
    multi-task optimisers with plain scalarisation and find simple baselines hard to beat
    (Kurin et al., "In Defense of the Unitary Scalarization for Deep Multi-Task Learning",
    NeurIPS 2022; Xin et al., "Do Current Multi-Task Optimization Methods in Deep Learning
    Even Help?", NeurIPS 2022), and the magnitude-balancing half of methods such as DB-MTL
    (without its EMA and its rescaling to the largest norm). No other method here computes
    it: MGDA with ``normalization=l2`` solves its min-norm problem for the unit gradients but
    applies the weights to the raw ones, and IMTL-G and Aligned-MTL balance the projections,
    not the norms.

    The update is invariant to a positive rescaling of any single task's gradient (or loss),
    and its norm is at most K whatever the scale of the gradients: the learning rate sets
    the step size directly.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
    """

    def __init__(self, tasks: Sequence[str], level: Level = "parameter") -> None:
        super().__init__(tasks, level)

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        norms = gramian.diagonal().clamp_min(0).sqrt()
        return torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
