"""Decoder heads: predictions with the shape of the input, for reconstruction tasks.

A reconstruction task (:func:`polytask.auxiliary.reconstruction`) records the shape of its
targets in ``task.extra["target_shape"]``; these heads produce it from the shared features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..options import Limit
from ..tasks import Task
from .base import HEADS

__all__ = ["ConvDecoder", "MLPDecoder", "conv_decoder_head", "decoder_head"]


def _target_shape(task: Task) -> tuple[int, ...]:
    shape = task.extra.get("target_shape")
    if not isinstance(shape, list | tuple) or not shape:
        shape = [task.output_dim]
    result = tuple(int(n) for n in shape)
    if math.prod(result) != task.output_dim:
        raise ConfigError(
            f"task {task.name!r}: target_shape {result} does not hold output_dim "
            f"{task.output_dim} values."
        )
    return result


class MLPDecoder(nn.Module):
    """Flat features ``(B, F)`` -> Linear-ReLU-Linear -> ``(B, *shape)``."""

    def __init__(self, in_features: int, shape: Sequence[int], hidden: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, math.prod(self.shape))
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x.flatten(1))
        return out.view(x.shape[0], *self.shape)


class ConvDecoder(nn.Module):
    """Feature maps ``(B, C, h, w)`` -> bilinear resize to the target's ``(H, W)`` ->
    conv3x3-ReLU -> conv1x1 to the target's channels."""

    def __init__(self, in_channels: int, shape: Sequence[int], hidden: int) -> None:
        super().__init__()
        if len(shape) != 3:
            raise ConfigError(
                f"the conv_decoder head needs an image target (channels, height, width), "
                f"found shape {tuple(shape)}; use the decoder head."
            )
        self.shape = tuple(shape)
        self.conv = nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1)
        self.pred = nn.Conv2d(hidden, self.shape[0], kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != self.shape[1:]:
            x = F.interpolate(x, size=self.shape[1:], mode="bilinear", align_corners=False)
        out: Tensor = self.pred(F.relu(self.conv(x)))
        return out


@HEADS.register("decoder", limits={"hidden": Limit(ge=1, le=16_384)})
def decoder_head(task: Task, in_features: int, hidden: int = 256) -> nn.Module:
    """A two-layer perceptron from flat features to ``task.extra["target_shape"]``."""
    return MLPDecoder(in_features, _target_shape(task), hidden)


@HEADS.register("conv_decoder", limits={"hidden": Limit(ge=1, le=4_096)})
def conv_decoder_head(task: Task, in_features: int, hidden: int = 32) -> nn.Module:
    """A convolutional decoder from feature maps to an image ``task.extra["target_shape"]``
    (``in_features``: the maps' channels)."""
    return ConvDecoder(in_features, _target_shape(task), hidden)
