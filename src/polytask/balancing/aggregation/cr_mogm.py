"""CR-MOGM: another Gramian method's weights smoothed by an exponential moving average."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from ...registry import call_with_options
from ..base import BALANCERS, BackwardContext
from ..gradient import GradientBalancer, GramianWeighting, Level, WrapsMethod
from ._common import check_number_option, task_indices

__all__ = ["CRMOGM"]


@BALANCERS.register("cr_mogm")
class CRMOGM(WrapsMethod, GradientBalancer):
    r"""Correlation-reduced multi-objective gradient manipulation (Zhou et al., "On the
    Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022,
    https://openreview.net/forum?id=ScwfQ7hdwyP).

    A stochastic gradient-manipulation method computes its weights from the same batch as
    the gradients they multiply, which correlates the two and biases the update. CR-MOGM
    smooths the weights of a base method over steps; per step, with ``\hat w_t`` the base
    method's weights for this step's Gramian,

    .. math::
        w_t = \beta\, w_{t-1} + (1 - \beta)\, \hat w_t, \qquad d = w_t^\top J,

    so ``beta = 0`` is the base method itself. The base is any method whose update is
    ``w @ J`` with ``w`` computed from the rows (``mgda``, ``upgrad``, ``cagrad``,
    ``nash_mtl``, ``imtl_g``, ``fairgrad``, ...): option ``base`` names it and
    ``base_options`` gives its options (``level``, when given, is this method's and is passed
    on). The base runs unchanged (its own loss-based normalisations, state, learnable
    parameters and hooks included); only the weights it would apply are replaced by their
    average.

    Conventions and deviations:

    - The average starts at the first step's base weights (``w_1 = \hat w_1``), and a task
      absent from some steps (missing labels) starts its average at its first step and
      keeps it while absent; only the present tasks' weights are combined.
    - ``beta`` is constant (TorchJD's ``CRMOGMWeighting`` too, whose documentation cites the
      paper's Corollary 1 for a coefficient that grows towards 1 as the learning rate
      decays). Same update and start as ``CRMOGMWeighting(weighting, alpha=beta)``; tested
      against it.

    State (saved in checkpoints): the averaged weights (float64, K) and the base method's
    own state (a sub-module).

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``, passed to the base method; by default the
            base's own default (``imtl`` and ``aligned_mtl_ub``: ``feature``).
        base: the registered name of the base method.
        base_options: the base method's options (without ``tasks``; ``level`` only when this
            method's ``level`` is not given).
        beta: the averaging coefficient, in ``[0, 1)``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level | None = None,
        base: str = "mgda",
        base_options: Mapping[str, object] | None = None,
        beta: float = 0.9,
    ) -> None:
        beta = check_number_option("beta", beta, low=0.0)
        if beta >= 1.0:
            raise ConfigError(
                f"balancer.options.beta: expected a number in [0, 1), found {beta!r}."
            )
        if not isinstance(base, str) or base not in BALANCERS:
            known = ", ".join(sorted(BALANCERS))
            raise ConfigError(
                f"balancer.options.base: expected a registered balancing method, found "
                f"{base!r} (known: {known})."
            )
        if base_options is not None and not isinstance(base_options, Mapping):
            raise ConfigError(
                f"balancer.options.base_options: expected a mapping, found {base_options!r}."
            )
        provided: dict[str, object] = {"tasks": list(tasks)}
        if level is not None:
            provided["level"] = level
        method = call_with_options(
            BALANCERS.get(base),
            dict(base_options or {}),
            where="balancer.options.base_options",
            provided=provided,
        )
        if not isinstance(method, GramianWeighting):
            raise ConfigError(
                f"balancer.options.base: {base} does not combine the task gradients as "
                "w @ J with weights from the rows; choose one such as mgda, upgrad, cagrad, "
                "nash_mtl, imtl_g or fairgrad."
            )
        super().__init__(tasks, method.level)
        self.beta = beta
        self.base_name = base
        self.base = method
        self.needs_representation = method.needs_representation
        # the base's learnable parameters (IMTL's scales) are this method's sub-module's
        self.lr = method.lr
        self.needs_post_step_losses = method.needs_post_step_losses
        #: the averaged weights (float64, K; NaN for a task never seen)
        self.average = torch.full((len(self.task_names),), float("nan"), dtype=torch.float64)

    def extra_repr(self) -> str:
        return f"level={self.level!r}, base={self.base_name!r}, beta={self.beta}"

    def diagnostics(self) -> Mapping[str, Tensor]:
        return self.base.diagnostics()

    @property
    def wrapped(self) -> GradientBalancer:
        return self.base

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        base = self.base
        base.gramian_precision = self.gramian_precision
        base.feature_single_pass = self.feature_single_pass
        base.loss_reducer = self.loss_reducer
        # the base runs its own backward (its loss-based preparations), with this method's
        # synchronisation hook and the smoothed combination in place of its own
        base.synchronize = self.synchronize  # type: ignore[method-assign]
        base.aggregate = self.aggregate  # type: ignore[method-assign]
        try:
            return base.backward(losses, ctx)
        finally:
            del base.synchronize
            del base.aggregate

    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        index = task_indices(self.task_names, tasks)
        _, base_weights = type(self.base).aggregate(self.base, jacobian, tasks)
        new = base_weights.double()
        average = self.average.to(new.device)
        previous = average[index]
        smoothed = torch.where(previous.isnan(), new, self.beta * previous + (1 - self.beta) * new)
        average[index] = smoothed
        self.average = average
        weights = smoothed.to(jacobian.dtype)
        return weights @ jacobian, weights

    def get_extra_state(self) -> dict[str, Any]:
        return {"average": self.average.detach().cpu().clone()}

    def set_extra_state(self, state: Any) -> None:
        k = len(self.task_names)
        average = state.get("average")
        if not isinstance(average, Tensor) or average.shape != (k,):
            raise ValueError(f"balancer state 'average': expected {k} weights, found {average!r}")
        self.average = average.double().clone()
