"""GradVac: steer pairwise gradient similarities towards their running targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
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
from .pcgrad import float64_array, random_task_orders, sum_rows_in_order, visit_plan

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

    The rows are processed together, as in :func:`~.pcgrad.pcgrad_weights` (``K - 1``
    sequential steps of batched NumPy operations; at step ``p`` each row ``i`` visits its own
    ``orders[i][p]``), with the coefficients ``C`` of every adjusted row and their dot
    products ``D = C G`` with the original gradients. The operations, and the order of every
    sum, are those of a loop over the rows, so the results are the same to the last bit.

    Args:
        gramian: K x K Gramian of this step's rows.
        orders: for each row, the other rows in the order it visits them.
        targets: K x K targets ``phi_hat`` of the same rows (row ``i``, column ``j``).
        beta: EMA rate of the targets.

    Returns:
        The K coefficients (float64, on the Gramian's device) and the new K x K targets
        (float64, CPU).
    """
    g = float64_array(gramian)
    k = g.shape[0]
    cols, flat = visit_plan(orders, k)
    phi_hat = float64_array(targets).reshape(k, k).copy()
    with np.errstate(all="ignore"):  # from pairs that are skipped or rows left unchanged
        sq = np.diagonal(g)
        norm = np.sqrt(sq)
        sq_j, norm_j = sq[cols], norm[cols]  # of the row visited at each step
        defined_j = ~(sq_j <= 0.0)  # NaNs compare false: not skipped, as in a loop
        # each pair (i, j) is visited once: its target is read before it is updated
        target = phi_hat.reshape(-1)[flat]
        sin_target = np.sqrt(_positive_part(1.0 - target * target))
        reachable = sin_target > 0.0  # a target of 1 cannot be reached
        denominator = norm_j * sin_target
        finite = bool(np.isfinite(g).all())
        # Row i's coefficients and dot products are stored as column i (coef_t = C^T,
        # dots_t = D^T): then ||g_i||^2 = sum_l C_il D_il is a sum down the columns, which
        # NumPy adds row after row, in the order of a loop over l (and it is fast).
        coef_t = np.eye(k)
        g_t = np.ascontiguousarray(g.T)  # g_t[l, j] = G_jl
        dots_t = g_t.copy()  # dots_t[l, i] = <g_i^adjusted, g_l>
        flat_t = cols * k + np.arange(k)  # position of (orders[i][p], i) in coef_t, dots_t
        norm_i = norm.copy()  # ||g_i^adjusted||
        defined_i = ~(sq <= 0.0)
        phi_all = np.zeros_like(target)  # phi_all[p, i]: the cosine of row i at step p
        active_all = np.zeros(target.shape, dtype=bool)  # the pairs not skipped
        for p in range(cols.shape[0]):
            active = defined_i & defined_j[p]
            if not active.any():
                continue
            active_all[p] = active
            phi = dots_t.reshape(-1)[flat_t[p]] / (norm_i * norm_j[p])
            # min(1, max(-1, phi)): fmax, unlike maximum, maps NaN to -1 as Python's max does
            phi = np.fmin(np.fmax(phi, -1.0), 1.0)
            phi_all[p] = phi
            adjust = active & (phi < target[p]) & reachable[p]
            if not adjust.any():
                continue
            sin_phi = np.sqrt(_positive_part(1.0 - phi * phi))
            step = norm_i * (target[p] * sin_phi - phi * sin_target[p]) / denominator[p]
            step = np.where(adjust, step, 0.0)
            coef_t.reshape(-1)[flat_t[p]] += step
            update = g_t.take(cols[p], axis=1) * step  # update[l, i] = step_i G_{j_i l}
            if finite:  # the other rows get d + 0 * G_jl = d
                dots_t += update
            else:  # 0 * inf would give NaN
                dots_t = np.where(adjust, dots_t + update, dots_t)
            # max(0, c.(Gc)), added in the order of a loop: with nearly dependent gradients
            # it is a cancellation whose rounding can decide later comparisons, and the
            # fixed order gives the same result to the last bit
            sq_norm = _positive_part((coef_t * dots_t).sum(axis=0))
            norm_i = np.where(adjust, np.sqrt(sq_norm), norm_i)
            defined_i = np.where(adjust, sq_norm > 0.0, defined_i)
        ema = (1.0 - beta) * target + beta * phi_all
    phi_hat.reshape(-1)[flat.reshape(-1)] = np.where(active_all, ema, target).reshape(-1)
    weights = torch.from_numpy(sum_rows_in_order(coef_t.T)).to(gramian.device)
    return weights, torch.from_numpy(phi_hat)


def _positive_part(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``max(0, x)`` elementwise, NaN -> 0 as with Python's ``max(0.0, x)`` (``fmax``)."""
    return np.fmax(x, 0.0)


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
