"""GradNorm: learn task weights that equalise weighted gradient norms at a loss-rate target."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..base import BALANCERS, BackwardContext
from ..gradient import GradientBalancer, Level
from ._common import check_number_option, task_indices

__all__ = ["GradNorm", "gradnorm_weight_grad"]


def gradnorm_weight_grad(
    weights: Tensor, norms: Tensor, losses: Tensor, initial_losses: Tensor, alpha: float
) -> Tensor:
    """The gradient of GradNorm's loss ``L_grad`` with respect to the task weights.

    ``L_grad = sum_k |w_k ||g_k|| - mean_j(w_j ||g_j||) r_k^alpha|`` with the relative
    inverse training rate ``r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0))``. The target
    ``mean_j(w_j ||g_j||) r_k^alpha`` is a constant (as in the paper), so
    ``dL_grad / dw_k = sign(w_k ||g_k|| - target_k) ||g_k||``.

    A non-positive initial loss (a ratio the paper leaves undefined) gives ``L_k / L_k(0) =
    1``, a zero mean ratio gives ``r = 1``: the result is finite for any finite input.
    All arguments are K-vectors over the tasks of the step.
    """
    weights, norms = weights.double(), norms.double()
    losses, initial_losses = losses.double(), initial_losses.double()
    rates = torch.where(initial_losses > 0, losses / initial_losses, 1.0)
    mean_rate = rates.mean()
    relative = torch.where(mean_rate > 0, rates / mean_rate, 1.0)
    weighted = weights * norms
    target = weighted.mean() * relative.pow(alpha)
    return torch.sign(weighted - target) * norms


@BALANCERS.register("gradnorm")
class GradNorm(GradientBalancer):
    """GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing
    in Deep Multitask Networks", ICML 2018, https://arxiv.org/abs/1711.02257).

    Learnable task weights ``w`` (initialised to 1) scale the task gradients: the step's
    update is ``sum_k w_k g_k`` with the **current** weights. The weights learn, in their own
    optimizer parameter group, from the gradient of
    ``L_grad = sum_k |w_k ||g_k|| - mean_j(w_j ||g_j||) r_k^alpha|`` with the target treated
    as a constant, ``r_k = (L_k(t) / L_k(0)) / mean_j(L_j(t) / L_j(0))``; after each
    optimizer step they are renormalised to sum to the number of tasks K. The gradient of
    ``w`` is written into ``w.grad`` during :meth:`backward` (multiplied by the loss scale
    under fp16 loss scaling, which the scaler undoes with the other gradients).

    Conventions and deviations:

    - **Which gradients.** The paper measures ``||g_k||`` on the last shared layer's weights
      for speed. Here ``||g_k||`` is the norm of the rows the engine computes: the gradient
      with respect to the manipulated parameters (``level=parameter``: the shared
      parameters, or what ``balancer.shared`` selects, so a pattern matching only the last
      shared layer reproduces the paper) or to the shared representation
      (``level=feature``). Norms come from the rows directly (``sqrt(G_kk)``).
    - **Initial losses.** ``L_k(0)`` is each task's loss at the first step where the task
      is present; it is saved with the checkpoint. A step where only some tasks are
      present takes the means over those tasks and updates only their weights.
    - **Renormalisation.** After each step ``w <- K max(w, 0) / sum max(w, 0)`` (reset to 1
      if all are zero): the paper renormalises to ``sum w = K``; clamping at 0 keeps a
      too-large learning rate from turning a weight negative, which would ascend its loss.
    - **Learning rate.** ``lr = 0.025`` for ``w`` by default (the paper does not fix one;
      0.025 is what the Nash-MTL and FAMO code use for their loss-weight parameters);
      ``balancer.lr`` overrides it.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
        alpha: asymmetry ``alpha >= 0`` (0 asks for equal weighted gradient norms; larger
            values pull harder towards tasks that train slowly; the paper tunes it per
            data set).
    """

    lr = 0.025

    def __init__(
        self, tasks: Sequence[str], level: Level = "parameter", alpha: float = 1.5
    ) -> None:
        super().__init__(tasks, level)
        self.alpha = check_number_option("alpha", alpha, low=0.0)
        n = len(self.task_names)
        self.weight = nn.Parameter(torch.ones(n))
        self.initial_losses = torch.full((n,), float("nan"), dtype=torch.float64)
        self._step_losses: dict[str, Tensor] = {}
        self._weight_grad: Tensor | None = None

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        names = list(losses)
        index = torch.tensor(task_indices(self.task_names, names))
        reduced = self.reduce_losses(losses)
        current = torch.stack([reduced[t].double() for t in names])
        initial = self.initial_losses.to(current.device)
        seen = initial[index]
        initial[index] = torch.where(torch.isnan(seen), current, seen)
        self.initial_losses = initial
        self._step_losses = {t: current[i] for i, t in enumerate(names)}
        self._weight_grad = None
        weights = super().backward(losses, ctx)
        self._step_losses = {}
        if self._weight_grad is not None:
            scale = ctx.grad_scaler.get_scale() if ctx.grad_scaler is not None else 1.0
            grad = (self._weight_grad * scale).to(self.weight.dtype)
            self.weight.grad = grad if self.weight.grad is None else self.weight.grad + grad
        return weights

    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        present = task_indices(self.task_names, tasks)
        index = torch.tensor(present, device=self.weight.device)
        weights = self.weight.detach()[index].to(jacobian.device, jacobian.dtype)
        combined = weights @ jacobian
        if all(t in self._step_losses for t in tasks):
            norms = self.gramian(jacobian).diagonal().clamp_min(0).sqrt()
            losses = torch.stack([self._step_losses[t] for t in tasks]).to(jacobian.device)
            initial = self.initial_losses.to(jacobian.device)[index.to(jacobian.device)]
            grad = torch.zeros(len(self.task_names), dtype=torch.float64, device=jacobian.device)
            grad[index.to(jacobian.device)] = gradnorm_weight_grad(
                weights, norms, losses, initial, self.alpha
            )
            self._weight_grad = grad.to(self.weight.device)
        return combined, weights

    @torch.no_grad()
    def after_optimizer_step(self, losses: Mapping[str, Tensor] | None = None) -> None:
        positive = self.weight.clamp_min(0.0)
        total = positive.sum()
        k = len(self.task_names)
        renormalised = torch.where(total > 0, positive * (k / total), torch.ones_like(positive))
        self.weight.copy_(renormalised)

    def get_extra_state(self) -> dict[str, Any]:
        return {"initial_losses": self.initial_losses.detach().cpu().clone()}

    def set_extra_state(self, state: Any) -> None:
        initial = state["initial_losses"]
        if not isinstance(initial, Tensor) or initial.shape != self.initial_losses.shape:
            raise ValueError(
                f"balancer state 'initial_losses': expected a tensor of shape "
                f"{tuple(self.initial_losses.shape)}, found {initial!r}"
            )
        self.initial_losses = initial.detach().to(torch.float64).clone()
