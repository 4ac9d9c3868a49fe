"""The three NYUv2 tasks of the MTAN paper and its successors (REFERENCE section 1)."""

from __future__ import annotations

from ..losses import CrossEntropyLoss, DepthL1Loss, NormalCosineLoss
from ..metrics.depth import DepthMetric, MetricProtocol
from ..metrics.normals import NormalMetric
from ..metrics.segmentation import SegmentationMetric
from ..tasks import Task

__all__ = ["nyuv2_tasks"]


def nyuv2_tasks(num_classes: int = 13, protocol: MetricProtocol = "dataset") -> dict[str, Task]:
    """``semantic`` (cross-entropy, -1 ignored; mIoU, pixel accuracy), ``depth`` (L1 over valid
    pixels; abs / rel error) and ``normal`` (1 - cosine; angle statistics).

    ``protocol`` picks exact whole-split depth and normal metrics (``"dataset"``) or the
    reference's per-batch averages (``"per_batch"``).
    """
    return {
        "semantic": Task(
            name="semantic",
            loss=CrossEntropyLoss(ignore_index=-1),
            metrics={"seg": lambda: SegmentationMetric(num_classes)},
            output_dim=num_classes,
            kind="segmentation",
        ),
        "depth": Task(
            name="depth",
            loss=DepthL1Loss(),
            metrics={"depth": lambda: DepthMetric(protocol)},
            output_dim=1,
            kind="depth",
        ),
        "normal": Task(
            name="normal",
            loss=NormalCosineLoss(),
            metrics={"normal": lambda: NormalMetric(protocol)},
            output_dim=3,
            kind="normals",
        ),
    }
