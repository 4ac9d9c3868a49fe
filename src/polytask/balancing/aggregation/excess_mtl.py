"""ExcessMTL: task weights by exponentiated gradient on Adagrad-estimated excess risks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..base import BALANCERS, BackwardContext
from ..gradient import GradientBalancer, Level
from ._common import check_number_option, task_indices

# float64 column block of the per-coordinate work (4 MiB)
_BLOCK_ELEMENTS = 1 << 19

__all__ = ["ExcessMTL"]


@BALANCERS.register("excess_mtl")
class ExcessMTL(GradientBalancer):
    r"""ExcessMTL (He et al., "Robust Multi-Task
    Learning with Excess Risks", ICML 2024, Algorithm 1;
    official code https://github.com/yifei-he/ExcessMTL, ``LibMTL/weighting/ExcessMTL.py``).

    The weights follow each task's *excess risk* ``L_k(theta) - L_k(theta_k^*)`` rather than
    its loss, so that a task with a high irreducible loss (label noise) does not take over.
    The excess risk is estimated by a second-order Taylor expansion around the task's
    optimum, ``(theta - theta^*)^T H (theta - theta^*) / 2 ~ g^T H^{-1} g / 2``, with the
    Hessian ``H`` replaced by Adagrad's diagonal preconditioner. Per step, for every task
    ``k`` present (``g_k`` its gradient, a row of the Jacobian):

    .. math::
        G_k \leftarrow G_k + g_k \odot g_k, \qquad
        r_k = \sum_j \frac{g_{k,j}^2}{\sqrt{G_{k,j} + \epsilon}}
        \quad (\text{a term with } G_{k,j} + \epsilon = 0 \text{ is } 0),

    ``G_k`` the running sum of squared gradients (zero initially). The first estimate of each
    task, ``r_k^{(0)}``, is kept as its normaliser; from the next step on the weights follow
    the exponentiated-gradient (multiplicative-weights) step on the normalised estimates

    .. math::
        w_k \leftarrow w_k \exp(\eta\, r_k / r_k^{(0)}), \qquad
        w \leftarrow K\, w / \textstyle\sum_j w_j,

    and the update is ``d = sum_k w_k g_k`` with the weights *after* this step's update
    (``w = 1`` at the first step). This is the official code: the constant 1/2 of the
    Taylor term is absorbed in ``eta``, the normalisation by the first estimate (which
    makes the tasks' estimates comparable) is the code's, and the weights sum to K (the
    paper writes the simplex, sum 1; a factor K on the update).

    Conventions and deviations:

    - ``eta`` (``robust_step_size`` in the official code, which takes it from the command
      line) defaults to 0.01; ``eps`` (inside the square root) defaults to 1e-7, the official
      constant. With ``eps = 0`` the estimate, and so the weights, are invariant to a
      positive rescaling of a task's gradients, and the update is equivariant.
    - A task whose first estimate is 0 (an exactly zero gradient) keeps no normaliser: the
      first step where its estimate is positive gives it one, and until then its weight is
      not moved.
    - **Missing tasks**: only the tasks present in the step update their sums, normaliser and
      weight; the normalisation to sum K is over all tasks.
    - **Task-specific parameters** get the ordinary gradient of ``sum_k L_k``, as with every
      gradient method here (the official code backpropagates ``sum_k w_k L_k``, so a task's
      head there receives ``w_k`` times its gradient).
    - **Feature level**: as in the official code's representation-gradient mode, the
      estimate uses each task's representation gradient summed over the batch (one vector
      of the representation's width per point, comparable from batch to batch); the update
      combines the full per-sample rows with the weights.

    State (saved in checkpoints; identical on every process since it follows the complete
    Jacobian): the weights, the normalisers and the sums ``G`` (K x the number of shared
    parameters at ``level=parameter``, float64).

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
        eta: the exponentiated-gradient step size, ``>= 0``.
        eps: added under the square root of the preconditioner, ``>= 0``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        eta: float = 0.01,
        eps: float = 1e-7,
    ) -> None:
        super().__init__(tasks, level)
        self.eta = check_number_option("eta", eta, low=0.0)
        self.eps = check_number_option("eps", eps, low=0.0)
        k = len(self.task_names)
        #: the task weights (sum K)
        self.task_weights = torch.ones(k, dtype=torch.float64)
        #: each task's first positive excess-risk estimate (NaN until then)
        self.initial = torch.full((k,), math.nan, dtype=torch.float64)
        #: running sums of squared gradients, K x D (None before the first step)
        self.squares: Tensor | None = None
        self._point_shapes: list[torch.Size] = []

    def extra_repr(self) -> str:
        return f"level={self.level!r}, eta={self.eta}, eps={self.eps}"

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        if self.level == "feature" and ctx.representation is not None:
            self._point_shapes = [p.original.shape for p in ctx.representation.points]
        try:
            return super().backward(losses, ctx)
        finally:
            self._point_shapes = []

    def _summed_over_batch(self, jacobian: Tensor) -> Tensor:
        """Feature level: each point's block of every row summed over its first (batch)
        dimension, the blocks concatenated (K x the representation's width)."""
        pieces, offset = [], 0
        for shape in self._point_shapes:
            n = shape.numel()
            block = jacobian[:, offset : offset + n]
            if len(shape) >= 1 and shape[0] > 0:
                block = block.reshape(jacobian.shape[0], shape[0], -1).sum(dim=1)
            pieces.append(block)
            offset += n
        if offset != jacobian.shape[1]:
            raise ValueError(
                "ExcessMTL at the feature level needs the shapes of the representation points "
                "(call backward, not aggregate)."
            )
        return torch.cat(pieces, dim=1)

    def excess_risks(self, rows: Tensor, index: Sequence[int]) -> Tensor:
        """Add the squares of ``rows`` (of the tasks at ``index``) into the sums and return
        their estimates ``r_k`` (float64)."""
        k = len(self.task_names)
        squares = self.squares
        if squares is None:
            squares = torch.zeros((k, rows.shape[1]), dtype=torch.float64, device=rows.device)
        elif squares.shape[1] != rows.shape[1]:
            raise ValueError(
                f"ExcessMTL: the sums of squared gradients have {squares.shape[1]} entries, "
                f"the rows of this step {rows.shape[1]}; the shared parameters (or the "
                "representation's width) changed since the state was saved."
            )
        else:
            squares = squares.to(rows.device)
        self.squares = squares
        whole = list(index) == list(range(k))  # every task, in order: update in place
        position = torch.tensor(list(index), device=rows.device)
        risks = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
        n = rows.shape[1]
        # by column blocks, so that the float64 temporaries stay small beside the state
        width = min(max(n, 1), max(1024, _BLOCK_ELEMENTS // max(k, 1)))
        for start in range(0, n, width):
            cols = slice(start, start + width)
            sq = rows[:, cols].to(torch.float64, copy=True).square_()  # never rows itself
            if whole:
                updated = squares[:, cols]
                updated += sq
            else:
                updated = squares[position, cols] + sq
                squares[position, cols] = updated
            root = (updated + self.eps).sqrt_()
            # where the root is 0 so is the square (the sum holds it): 0 / tiny = 0
            risks += sq.div_(root.clamp_min_(torch.finfo(torch.float64).tiny)).sum(dim=1)
        return risks

    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        index = task_indices(self.task_names, tasks)
        rows = self._summed_over_batch(jacobian) if self.level == "feature" else jacobian
        risks = self.excess_risks(rows, index).cpu()
        initial = self.initial.clone()
        exponents = torch.zeros(len(self.task_names), dtype=torch.float64)
        for j, i in enumerate(index):
            r = float(risks[j])
            if math.isnan(float(initial[i])):
                if r > 0:
                    initial[i] = r  # the normaliser; the weight moves from the next step
                continue
            exponents[i] = self.eta * r / float(initial[i])
        # w * exp(eta r / r0), normalised to sum K: in log space, so that no exp overflows
        weights = len(self.task_names) * torch.softmax(self.task_weights.log() + exponents, dim=0)
        self.task_weights, self.initial = weights, initial
        w = weights[index].to(device=jacobian.device, dtype=jacobian.dtype)
        return w @ jacobian, w

    def on_structure_changed(self) -> None:
        """The sums of squared gradients (sized to the shared parameters or the
        representation) start again from zero, as at the first step; the weights carry on."""
        self.squares = None

    def get_extra_state(self) -> dict[str, Any]:
        squares = None if self.squares is None else self.squares.detach().cpu().clone()
        return {
            "weights": self.task_weights.clone(),
            "initial": self.initial.clone(),
            "squares": squares,
        }

    def set_extra_state(self, state: Any) -> None:
        k = len(self.task_names)
        for key in ("weights", "initial"):
            value = state.get(key)
            if not isinstance(value, Tensor) or value.shape != (k,):
                raise ValueError(f"balancer state {key!r}: expected {k} values, found {value!r}")
        squares = state.get("squares")
        if squares is not None and (
            not isinstance(squares, Tensor) or squares.dim() != 2 or squares.shape[0] != k
        ):
            raise ValueError(f"balancer state 'squares': expected K x D sums, found {squares!r}")
        self.task_weights = state["weights"].to(torch.float64).clone()
        self.initial = state["initial"].to(torch.float64).clone()
        self.squares = None if squares is None else squares.to(torch.float64).clone()
