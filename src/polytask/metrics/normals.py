"""Surface normal estimation: angular error statistics over the valid pixels."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_bool, check_choice
from .base import Metric
from .depth import PROTOCOLS, MetricProtocol
from .registry import METRICS

__all__ = ["THRESHOLDS", "NormalMetric", "median"]

THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
"""Angles (degrees) for the ``within_*`` values, as in the papers' tables."""

_WITHIN = tuple(f"within_{t:g}" for t in THRESHOLDS)
_VALUES = ("mean", "median", *_WITHIN)


def median(values: Tensor) -> Tensor:
    """The median in numpy's convention: the mean of the two middle values for an even count."""
    n = values.numel()
    flat = values.reshape(-1)
    upper = flat.kthvalue(n // 2 + 1).values
    if n % 2:
        return upper
    return (flat.kthvalue(n // 2).values + upper) / 2


@METRICS.register("normals")
class NormalMetric(Metric):
    r"""Angular error of predicted surface normals, in degrees, over the valid pixels.

    A pixel is valid when the sum of its target channels is non-zero (exactly the reference's
    test; an all-zero target marks a missing normal). With ``p`` the prediction, L2-normalised
    over the channels when ``normalize`` is true, and ``g`` the target,
    ``angle = degrees(acos(clamp(<p, g>, -1, 1)))``. The values are

    * ``mean`` and ``median`` of the angle (degrees, lower is better),
    * ``within_11.25``, ``within_22.5``, ``within_30``: the percentage of valid pixels whose
      angle is strictly below the threshold (higher is better).

    Args:
        protocol: ``"dataset"`` (default) computes every value over all valid pixels of the
            split, exactly: the angles are kept (float64, 8 bytes per valid pixel) so the
            median is the true median. ``"per_batch"`` is the protocol of the MTAN reference
            code: each ``update`` call computes its batch's mean, median and percentages,
            and ``compute`` returns their means over the ``update`` calls (batches without a
            valid pixel are skipped), so its ``median`` is a mean of batch medians.
        normalize: L2-normalise the prediction over the channels (``p / max(||p||, 1e-12)``).
            Set it to false when the head already outputs unit vectors and the reference's
            exact arithmetic is wanted.

    Medians follow numpy's convention (the mean of the two middle values for an even count).
    ``pred`` and ``target`` are ``[B, 3, H, W]``. Values are NaN when no valid pixel was added.
    """

    def __init__(self, protocol: MetricProtocol = "dataset", normalize: bool = True) -> None:
        super().__init__()
        self.protocol = cast(MetricProtocol, check_choice("protocol", protocol, PROTOCOLS))
        self.normalize = check_bool("normalize", normalize)
        self.higher_is_better = {name: name.startswith("within_") for name in _VALUES}
        # The protocols have different state names, so that merging one into the other fails.
        if self.protocol == "dataset":
            self.add_state("angles", torch.zeros((), dtype=torch.float64), "cat")
        else:
            for name in _VALUES:
                self.add_state(f"batch_{name}_sum", torch.zeros((), dtype=torch.float64), "sum")
            self.add_state("batches", torch.zeros((), dtype=torch.int64), "sum")

    def _update(self, pred: Tensor, target: Tensor) -> None:
        if target.dim() != 4 or target.shape[1] != 3 or pred.shape != target.shape:
            raise ValueError(
                "Expected normals `pred` and `target` of the same shape [B, 3, H, W], "
                f"found pred {tuple(pred.shape)} and target {tuple(target.shape)}."
            )
        angles = self.angles(pred, target)
        if self.protocol == "dataset":
            self.accumulate("angles", angles)
        elif angles.numel():
            for name, value in self._values(angles).items():
                self.accumulate(f"batch_{name}_sum", value)
            self.accumulate("batches", torch.tensor(1))

    def angles(self, pred: Tensor, target: Tensor) -> Tensor:
        """The angles (degrees, float64) between prediction and target at the valid pixels."""
        valid = target.sum(dim=1) != 0
        p = pred.to(torch.float64)
        if self.normalize:
            p = F.normalize(p, p=2.0, dim=1, eps=1e-12)
        cosine = (p * target.to(torch.float64)).sum(dim=1)[valid]
        return torch.rad2deg(torch.acos(cosine.clamp(-1.0, 1.0)))

    @staticmethod
    def _values(angles: Tensor) -> dict[str, Tensor]:
        values = {"mean": angles.mean(), "median": median(angles)}
        for name, threshold in zip(_WITHIN, THRESHOLDS, strict=True):
            values[name] = 100.0 * (angles < threshold).to(torch.float64).mean()
        return values

    def compute(self) -> dict[str, float]:
        if self.protocol == "dataset":
            angles = self.cat_state("angles")
            if angles.numel() == 0:
                return dict.fromkeys(_VALUES, float("nan"))
            return {name: float(value) for name, value in self._values(angles).items()}
        batches = int(self.sum_state("batches"))
        if batches == 0:
            return dict.fromkeys(_VALUES, float("nan"))
        return {name: float(self.sum_state(f"batch_{name}_sum")) / batches for name in _VALUES}
