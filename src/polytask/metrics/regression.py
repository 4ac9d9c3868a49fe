"""Regression: mean absolute error and root mean squared error over all elements."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Metric
from .registry import METRICS

__all__ = ["RegressionMetric"]


@METRICS.register("regression")
class RegressionMetric(Metric):
    r"""Mean absolute and root mean squared error over every element of the split.

    Over all ``N`` elements ``p_i`` of the predictions and ``y_i`` of the targets:
    ``mae = (1/N) sum |p_i - y_i|`` and ``rmse = sqrt((1/N) sum (p_i - y_i)^2)``, in the
    unit of the target; lower is better for both, NaN when nothing was added.

    ``pred`` and ``target`` have the same shape ``[B, ...]``, except that a trailing dimension
    of size 1 on one side only is squeezed (``[B, 1]`` against ``[B]``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.higher_is_better = {"mae": False, "rmse": False}
        self.add_state("abs_sum", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("sq_sum", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("count", torch.zeros((), dtype=torch.int64), "sum")

    def _update(self, pred: Tensor, target: Tensor) -> None:
        if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
            pred = pred.squeeze(-1)
        elif target.dim() == pred.dim() + 1 and target.shape[-1] == 1:
            target = target.squeeze(-1)
        if pred.shape != target.shape:
            raise ValueError(
                f"Expected `pred` and `target` of the same shape, found pred "
                f"{tuple(pred.shape)} and target {tuple(target.shape)}."
            )
        error = pred.to(torch.float64) - target.to(torch.float64)
        self.accumulate("abs_sum", error.abs().sum())
        self.accumulate("sq_sum", error.square().sum())
        self.accumulate("count", torch.tensor(error.numel()))

    def compute(self) -> dict[str, float]:
        count = int(self.sum_state("count"))
        if count == 0:
            return {"mae": float("nan"), "rmse": float("nan")}
        return {
            "mae": float(self.sum_state("abs_sum")) / count,
            "rmse": math.sqrt(float(self.sum_state("sq_sum")) / count),
        }
