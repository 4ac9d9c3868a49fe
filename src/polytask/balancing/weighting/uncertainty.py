"""Uncertainty weighting: learned homoscedastic uncertainty (log-variance) per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ..base import BALANCERS, LossWeighting

__all__ = ["UncertaintyWeighting"]

Parameterization = Literal["mtan", "nash_mtl"]

#: initial log-variance and default learning rate (None: the model's) per parameterisation
_SETTINGS: dict[str, tuple[float, float | None]] = {"mtan": (-0.5, None), "nash_mtl": (0.0, 0.025)}


@BALANCERS.register("uncertainty")
class UncertaintyWeighting(LossWeighting):
    r"""Uncertainty weighting (Kendall, Gal and Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018,
    https://arxiv.org/abs/1705.07115).

    Each task has a learnable log-variance ``s_k = log sigma_k^2`` and the total loss is

    .. math::
        \sum_k \frac{1}{2} e^{-s_k} L_k + \frac{1}{2} s_k
        \;=\; \sum_k \frac{L_k}{2 e^{s_k}} + \frac{s_k}{2}.

    The regulariser ``s_k / 2`` is part of the backward pass, so ``s_k`` receives the gradient
    ``(1 - e^{-s_k} L_k) / 2``. The weights returned (for logging) are the effective loss
    multipliers ``e^{-s_k} / 2``.

    Parameterisations (the formulas of the two public codes above are the same function;
    they differ in initialisation and learning rate):

    - ``"mtan"`` (default; the MTAN code, also LibMTL): ``s_k = -0.5`` initially, updated by
      the model's optimizer at the model's learning rate (:attr:`lr` is None).
    - ``"nash_mtl"`` (the Nash-MTL and FAMO code; TorchJD's ``UW``): ``s_k = 0`` initially,
      own parameter group with learning rate 0.025 (:attr:`lr`).

    ``balancer.lr`` in the configuration overrides either learning rate. The trainer gives
    the log-variances a parameter group of their own without weight decay.

    Deviation from the paper: the paper's classification likelihood gives ``e^{-s_k} L_k``
    without the factor 1/2; like the public code, polytask uses the regression form for
    every task.

    The log-variances belong to the balancer, not to the network: one scalar
    ``nn.Parameter`` per task in :attr:`log_variances` (K values in all; the MTAN code keeps
    them inside the model). Each task's log-variance is a parameter of its own so that, in a
    step where a task has no labels, its parameter gets no gradient at all and the optimizer
    leaves it untouched (a zero entry of a shared K-vector would still be moved by Adam's
    momentum).

    Args:
        tasks: task names.
        parameterization: ``"mtan"`` or ``"nash_mtl"``.
    """

    def __init__(self, tasks: Sequence[str], parameterization: Parameterization = "mtan") -> None:
        super().__init__(tasks)
        if parameterization not in _SETTINGS:
            raise ConfigError(
                "balancer.options.parameterization: expected mtan or nash_mtl, found "
                f"{parameterization!r}."
            )
        self.parameterization: Parameterization = parameterization
        initial, self.lr = _SETTINGS[parameterization]
        self._index = {t: i for i, t in enumerate(self.task_names)}
        self.log_variances = nn.ParameterList(
            nn.Parameter(torch.full((), initial)) for _ in self.task_names
        )

    def extra_repr(self) -> str:
        return f"parameterization={self.parameterization!r}"

    def log_variance(self, task: str) -> Tensor:
        """The log-variance ``s`` of ``task`` (the parameter itself)."""
        if task not in self._index:
            raise ValueError(
                f"UncertaintyWeighting: unknown task {task!r}; the method was built for "
                f"{list(self.task_names)}."
            )
        param: Tensor = self.log_variances[self._index[task]]
        return param

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``e^{-s_k} / 2`` per task, differentiable with respect to ``s_k``."""
        return {
            t: 0.5 * torch.exp(-self.log_variance(t)).to(loss.dtype) for t, loss in losses.items()
        }

    def combine(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        weights = self.weights(losses)
        total = torch.stack(
            [
                weights[t] * loss + 0.5 * self.log_variance(t).to(loss.dtype)
                for t, loss in losses.items()
            ]
        ).sum()
        return total, {t: w.detach() for t, w in weights.items()}
