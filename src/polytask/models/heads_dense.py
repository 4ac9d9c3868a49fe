"""Heads for dense (per-pixel) prediction from feature maps."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import Task
from .backbones.segnet import xavier_init_
from .base import HEADS

__all__ = ["SegNetHead", "segnet_head"]


class SegNetHead(nn.Module):
    """conv3x3 (same width) then conv1x1 to the outputs, with no BN or ReLU between.

    The head of the MTAN reference's SegNet models (Liu et al., CVPR 2019). With
    ``normalize`` the output is L2-normalised over channels (the reference does this for
    surface normals). Segmentation outputs are logits: the reference's log-softmax is left
    to the loss, which applies it (:class:`~polytask.losses.CrossEntropyLoss`).
    """

    def __init__(self, in_channels: int, out_channels: int, *, normalize: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.pred = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.normalize = normalize
        xavier_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.pred(self.conv(x))
        return F.normalize(out, p=2.0, dim=1) if self.normalize else out


@HEADS.register("segnet")
def segnet_head(task: Task, in_channels: int) -> nn.Module:
    """The reference SegNet head to ``task.output_dim`` channels, unit-length for normals."""
    return SegNetHead(in_channels, task.output_dim, normalize=task.kind == "normals")
