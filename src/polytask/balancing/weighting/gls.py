"""Geometric Loss Strategy (GLS): the geometric mean of the task losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS, LossWeighting

__all__ = ["GLS"]


@BALANCERS.register("gls")
class GLS(LossWeighting):
    r"""Geometric Loss Strategy (Chennupati, Sistu, Yogamani and Rawashdeh, "MultiNet++:
    Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning",
    CVPR Workshops 2019, https://arxiv.org/abs/1904.08492).

    The total loss is the geometric mean of the ``n`` losses of the batch,

    .. math::
        G = \Big(\prod_k L_k\Big)^{1/n} = \exp\Big(\frac{1}{n} \sum_k \log L_k\Big),

    computed in log space so that it neither under- nor overflows for tiny or huge losses.
    As a loss weighting its weights are the derivatives ``dG/dL_k = G / (n L_k)``, evaluated
    (detached) as ``exp(mean_i log L_i - log L_k) / n``; the backward pass of
    ``sum_k w_k L_k`` is then exactly the gradient of ``G`` (chain rule), while the returned
    weights show how strongly each task is pulled. The weights do not sum to a constant.

    Missing tasks: ``n`` is the number of tasks present in the batch, i.e. the geometric mean
    of the losses the batch has.

    Zero losses: if some ``L_j = 0`` then ``G = 0`` and ``dG/dL_k = 0`` for every other task;
    ``dG/dL_j`` itself is undefined (infinite for ``n > 1``). polytask gives every task weight 0
    in such a step (no gradient from the balancer) instead of NaN or infinity. Negative losses
    have no geometric mean: they raise a :class:`~polytask.errors.ConfigError`. That check
    reads one boolean from the device per step; the trainer has already synchronised on the
    same losses (its finiteness check), so it costs no stall there.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self._index = {t: i for i, t in enumerate(self.task_names)}

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        unknown = [t for t in losses if t not in self._index]
        if unknown:
            raise ValueError(
                f"GLS: unknown task(s) {unknown}; the method was built for {list(self.task_names)}."
            )
        if not losses:
            return {}
        # in the order of `tasks`, so that the order of `losses` cannot change a rounding
        names = sorted(losses, key=self._index.__getitem__)
        values = torch.stack([losses[t].detach() for t in names])
        if bool((values < 0).any()):  # see the class docstring: one synchronisation per step
            negative = [t for t, v in zip(names, values.tolist(), strict=True) if v < 0]
            raise ConfigError(
                f"balancer.name=gls needs non-negative losses; task(s) {negative} have a "
                "negative loss. Use another balancing method or a non-negative loss."
            )
        logs = torch.log(values)
        w = torch.exp(logs.mean() - logs) / len(names)
        w = torch.where(values > 0, w, torch.zeros_like(w))
        weights = dict(zip(names, w, strict=True))
        return {t: weights[t] for t in losses}
