"""Depth estimation: absolute and relative error over the valid pixels."""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import Tensor

from ._checks import check_choice
from .base import Metric
from .registry import METRICS

__all__ = ["PROTOCOLS", "DepthMetric", "MetricProtocol"]

MetricProtocol = Literal["dataset", "per_batch"]
"""How pixel metrics are averaged: over the whole split, or per ``update`` call then over calls."""

PROTOCOLS: tuple[MetricProtocol, ...] = ("dataset", "per_batch")


def _as_maps(pred: Tensor, target: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """``pred`` and ``target`` as ``[B, H, W]`` maps, from ``[B, 1, H, W]`` or ``[B, H, W]``."""

    def squeeze(x: Tensor) -> Tensor:
        return x[:, 0] if x.dim() == 4 and x.shape[1] == 1 else x

    p, g = squeeze(pred), squeeze(target)
    if g.dim() != 3 or p.shape != g.shape:
        raise ValueError(
            f"Expected {what} `pred` and `target` of the same shape [B, 1, H, W] or [B, H, W], "
            f"found pred {tuple(pred.shape)} and target {tuple(target.shape)}."
        )
    return p, g


@METRICS.register("depth")
class DepthMetric(Metric):
    r"""Absolute and relative depth error over the valid pixels (``target != 0``).

    With ``V`` the valid pixels, prediction ``p`` and ground truth ``g``:

    * ``abs_err = mean_V |p - g|`` (in the unit of the depth, e.g. metres),
    * ``rel_err = mean_V |p - g| / g``;

    lower is better for both.

    Args:
        protocol: ``"dataset"`` (default) averages over every valid pixel of the split, exactly.
            ``"per_batch"`` is the protocol of the MTAN reference code and the papers that
            reuse it: each ``update`` call computes its batch's means over the batch's valid
            pixels, and ``compute`` returns the mean of these over the ``update`` calls
            (batches without a valid pixel are skipped). Its values depend on the batch size.

    ``pred`` and ``target`` are ``[B, 1, H, W]`` or ``[B, H, W]``. Values are NaN when no valid
    pixel was added.
    """

    def __init__(self, protocol: MetricProtocol = "dataset") -> None:
        super().__init__()
        self.protocol = cast(MetricProtocol, check_choice("protocol", protocol, PROTOCOLS))
        self.higher_is_better = {"abs_err": False, "rel_err": False}
        zero = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.int64)
        # The protocols have different state names, so that merging one into the other fails.
        if self.protocol == "dataset":
            self.add_state("abs_sum", zero, "sum")
            self.add_state("rel_sum", zero, "sum")
            self.add_state("pixels", count, "sum")
        else:
            self.add_state("batch_abs_sum", zero, "sum")
            self.add_state("batch_rel_sum", zero, "sum")
            self.add_state("batches", count, "sum")

    def _update(self, pred: Tensor, target: Tensor) -> None:
        p, g = _as_maps(pred, target, "depth")
        valid = g != 0
        p, g = p[valid].to(torch.float64), g[valid].to(torch.float64)
        if g.numel() == 0:
            return
        abs_err = (p - g).abs()
        rel_err = abs_err / g
        if self.protocol == "dataset":
            self.accumulate("abs_sum", abs_err.sum())
            self.accumulate("rel_sum", rel_err.sum())
            self.accumulate("pixels", torch.tensor(g.numel()))
        else:
            self.accumulate("batch_abs_sum", abs_err.mean())
            self.accumulate("batch_rel_sum", rel_err.mean())
            self.accumulate("batches", torch.tensor(1))

    def compute(self) -> dict[str, float]:
        if self.protocol == "dataset":
            abs_sum, rel_sum, n = "abs_sum", "rel_sum", "pixels"
        else:
            abs_sum, rel_sum, n = "batch_abs_sum", "batch_rel_sum", "batches"
        count = int(self.sum_state(n))
        if count == 0:
            return {"abs_err": float("nan"), "rel_err": float("nan")}
        return {
            "abs_err": float(self.sum_state(abs_sum)) / count,
            "rel_err": float(self.sum_state(rel_sum)) / count,
        }
