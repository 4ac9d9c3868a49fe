"""Classification: accuracy over the split."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Metric
from .registry import METRICS

__all__ = ["Accuracy"]


@METRICS.register("accuracy")
class Accuracy(Metric):
    r"""Top-1 accuracy in percent: ``accuracy = 100 * #{i : argmax_c pred[i, c] == target[i]} / N``.

    ``pred`` is logits ``[B, C]`` (the class is the argmax over dim 1) or integer class indices
    ``[B]``; ``target`` is class indices ``[B]``. Higher is better; NaN when nothing was added.
    """

    def __init__(self) -> None:
        super().__init__()
        self.higher_is_better = {"accuracy": True}
        self.add_state("correct", torch.zeros((), dtype=torch.int64), "sum")
        self.add_state("total", torch.zeros((), dtype=torch.int64), "sum")

    def _update(self, pred: Tensor, target: Tensor) -> None:
        if target.dim() != 1:
            raise ValueError(
                f"Expected `target` of shape [B] (class indices), found {tuple(target.shape)}."
            )
        if pred.dim() == 2 and pred.shape[0] == target.shape[0]:
            classes = pred.argmax(dim=1)
        elif pred.shape == target.shape:
            if pred.is_floating_point() or pred.is_complex() or pred.dtype == torch.bool:
                raise ValueError(
                    f"Expected `pred` of shape [B] to hold integer class indices, "
                    f"found dtype {pred.dtype}."
                )
            classes = pred
        else:
            raise ValueError(
                f"Expected `pred` to be logits of shape ({target.shape[0]}, C) or class indices "
                f"of shape ({target.shape[0]},), found {tuple(pred.shape)}."
            )
        self.accumulate("correct", (classes.long() == target.long()).sum())
        self.accumulate("total", torch.tensor(target.shape[0]))

    def compute(self) -> dict[str, float]:
        total = int(self.sum_state("total"))
        if total == 0:
            return {"accuracy": float("nan")}
        return {"accuracy": 100.0 * int(self.sum_state("correct")) / total}
