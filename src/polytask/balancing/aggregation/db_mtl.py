"""DB-MTL: log-transformed losses and task gradients rescaled to the largest EMA norm."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS, BackwardContext
from ..gradient import GradientBalancer, Level
from ._common import check_number_option, task_indices

__all__ = ["DBMTL"]


@BALANCERS.register("db_mtl")
class DBMTL(GradientBalancer):
    r"""Dual-Balancing Multi-Task Learning (Lin et al.,
    "Dual-Balancing for Multi-Task Learning", 2023, https://arxiv.org/abs/2308.12029;
    official code in LibMTL, ``LibMTL/weighting/DB_MTL.py``).

    **Loss-scale balancing.** Every task's loss is replaced by ``log(L_k + eps)`` before the
    per-task gradients are taken, so the rows are
    ``g_k = grad log(L_k + eps) = grad L_k / (L_k + eps)``: multiplying a task's loss by a
    constant changes nothing. The transform is applied to the losses handed to the gradient
    engine, so the task-specific parameters are trained on ``sum_k log(L_k + eps)`` too, as
    in the official code (where every parameter receives the gradients of the log-losses).

    **Gradient-magnitude balancing.** An exponential moving average of each task's gradient,

    .. math::
        \hat g_k \leftarrow \beta_t \hat g_k + (1 - \beta_t) g_k, \qquad
        \beta_t = \beta / t^{\sigma}, \qquad \hat g_k = 0 \text{ initially},

    (``t`` counts the task's steps from 1; ``sigma = 0`` is a constant ``beta``), and the
    update is the sum of the averages, each rescaled to the largest of their norms:

    .. math::
        d = \sum_k \alpha_k \hat g_k, \qquad
        \alpha_k = \frac{\max_j \lVert \hat g_j \rVert}{\lVert \hat g_k \rVert}.

    The weights returned for logging are the ``alpha_k``. Defaults ``beta = 0.9``,
    ``beta_sigma = 0`` and ``eps = 1e-8`` are those of the official code's command line
    (``--DB_beta``, ``--DB_beta_sigma``; the paper tunes ``beta`` per data set).

    Deviations and conventions:

    - ``alpha_k`` is exactly ``max / norm_k`` (the official code divides by
      ``norm_k + 1e-8``), so the update is exactly equivariant to the scale of the gradients;
      a task whose average is exactly zero gets ``alpha_k = 0`` (it adds nothing).
    - **Missing tasks**: only the averages (and step counts) of the tasks present in the
      step are updated, and only those tasks enter the maximum and the sum.
    - **Feature level** (``level=feature``; the official code refuses representation
      gradients): a row is then the gradient with respect to the representation of *this
      batch's* samples, and an average over batches of such rows would mix different samples
      (and change shape with the batch size). At that level polytask averages each task's
      gradient **norm** instead, ``nu_k <- beta_t nu_k + (1 - beta_t) ||g_k||``, and combines
      the current rows, ``d = sum_k (max_j nu_j / nu_k) g_k``: each task's current gradient
      rescaled to the largest averaged magnitude. At ``level=parameter`` (default) the update
      is the paper's.
    - A loss with ``L_k + eps <= 0`` is a :class:`~polytask.errors.ConfigError` (the
      logarithm is undefined); the check reads one boolean from the device per step.

    State (saved in checkpoints, identical on every process since it follows the complete
    Jacobian): the averages (K x the number of shared parameters at ``level=parameter``,
    float32 like the rows: one more copy of the Jacobian's memory; K values at
    ``level=feature``) and each task's step count.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
        beta: the moving-average coefficient, in ``[0, 1)``.
        beta_sigma: the decay exponent ``sigma >= 0`` of ``beta_t = beta / t^sigma``.
        eps: added to every loss inside the logarithm, ``>= 0``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks, level)
        self.beta = check_number_option("beta", beta, low=0.0)
        if self.beta >= 1.0:
            raise ConfigError(
                f"balancer.options.beta: expected a number in [0, 1), found {beta!r}."
            )
        self.beta_sigma = check_number_option("beta_sigma", beta_sigma, low=0.0)
        self.eps = check_number_option("eps", eps, low=0.0)
        k = len(self.task_names)
        #: the averaged gradients (K x N, parameter level) or norms (K, feature level)
        self.average: Tensor | None = None
        #: the number of steps each task has been present in
        self.steps = torch.zeros(k, dtype=torch.int64)

    def extra_repr(self) -> str:
        return (
            f"level={self.level!r}, beta={self.beta}, beta_sigma={self.beta_sigma}, eps={self.eps}"
        )

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        names = list(losses)
        shifted = torch.stack([losses[t].detach() for t in names]) + self.eps
        if bool((shifted <= 0).any()):  # one synchronisation per step
            bad = [t for t, v in zip(names, shifted.tolist(), strict=True) if v <= 0]
            raise ConfigError(
                f"balancer.name=db_mtl takes the logarithm of L + eps, which is not positive "
                f"for task(s) {bad}; use a non-negative loss or a larger balancer.options.eps."
            )
        logs = {t: torch.log(losses[t] + self.eps) for t in names}
        return super().backward(logs, ctx)

    def betas(self, steps: Tensor) -> Tensor:
        """``beta_t = beta / t^sigma`` for the step counts ``t >= 1`` (float64)."""
        return self.beta / steps.double().pow(self.beta_sigma)

    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        index = task_indices(self.task_names, tasks)
        k = len(self.task_names)
        steps = self.steps[index] + 1
        betas = self.betas(steps).tolist()
        if self.level == "feature":
            shape: tuple[int, ...] = (k,)
        else:
            shape = (k, jacobian.shape[1])
        average = self.average
        if average is None:
            average = torch.zeros(shape, dtype=jacobian.dtype, device=jacobian.device)
        elif tuple(average.shape) != shape:
            raise ValueError(
                f"DB-MTL: the averaged gradients have shape {tuple(average.shape)}, the rows "
                f"of this step need {shape}; the shared parameters changed since the state was "
                "saved."
            )
        else:
            average = average.to(device=jacobian.device, dtype=jacobian.dtype)
        if self.level == "feature":
            norms = torch.linalg.vector_norm(jacobian, dim=1, dtype=torch.float64)
            for j, i in enumerate(index):
                new = norms[j].to(average.dtype)
                average[i] = new + betas[j] * (average[i] - new)
            magnitudes = average[index].double()
            rows = jacobian
        else:
            for j, i in enumerate(index):
                row = jacobian[j]
                average[i] = row + betas[j] * (average[i] - row)
            rows = average[index]
            magnitudes = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)
        self.average = average
        self.steps[index] = steps
        largest = magnitudes.max()
        alpha = torch.where(
            magnitudes > 0, largest / torch.where(magnitudes > 0, magnitudes, 1.0), 0.0
        )
        alpha = alpha.to(jacobian.dtype)
        return alpha @ rows, alpha

    def on_structure_changed(self) -> None:
        """The averaged gradients (sized to the shared parameters at the parameter level)
        start again from zero with their step counts, as at the first step."""
        if self.level == "parameter":
            self.average = None
            self.steps = torch.zeros_like(self.steps)

    def get_extra_state(self) -> dict[str, Any]:
        average = None if self.average is None else self.average.detach().cpu().clone()
        return {"average": average, "steps": self.steps.clone()}

    def set_extra_state(self, state: Any) -> None:
        k = len(self.task_names)
        average, steps = state.get("average"), state.get("steps")
        if not isinstance(steps, Tensor) or steps.shape != (k,):
            raise ValueError(f"balancer state 'steps': expected {k} step counts, found {steps!r}")
        if average is not None and (
            not isinstance(average, Tensor)
            or average.shape[0] != k
            or average.dim() != (1 if self.level == "feature" else 2)
        ):
            raise ValueError(
                f"balancer state 'average': expected the {k} averages of level "
                f"{self.level!r}, found {average!r}"
            )
        self.steps = steps.to(torch.int64).clone()
        self.average = None if average is None else average.detach().clone()
