"""Task losses that honour per-sample label masks and per-element validity.

Every loss has the signature ``loss(pred, target, mask) -> Tensor`` where ``mask`` is an
optional boolean tensor of shape ``(B,)`` saying which samples carry a label for the task.
The loss is the mean over the *valid, labelled* elements of the whole batch (as in the
reference code for NYUv2), and exactly zero, with zero gradient, when the batch has none:
a batch without labels for a task contributes nothing to it. No loss synchronises with the
device (no ``.item()``, no ``nonzero``), so they are safe on the GPU hot path.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

__all__ = [
    "LOSSES",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "DepthL1Loss",
    "L1Loss",
    "Loss",
    "MSELoss",
    "NormalCosineLoss",
]


class Loss(Protocol):
    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor: ...


LOSSES: Registry[type[Loss]] = Registry("loss")


def _sample_weight(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """The per-sample mask as a float tensor broadcastable against ``like``."""
    if mask is None:
        return None
    if mask.dim() != 1 or mask.shape[0] != like.shape[0]:
        raise ValueError(
            f"Expected a per-sample mask of shape ({like.shape[0]},), found {tuple(mask.shape)}."
        )
    return mask.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Sum of ``values * valid`` over the count of valid entries (0 if there are none)."""
    total = (values * valid).sum()
    return total / valid.sum().clamp_min(1.0)


@LOSSES.register("cross_entropy")
class CrossEntropyLoss:
    """Cross-entropy on logits ``(B, C, ...)`` against class indices ``(B, ...)``.

    Elements whose target equals ``ignore_index`` (the NYUv2 void label is -1) are skipped;
    the result is the mean over the remaining elements of the batch.
    """

    def __init__(self, ignore_index: int = -1) -> None:
        self.ignore_index = ignore_index

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        target = target.long()
        valid = (target != self.ignore_index).to(pred.dtype)
        weight = _sample_weight(mask, valid)
        if weight is not None:
            valid = valid * weight
        safe_target = torch.where(target == self.ignore_index, 0, target)
        per_element = F.cross_entropy(pred, safe_target, reduction="none")
        return _masked_mean(per_element, valid)


@LOSSES.register("depth_l1")
class DepthL1Loss:
    """L1 over valid depth pixels (target != 0), divided by their number (NYUv2 reference)."""

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        valid = (target != 0).to(pred.dtype)
        weight = _sample_weight(mask, valid)
        if weight is not None:
            valid = valid * weight
        return _masked_mean((pred - target).abs(), valid)


@LOSSES.register("normal_cosine")
class NormalCosineLoss:
    """1 - mean cosine over valid pixels (sum of target channels != 0); pred is unit length."""

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        valid = (target.sum(dim=1, keepdim=True) != 0).to(pred.dtype)
        weight = _sample_weight(mask, valid)
        if weight is not None:
            valid = valid * weight
        cosine = (pred * target).sum(dim=1, keepdim=True)
        total = (cosine * valid).sum()
        count = valid.sum()
        # 1 - mean cosine, and exactly 0 when nothing is labelled.
        return (count - total) / count.clamp_min(1.0)


class _ElementwiseLoss(ABC):
    @abstractmethod
    def _elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        """The loss of every element (same shape as ``pred``)."""

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        target = target.to(pred.dtype)
        if pred.shape != target.shape and pred.numel() == target.numel():
            target = target.reshape(pred.shape)
        values = self._elementwise(pred, target)
        weight = _sample_weight(mask, values)
        if weight is None:
            return values.mean()
        return _masked_mean(values, weight.expand_as(values))


@LOSSES.register("mse")
class MSELoss(_ElementwiseLoss):
    """Mean squared error over the labelled samples' elements."""

    def _elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).square()


@LOSSES.register("l1")
class L1Loss(_ElementwiseLoss):
    """Mean absolute error over the labelled samples' elements."""

    def _elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs()


@LOSSES.register("bce_with_logits")
class BCEWithLogitsLoss(_ElementwiseLoss):
    """Binary cross-entropy on logits, for binary or multi-label targets in {0, 1}.

    Args:
        pos_weight: optional weight of the positive term of every label (the last dimension
            of ``pred``), as :func:`torch.nn.functional.binary_cross_entropy_with_logits`
            applies it: ``-(w y log s(x) + (1 - y) log(1 - s(x)))``. ``n_negative /
            n_positive`` of the training split balances a rare label's two kinds of error
            (see :func:`polytask.tasks.label_tasks`). Each weight must be finite and positive.
    """

    def __init__(self, pos_weight: Sequence[float] | None = None) -> None:
        if pos_weight is not None:
            weights = [float(w) for w in pos_weight]
            if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(
                    f"Expected `pos_weight` to be a non-empty list of finite positive numbers, "
                    f"found {list(pos_weight)!r}."
                )
            self.pos_weight: tuple[float, ...] | None = tuple(weights)
        else:
            self.pos_weight = None
        self._cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def _weight(self, like: Tensor) -> Tensor | None:
        if self.pos_weight is None:
            return None
        if like.shape[-1] != len(self.pos_weight):
            raise ValueError(
                f"Expected predictions with {len(self.pos_weight)} labels in the last dimension "
                f"(one per `pos_weight`), found shape {tuple(like.shape)}."
            )
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.pos_weight, dtype=like.dtype, device=like.device)
        return self._cache[key]

    def _elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            pred, target, reduction="none", pos_weight=self._weight(pred)
        )

    def __repr__(self) -> str:
        if self.pos_weight is None:
            return "BCEWithLogitsLoss()"
        return f"BCEWithLogitsLoss(pos_weight={list(self.pos_weight)})"
