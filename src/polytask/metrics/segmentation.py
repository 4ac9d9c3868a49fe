"""Semantic segmentation: mean IoU and pixel accuracy from one confusion matrix over the split."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ._checks import check_int, check_positive_int
from .base import Metric
from .registry import METRICS

__all__ = ["SegmentationMetric"]


@METRICS.register("segmentation")
class SegmentationMetric(Metric):
    r"""Mean IoU and pixel accuracy, in percent, from a confusion matrix accumulated over the split.

    The ``C x C`` confusion matrix ``h`` counts pixels by (target class, predicted class), rows
    being targets as in :func:`sklearn.metrics.confusion_matrix`. Pixels whose target is
    outside ``[0, C)``, in particular ``ignore_index``, are dropped. Then

    * ``IoU_c = h[c, c] / (sum_j h[c, j] + sum_i h[i, c] - h[c, c])`` (intersection over union),
    * ``miou = 100 * mean_c IoU_c`` over the classes whose union is non-zero,
    * ``pixel_acc = 100 * sum_c h[c, c] / sum h``.

    A class that occurs neither in the targets nor in the predictions of the split has an
    undefined IoU (0 / 0) and is left out of the mean; when every class occurs this is the
    mean over all ``C`` classes, the definition of the MTAN reference code (since Nov 2020).
    Both values are NaN when nothing valid was added.

    Args:
        num_classes: the number of classes ``C``.
        ignore_index: the target value of unlabelled pixels; must lie outside ``[0, C)``
            (any target outside that range is dropped anyway; this names the usual one).

    ``update`` takes ``pred`` as logits ``[B, C, *spatial]`` (the class is the argmax over
    dim 1) or as integer class indices of the target's shape, and ``target`` as class
    indices ``[B, *spatial]`` (a floating target holding integral values is accepted).
    """

    def __init__(self, num_classes: int, ignore_index: int = -1) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.ignore_index = check_int("ignore_index", ignore_index)
        if 0 <= ignore_index < num_classes:
            raise ConfigError(
                f"Expected argument `ignore_index` to lie outside the classes [0, {num_classes}) "
                f"but got {ignore_index}."
            )
        self.higher_is_better = {"miou": True, "pixel_acc": True}
        self.add_state("confusion", torch.zeros(num_classes, num_classes, dtype=torch.int64), "sum")

    def _update(self, pred: Tensor, target: Tensor) -> None:
        classes = self._predicted_classes(pred, target)
        target = target.long()
        valid = (target >= 0) & (target < self.num_classes)
        classes, target = classes[valid], target[valid]
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
            raise ValueError(
                f"Expected predicted class indices in [0, {self.num_classes}) but found values "
                f"from {int(classes.min())} to {int(classes.max())}."
            )
        counts = torch.bincount(target * self.num_classes + classes, minlength=self.num_classes**2)
        self.accumulate("confusion", counts.reshape(self.num_classes, self.num_classes))

    def _predicted_classes(self, pred: Tensor, target: Tensor) -> Tensor:
        """Class indices of the target's shape, from logits or from indices."""
        if pred.dim() == target.dim() + 1:
            expected = (target.shape[0], self.num_classes, *target.shape[1:])
            if tuple(pred.shape) != expected:
                raise ValueError(
                    f"Expected logits `pred` of shape {expected} for a target of shape "
                    f"{tuple(target.shape)}, found {tuple(pred.shape)}."
                )
            return pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(
                f"Expected `pred` to be logits of shape "
                f"{(target.shape[0], self.num_classes, *target.shape[1:])} or class indices "
                f"of shape {tuple(target.shape)}, found {tuple(pred.shape)}."
            )
        if pred.is_floating_point() or pred.is_complex() or pred.dtype == torch.bool:
            raise ValueError(
                f"Expected `pred` of the target's shape to hold integer class indices, "
                f"found dtype {pred.dtype}."
            )
        return pred.long()

    def confusion_matrix(self) -> Tensor:
        """The ``C x C`` int64 confusion matrix: rows are target classes, columns predictions."""
        return self.sum_state("confusion").clone()

    def iou(self) -> Tensor:
        """Per-class IoU in percent (float64, length ``C``); NaN for a class whose union is 0."""
        confusion = self.sum_state("confusion").to(torch.float64)
        intersection = confusion.diagonal()
        union = confusion.sum(dim=1) + confusion.sum(dim=0) - intersection
        iou = torch.full_like(intersection, float("nan"))
        present = union > 0
        iou[present] = 100.0 * intersection[present] / union[present]
        return iou

    def details(self) -> dict[str, list[float | None]]:
        """``iou``: per-class IoU in percent (None where the union is empty); ``pixels``: the
        number of target pixels of each class in what was added."""
        iou = [None if v != v else float(v) for v in self.iou().tolist()]
        pixels: list[float | None] = [
            float(v) for v in self.sum_state("confusion").sum(dim=1).tolist()
        ]
        return {"iou": iou, "pixels": pixels}

    def compute(self) -> dict[str, float]:
        confusion = self.sum_state("confusion")
        total = int(confusion.sum())
        if total == 0:
            return {"miou": float("nan"), "pixel_acc": float("nan")}
        correct = int(confusion.diagonal().sum())
        return {
            "miou": float(self.iou().nanmean()),
            "pixel_acc": 100.0 * correct / total,
        }
