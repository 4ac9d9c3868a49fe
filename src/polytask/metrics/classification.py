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

    With ``num_classes`` it also counts, per class ``c``, the samples of class ``c`` and those of
    them predicted as ``c``; :meth:`details` then gives the per-class accuracy (the recall of
    each class, ``100 * correct_c / samples_c``, as scikit-learn's ``recall_score`` with
    ``average=None``) and the sample counts, which the reports print per class. Targets must
    then lie in ``0 .. num_classes - 1``.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(
                f"Expected `num_classes` to be a positive integer, found {num_classes!r}."
            )
        self.num_classes = num_classes
        self.higher_is_better = {"accuracy": True}
        self.add_state("correct", torch.zeros((), dtype=torch.int64), "sum")
        self.add_state("total", torch.zeros((), dtype=torch.int64), "sum")
        if num_classes is not None:
            self.add_state("class_correct", torch.zeros(num_classes, dtype=torch.int64), "sum")
            self.add_state("class_total", torch.zeros(num_classes, dtype=torch.int64), "sum")

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
        hit = classes.long() == target.long()
        self.accumulate("correct", hit.sum())
        self.accumulate("total", torch.tensor(target.shape[0]))
        if self.num_classes is not None:
            target = target.long()
            if int(target.min()) < 0 or int(target.max()) >= self.num_classes:
                raise ValueError(
                    f"Expected class indices in 0 .. {self.num_classes - 1}, found "
                    f"{int(target.min())} .. {int(target.max())}."
                )
            counts = torch.bincount(target, minlength=self.num_classes)
            self.accumulate("class_total", counts)
            self.accumulate(
                "class_correct", torch.bincount(target[hit], minlength=self.num_classes)
            )

    def details(self) -> dict[str, list[float | None]]:
        """With ``num_classes``: ``class_accuracy``, the accuracy on each class's samples in
        percent (None for a class with none), and ``samples``, their number; else nothing."""
        if self.num_classes is None:
            return {}
        total = self.sum_state("class_total").tolist()
        correct = self.sum_state("class_correct").tolist()
        return {
            "class_accuracy": [
                100.0 * c / n if n else None for c, n in zip(correct, total, strict=True)
            ],
            "samples": [float(n) for n in total],
        }

    def compute(self) -> dict[str, float]:
        total = int(self.sum_state("total"))
        if total == 0:
            return {"accuracy": float("nan")}
        return {"accuracy": 100.0 * int(self.sum_state("correct")) / total}
