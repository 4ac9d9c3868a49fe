"""PCGrad: project each task's gradient off the gradients it conflicts with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from ..base import BALANCERS
from ..gradient import Level
from ._common import TaskGramianWeighting, check_int_option, load_generator_state, task_indices

__all__ = ["PCGrad", "pcgrad_weights", "random_task_orders"]


def random_task_orders(
    generator: torch.Generator, n_tasks: int, present: Sequence[int]
) -> list[list[int]]:
    """For each present task, a uniformly random order of the other present tasks.

    One draw of ``n_tasks x n_tasks`` uniform keys (float64) from ``generator`` per call,
    whatever the subset: the generator advances identically every step, so processes with
    the same seed agree. Task ``a`` visits the others by increasing ``keys[a, b]``; the keys
    are indexed by the tasks' positions in the balancer's fixed list, not by their rows, so
    permuting the rows permutes the orders with them.

    Args:
        generator: the method's own CPU generator.
        n_tasks: the number of tasks the balancer was built for.
        present: the positions (in that list) of the tasks of this step, one per row.

    Returns:
        ``orders[i]``: the rows ``j != i`` in the order row ``i`` visits them.
    """
    keys = torch.rand(n_tasks, n_tasks, generator=generator, dtype=torch.float64).tolist()
    orders = []
    for i, a in enumerate(present):
        row_keys = [keys[a][b] for b in present]
        orders.append(sorted((j for j in range(len(present)) if j != i), key=row_keys.__getitem__))
    return orders


def visit_plan(
    orders: Sequence[Sequence[int]], k: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """The visiting orders of ``k`` rows as two ``m x k`` index arrays, one row per step.

    All the rows advance in lockstep: at step ``p`` row ``i`` visits ``orders[i][p]``, so
    every row must visit the same number ``m`` of rows (``k - 1`` with
    :func:`random_task_orders`), each at most once.

    Returns:
        ``cols[p, i] = orders[i][p]`` and ``flat[p, i] = i * k + orders[i][p]``, the position
        of the visited pair ``(i, orders[i][p])`` in a flattened (C-contiguous) ``k x k``
        array.
    """
    if len(orders) != k:
        raise ValueError(f"expected {k} visiting orders (one per row), found {len(orders)}")
    lengths = {len(order) for order in orders}
    if len(lengths) > 1:
        raise ValueError(f"the visiting orders must all have the same length, found {lengths}")
    m = lengths.pop() if lengths else 0
    order = np.array([list(order) for order in orders], dtype=np.intp).reshape(k, m)
    if m:
        ordered = np.sort(order, axis=1)
        if (
            ordered[:, 0].min() < 0
            or ordered[:, -1].max() >= k
            or (ordered[:, 1:] == ordered[:, :-1]).any()
        ):
            raise ValueError(f"each visiting order must list distinct rows in [0, {k})")
    cols = np.ascontiguousarray(order.T)
    return cols, cols + np.arange(k, dtype=np.intp) * k


def float64_array(tensor: Tensor) -> npt.NDArray[np.float64]:
    """``tensor`` as a float64 NumPy array on the CPU (it may share the tensor's memory)."""
    return tensor.detach().to("cpu", torch.float64).numpy(force=True)


def sum_rows_in_order(coef: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The sum of the rows of ``coef``, added one row after the other.

    An accumulation, which is sequential, where ``coef.sum(axis=0)`` may add the rows in
    another order: the result is the same, to the last bit, as accumulating them in a loop.
    """
    if coef.shape[0] == 0:
        return np.zeros(coef.shape[1])
    total: npt.NDArray[np.float64] = np.cumsum(coef, axis=0)[-1]
    return total


def pcgrad_weights(gramian: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """PCGrad's coefficients ``w`` (the result is ``sum_k w_k g_k``) from the Gramian.

    Row ``i`` starts as ``g_i`` (coefficients ``e_i``) and, for each ``j`` in ``orders[i]``,
    loses its component along ``g_j`` when the two conflict:
    ``g_i <- g_i - (<g_i, g_j> / ||g_j||^2) g_j`` if ``<g_i, g_j> < 0``, where ``g_i`` is the
    already-projected vector and ``g_j`` the original gradient (Algorithm 1 of the paper).
    Dot products are read from the Gramian: ``<sum_l c_l g_l, g_j> = (c^T G)_j``. The sum of
    the projected rows is returned. No epsilon: a zero gradient ``g_j`` (``G_jj = 0``) has no
    conflict with anything and is skipped. Computed in float64 on the CPU.

    The rows do not depend on each other, so they are processed together, in ``K - 1``
    sequential steps of batched array operations: at step ``p`` each row ``i`` visits its own
    ``orders[i][p]``. ``D = C G`` holds the dot products of the projected rows (the rows of
    ``C`` are their coefficients) with the original gradients. The arrays are NumPy's, whose
    per-operation overhead on such small arrays is a fraction of torch's. The operations, and
    the order of the final sum over the rows, are those of a loop over the rows, so the
    result is the same to the last bit.
    """
    g = float64_array(gramian)
    k = g.shape[0]
    cols, flat = visit_plan(orders, k)
    sq_j = np.diagonal(g)[cols]  # ||g_j||^2 of the row visited at each step
    nonzero_j = sq_j > 0.0
    finite = bool(np.isfinite(g).all())
    dots = g.copy()  # dots[i, l] = <g_i^PC, g_l>
    steps = np.zeros_like(sq_j)  # steps[p, i]: multiple of g_j removed from g_i at step p
    with np.errstate(all="ignore"):  # from rows that are left unchanged
        for p in range(cols.shape[0]):
            dot = dots.reshape(-1)[flat[p]]
            conflict = (dot < 0.0) & nonzero_j[p]
            if not conflict.any():
                continue
            step = np.where(conflict, dot / sq_j[p], 0.0)
            steps[p] = step
            update = step[:, None] * g[cols[p]]
            if finite:  # the other rows get d - 0 * G_jl = d
                dots -= update
            else:  # 0 * inf would give NaN
                dots = np.where(conflict[:, None], dots - update, dots)
    coef = np.eye(k)  # coef[i]: coefficients of the projected g_i
    coef.reshape(-1)[flat.reshape(-1)] -= steps.reshape(-1)  # each pair (i, j) visited once
    return torch.from_numpy(sum_rows_in_order(coef)).to(gramian.device)


@BALANCERS.register("pcgrad")
class PCGrad(TaskGramianWeighting):
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
    https://arxiv.org/abs/2001.06782).

    For each task ``i``, visit the other tasks in a random order; whenever the (already
    projected) ``g_i`` conflicts with ``g_j`` (``<g_i, g_j> < 0``), project it onto the normal
    plane of ``g_j``::

        g_i <- g_i - <g_i, g_j> / ||g_j||^2 * g_j

    The update is the **sum** of the projected gradients, as in the paper (not the mean; for
    non-conflicting gradients PCGrad is plain gradient descent on ``sum_k L_k``). The result
    is a combination of the rows whose coefficients follow from the Gramian, so the method
    never touches the Jacobian; the effective weights are those coefficients.

    Conventions:

    - Random order: each step draws a key per ordered pair of tasks from the method's own
      ``torch.Generator`` (option ``seed``); see :func:`random_task_orders`. Its state is
      saved with the checkpoint (exact resume), processes with the same seed draw the same
      orders, and the draws are keyed by task name, so the result does not depend on the
      order in which tasks are listed. Each task draws its own order, as in the paper's
      Algorithm 1.
    - No epsilon (LibMTL adds a small constant to ``||g_j||^2``, which dominates at small
      gradient scales): the coefficients are exactly invariant to the scale of the
      gradients, so ``f(cJ) = c f(J)``. TorchJD 0.18 computes the same coefficients.
    - With two tasks the result never conflicts with either gradient.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"`` (see :mod:`polytask.balancing.gradient`).
        seed: seed of the generator that draws the task orders.
    """

    def __init__(self, tasks: Sequence[str], level: Level = "parameter", seed: int = 0) -> None:
        super().__init__(tasks, level)
        self.seed = check_int_option("seed", seed, low=0)
        self.generator = torch.Generator().manual_seed(self.seed)

    def weights_for(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        present = task_indices(self.task_names, tasks)
        orders = random_task_orders(self.generator, len(self.task_names), present)
        return pcgrad_weights(gramian, orders)

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        load_generator_state(self.generator, state["generator"], "generator")
