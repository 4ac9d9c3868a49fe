"""LDC-MTL: learned task weights with a penalty on the discrepancy of the weighted losses."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from ...errors import CheckpointError, ConfigError
from ..aggregation._common import check_number_option
from ..base import BALANCERS, LossWeighting

__all__ = ["LDCMTL"]

Normalization = Literal["ratio", "log", "none"]
Reference = Literal["first_step", "every_epoch"]


@BALANCERS.register("ldc_mtl")
class LDCMTL(LossWeighting):
    r"""LDC-MTL, loss discrepancy control (Xiao, Dong, Zou and Ji, "LDC-MTL: Balancing
    Multi-Task Learning through Scalable Loss Discrepancy Control", 2025,
    https://arxiv.org/abs/2502.08585; official code https://github.com/OptMN-Lab/LDC-MTL,
    the training loops ``experiments/*/trainer.py`` and the weight modules of
    ``experiments/*/models.py``).

    Bilevel formulation: the model minimises the weighted (pre-normalised) losses, the
    weights minimise the discrepancy between consecutive weighted losses; the paper's
    first-order algorithm replaces the lower level by a penalty and takes one gradient step
    of both the model and the weights on

    .. math::
        L = \frac{\sum_k \sigma_k \tilde L_k}{\mathrm{sg}(\sum_k \sigma_k)}
            + \lambda \sum_{k=1}^{K-1} \left|\sigma_k \tilde L_k
              - \sigma_{k+1} \tilde L_{k+1}\right|,
        \qquad \sigma_k = \mathrm{sigmoid}(p_k),

    one backward pass (the cost of equal weighting, whatever ``K``), with ``sg`` the stop
    gradient, ``p`` the balancer's K learnable parameters and ``tilde L`` the losses after the
    coarse pre-normalisation (``normalization``), which reads ``L^0``, the losses of the first
    training step (each task's first step with labels):

    - ``"ratio"`` (default; the official NYUv2 code): ``tilde L_k = L_k / r_k`` with
      ``r_k = L^0_k / min_j L^0_j``: every loss starts at the smallest one;
    - ``"log"`` (the official QM9 code): ``tilde L_k = log(L_k / L^0_k)``;
    - ``"none"`` (the official CelebA code): ``tilde L_k = L_k``.

    The weights and the network are trained by the same optimizer at the model's learning
    rate (all official experiments: one Adam over the model and the weights); ``balancer.lr``
    gives the weights a learning rate of their own. The task order is the configuration's
    (the penalty couples neighbours, as the paper's sum does).

    Defaults from the official code: ``penalty`` ``lambda = 0.05`` (NYUv2 and QM9; CelebA
    uses 0.01, Cityscapes 0.1), ``init`` ``p_k = 1`` (CelebA's ``ones``).

    Deviations and choices:

    - The official weight modules differ by experiment: NYUv2 computes the weights from the
      pooled task features by a linear layer, a softmax and a clamp to [0.2, 0.8] (a router
      inside the network, which a balancer, seeing no model, cannot hold); QM9 uses
      ``sigmoid(relu(p))`` with ``p`` drawn from U(0.2, 1); CelebA ``sigmoid(p)``, ``p = 1``.
      polytask uses CelebA's free weights ``sigmoid(p)`` for every setting.
    - The sum of the weights in the denominator is detached (QM9, CelebA; the NYUv2 code
      keeps its gradient).
    - The official QM9 loop re-reads ``L^0`` at the first batch of every epoch:
      ``reference="every_epoch"``; the default reads it once (NYUv2).
    - The Cityscapes loop penalises the unweighted ``|L_1 - L_2|``, which gives the weights no
      penalty gradient; not offered.
    - **Missing tasks**: a step sums over the tasks that have labels, and the penalty couples
      consecutive tasks among them. Each task has a parameter of its own, so a task without
      labels gets no gradient at all (as in ``uncertainty``).

    The weights returned for logging are the effective multipliers ``dL / dL_k`` (detached).

    Args:
        tasks: task names.
        penalty: ``lambda >= 0``, the weight of the discrepancy penalty.
        normalization: ``"ratio"``, ``"log"`` or ``"none"`` (above).
        reference: ``"first_step"`` or ``"every_epoch"``: when ``L^0`` is read.
        init: the initial ``p_k`` (weights ``sigmoid(init)``).

    State (saved in checkpoints): the parameters ``p`` (trained by the run's optimizer, whose
    moments are saved with it); the reference losses ``L^0`` and whether they are to be read
    again at the next step (extra state). Cost: one backward pass; the device is read only
    when ``L^0`` is (and, with ``normalization="log"``, once per step for the check that the
    losses are positive).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        penalty: float = 0.05,
        normalization: Normalization = "ratio",
        reference: Reference = "first_step",
        init: float = 1.0,
    ) -> None:
        super().__init__(tasks)
        self.penalty = check_number_option("penalty", penalty, low=0.0)
        if normalization not in get_args(Normalization):
            raise ConfigError(
                "balancer.options.normalization: expected ratio, log or none, found "
                f"{normalization!r}."
            )
        if reference not in get_args(Reference):
            raise ConfigError(
                "balancer.options.reference: expected first_step or every_epoch, found "
                f"{reference!r}."
            )
        self.normalization: Normalization = normalization
        self.reference: Reference = reference
        start = check_number_option("init", init, low=-30.0, high=30.0)
        self._index = {t: i for i, t in enumerate(self.task_names)}
        self.logits = nn.ParameterList(nn.Parameter(torch.full((), start)) for _ in self.task_names)
        #: ``L^0`` per task (Python floats: reading them costs no device synchronisation)
        self._references: dict[str, float] = {}
        self._reread = False

    def extra_repr(self) -> str:
        return (
            f"penalty={self.penalty:g}, normalization={self.normalization!r}, "
            f"reference={self.reference!r}"
        )

    def weight(self, task: str) -> Tensor:
        """``sigmoid(p_k)``, differentiable with respect to ``p_k``."""
        if task not in self._index:
            raise ValueError(
                f"LDCMTL: unknown task {task!r}; the method was built for {list(self.task_names)}."
            )
        return torch.sigmoid(self.logits[self._index[task]])

    def on_epoch_start(self, epoch: int) -> None:
        if self.reference == "every_epoch":
            self._reread = True

    @property
    def reference_losses(self) -> Tensor:
        """``L^0`` of each task in :attr:`task_names` order (NaN: not read yet), float64."""
        return torch.tensor(
            [self._references.get(t, math.nan) for t in self.task_names], dtype=torch.float64
        )

    def _record(self, names: Sequence[str], losses: Mapping[str, Tensor]) -> None:
        """Read ``L^0`` (the losses' means over processes) for the tasks that have none yet,
        or for all of them after a re-read; a loss that is not a positive finite number is
        not kept (the task is read again at its next step)."""
        wanted = list(names) if self._reread else [t for t in names if t not in self._references]
        self._reread = False
        if not wanted:
            return
        reduced = self.reduce_losses({t: losses[t] for t in wanted})
        values = torch.stack([reduced[t] for t in wanted]).double().tolist()  # one sync
        for t, value in zip(wanted, values, strict=True):
            if math.isfinite(value) and value > 0:
                self._references[t] = value

    def _normalized(self, names: Sequence[str], values: Tensor) -> Tensor:
        if self.normalization == "none":
            return values
        if self.normalization == "ratio":
            return values * self._ratio_scale(names, values)
        ref = torch.tensor(
            [self._references.get(t, math.nan) for t in names],
            device=values.device,
            dtype=values.dtype,
        )
        known = torch.isfinite(ref)
        if bool((values.detach() <= 0).any()):  # one synchronisation per step
            bad = [t for t, v in zip(names, values.tolist(), strict=True) if v <= 0]
            raise ConfigError(
                f"balancer.name=ldc_mtl with normalization=log takes the logarithm of the loss, "
                f"which is not positive for task(s) {bad}; use normalization=ratio or none."
            )
        return torch.log(values / torch.where(known, ref, values.detach()))

    def _ordered(self, losses: Mapping[str, Tensor]) -> list[str]:
        unknown = [t for t in losses if t not in self._index]
        if unknown:
            raise ValueError(
                f"LDCMTL: unknown task(s) {unknown}; the method was built for "
                f"{list(self.task_names)}."
            )
        return sorted(losses, key=self._index.__getitem__)

    def combine(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        names = self._ordered(losses)
        if self.normalization != "none":
            self._record(names, losses)
        values = torch.stack([losses[t] for t in names])
        sigma = torch.stack([self.weight(t) for t in names]).to(values.dtype)
        normalized = self._normalized(names, values)
        weighted = sigma * normalized
        total = weighted.sum() / sigma.detach().sum()
        if len(names) > 1 and self.penalty > 0:
            total = total + self.penalty * (weighted[:-1] - weighted[1:]).abs().sum()
        return total, self._multipliers(names, values, normalized, sigma, losses)

    def _multipliers(
        self,
        names: Sequence[str],
        values: Tensor,
        normalized: Tensor,
        sigma: Tensor,
        losses: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """``dL / dL_k``: ``dtilde_k (sigma_k / sum sigma + lambda sigma_k (s_k - s_{k-1}))``
        with ``s_k = sign(a_k - a_{k+1})`` (0 beyond the ends), ``a = sigma tilde L``."""
        with torch.no_grad():
            v, n, s = values.detach(), normalized.detach(), sigma.detach()
            if self.normalization == "log":
                slope = 1.0 / v
            elif self.normalization == "ratio":
                slope = self._ratio_scale(names, v)
            else:
                slope = torch.ones_like(v)
            signs = torch.zeros_like(v)
            a = s * n
            if len(names) > 1:
                step = torch.sign(a[:-1] - a[1:])
                signs[:-1] += step
                signs[1:] -= step
            effective = slope * (s / s.sum() + self.penalty * s * signs)
        by_task = dict(zip(names, effective, strict=True))
        return {t: by_task[t] for t in losses}

    def _ratio_scale(self, names: Sequence[str], like: Tensor) -> Tensor:
        """``1 / r_k = min_j L^0_j / L^0_k``; 1 for a task without a reference yet (its loss
        was never positive)."""
        smallest = min(self._references.values(), default=1.0)
        return torch.tensor(
            [smallest / self._references[t] if t in self._references else 1.0 for t in names],
            device=like.device,
            dtype=like.dtype,
        )

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The effective multipliers ``dL / dL_k`` at these losses (detached)."""
        names = self._ordered(losses)
        if not names:
            return {}
        detached = {t: losses[t].detach() for t in names}
        values = torch.stack([detached[t] for t in names])
        sigma = torch.stack([self.weight(t) for t in names]).detach().to(values.dtype)
        return self._multipliers(names, values, self._normalized(names, values), sigma, losses)

    def get_extra_state(self) -> dict[str, Any]:
        return {"references": dict(self._references), "reread": self._reread}

    def set_extra_state(self, state: Any) -> None:
        references = state.get("references") if isinstance(state, dict) else None
        if (
            not isinstance(state, dict)
            or not isinstance(state.get("reread"), bool)
            or not isinstance(references, dict)
            or any(t not in self._index for t in references)
        ):
            raise CheckpointError(
                "the ldc_mtl balancer state should be a dict with a boolean 'reread' and "
                f"'references' ({{task: loss}} for tasks of {list(self.task_names)}), found "
                f"{state!r}"
            )
        self._references = {str(t): float(v) for t, v in references.items()}
        self._reread = state["reread"]
