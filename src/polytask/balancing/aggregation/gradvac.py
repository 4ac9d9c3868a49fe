"""GradVac: steer pairwise gradient similarities towards their running targets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..base import BALANCERS
from ..gradient import Level
from ._common import (
    TaskGramianWeighting,
    check_int_option,
    check_number_option,
    load_generator_state,
    task_indices,
)
from .pcgrad import random_task_orders

__all__ = ["GradVac", "gradvac_weights"]


def gradvac_weights(
    gramian: Tensor, orders: Sequence[Sequence[int]], targets: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """GradVac's coefficients and the updated similarity targets, from the Gramian.

    For each row ``i`` and each ``j`` in ``orders[i]``: ``phi = cos(g_i, g_j)`` with ``g_i``
    the already-adjusted vector; if ``phi < phi_hat_ij`` (the target)::

        g_i <- g_i + ||g_i|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                     / (||g_j|| sqrt(1 - phi_hat^2)) * g_j

        phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi      (phi before the adjustment)

    Every quantity follows from the Gramian (``g_i = sum_l c_l g_l``: ``<g_i, g_j> = (Gc)_j``,
    ``||g_i||^2 = c^T G c``). No epsilon: where a cosine is undefined (``g_i`` or ``g_j`` is
    zero) the pair is skipped and its target is left unchanged; a target of exactly 1 (which
    no finite adjustment can reach) leaves the gradient unchanged but its EMA is still updated.

    Args:
        gramian: K x K Gramian of this step's rows.
        orders: for each row, the other rows in the order it visits them.
        targets: K x K targets ``phi_hat`` of the same rows (row ``i``, column ``j``).
        beta: EMA rate of the targets.

    Returns:
        The K coefficients (float64, on the Gramian's device) and the new K x K targets
        (float64, CPU).
    """
    g = gramian.detach().to("cpu", torch.float64).tolist()
    phi_hat = targets.detach().to("cpu", torch.float64).tolist()
    k = len(g)
    total = [0.0] * k
    for i in range(k):
        coef = [0.0] * k
        coef[i] = 1.0
        dots = list(g[i])  # <g_i^adjusted, g_l> for every l
        sq_norm = g[i][i]
        for j in orders[i]:
            if sq_norm <= 0.0 or g[j][j] <= 0.0:
                continue
            norm_i, norm_j = math.sqrt(sq_norm), math.sqrt(g[j][j])
            phi = min(1.0, max(-1.0, dots[j] / (norm_i * norm_j)))
            target = phi_hat[i][j]
            sin_target = math.sqrt(max(0.0, 1.0 - target * target))
            if phi < target and sin_target > 0.0:
                sin_phi = math.sqrt(max(0.0, 1.0 - phi * phi))
                step = norm_i * (target * sin_phi - phi * sin_target) / (norm_j * sin_target)
                coef[j] += step
                dots = [d + step * r for d, r in zip(dots, g[j], strict=True)]
                sq_norm = max(0.0, sum(c * d for c, d in zip(coef, dots, strict=True)))
            phi_hat[i][j] = (1.0 - beta) * target + beta * phi
        total = [t + c for t, c in zip(total, coef, strict=True)]
    weights = torch.tensor(total, dtype=torch.float64, device=gramian.device)
    return weights, torch.tensor(phi_hat, dtype=torch.float64).reshape(k, k)


@BALANCERS.register("gradvac")
class GradVac(TaskGramianWeighting):
    """Gradient Vaccine (Wang et al., "Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models", ICLR 2021,
    https://arxiv.org/abs/2010.05874).

    Each ordered pair of tasks ``(i, j)`` has a target similarity ``phi_hat_ij``, an EMA of
    the observed cosines (rate ``beta``, initialised to 0). For each task ``i``, visiting the
    other tasks in a random order, if ``cos(g_i, g_j) < phi_hat_ij`` the gradient ``g_i`` (as
    adjusted so far) gets the multiple of ``g_j`` that raises the cosine exactly to the target
    (formula in :func:`gradvac_weights`). The update is the **sum** of the adjusted gradients,
    as in the paper. With all targets at 0 this is PCGrad.

    Conventions and deviations:

    - **Whole vector, not per layer.** The paper applies GradVac to each parameter block
      separately (one set of targets per layer). Here one Gramian of the whole manipulated
      set (or of the whole shared representation at ``level=feature``) is used: the method
      sees only the K x K Gramian, which has no layer boundaries. Use ``balancer.shared``
      to choose the manipulated set.
    - Random order and its generator as in :class:`~polytask.balancing.aggregation.PCGrad`
      (draws keyed by task name; saved with the checkpoint).
    - The targets (K x K over all tasks) are saved with the checkpoint; a step where only
      some tasks are present reads and updates the targets of those tasks' pairs.
    - No epsilon (TorchJD adds ``1e-8`` to its denominators, LibMTL a similar constant; it
      dominates when gradient norms are below about 1e-4): the coefficients are invariant
      to the scale of the gradients, ``f(cJ) = c f(J)`` with the same targets. Undefined
      cosines (a zero gradient) skip the pair.
    - ``beta`` defaults to the paper's 0.01 (TorchJD's default is 0.5).

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
        beta: EMA rate of the similarity targets, in [0, 1].
        seed: seed of the generator that draws the task orders.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        beta: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks, level)
        self.beta = check_number_option("beta", beta, low=0.0, high=1.0)
        self.seed = check_int_option("seed", seed, low=0)
        self.generator = torch.Generator().manual_seed(self.seed)
        n = len(self.task_names)
        self.targets = torch.zeros(n, n, dtype=torch.float64)

    def weights_for(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        present = task_indices(self.task_names, tasks)
        orders = random_task_orders(self.generator, len(self.task_names), present)
        index = torch.tensor(present, dtype=torch.long)
        current = self.targets[index][:, index]
        weights, updated = gradvac_weights(gramian, orders, current, self.beta)
        self.targets[index.unsqueeze(1), index.unsqueeze(0)] = updated
        return weights

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "targets": self.targets.clone()}

    def set_extra_state(self, state: Any) -> None:
        load_generator_state(self.generator, state["generator"], "generator")
        targets = state["targets"]
        if not isinstance(targets, Tensor) or targets.shape != self.targets.shape:
            raise ValueError(
                f"balancer state 'targets': expected a tensor of shape "
                f"{tuple(self.targets.shape)}, found {targets!r}"
            )
        self.targets = targets.detach().to("cpu", torch.float64).clone()
