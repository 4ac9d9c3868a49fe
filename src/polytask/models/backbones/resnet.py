"""A small ResNet for image classification (He, Zhang, Ren and Sun, "Deep Residual Learning
for Image Recognition", CVPR 2016, https://arxiv.org/abs/1512.03385).

The CIFAR-style network of the paper (section 4.2): a conv3x3-BN-ReLU stem, then stages of
basic residual blocks, the first block of every stage after the first halving the resolution
(stride 2), then global average pooling. A basic block computes::

    y = ReLU( BN(conv3x3(ReLU(BN(conv3x3_s(x))))) + P(x) )

where ``conv3x3_s`` has the block's stride and the shortcut ``P`` is the identity, or a
strided 1x1 convolution followed by BN where the width or resolution changes (the paper's
option B; its CIFAR networks use option A, zero-padded identity shortcuts, instead). With the
default widths (16, 32, 64) and ``n`` blocks per stage this is the paper's ResNet-(6n+2)
up to the shortcuts (``n = 3``: ResNet-20). Convolutions use He (fan-out) initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ...options import CHANNELS, DEPTH, WIDTH, parameters_budget
from ..base import BACKBONES

__all__ = ["BasicBlock", "ResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BN and a residual shortcut (see the module documentation)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _resnet_parameters(options: Mapping[str, Any]) -> int:
    """Weights of the 3x3 convolutions of every stage's blocks, and the linear layer."""
    widths = list(options["channels"])
    blocks = int(options["blocks_per_stage"])
    convs = sum(
        9 * w * w * 2 * blocks + 9 * p * w for p, w in zip([3, *widths], widths, strict=False)
    )
    out = options.get("out_features")
    return int(convs + (widths[-1] * int(out) if out else 0))


@BACKBONES.register(
    "resnet",
    limits={"channels": CHANNELS, "blocks_per_stage": DEPTH, "out_features": WIDTH},
    budgets=[parameters_budget(_resnet_parameters, "channels", "blocks_per_stage", "out_features")],
)
class ResNet(nn.Module):
    """Stem, residual stages and global average pooling: features of size ``out_features``.

    Args:
        input_shape: ``(channels, height, width)`` of one sample.
        channels: the width of each stage (the stem has the first stage's width); every stage
            after the first starts with a stride-2 block.
        blocks_per_stage: basic blocks in each stage.
        out_features: if given, a linear layer and a ReLU map the pooled features to this
            size; otherwise the features are the last stage's ``channels[-1]`` pooled values.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        channels: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
        out_features: int | None = None,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(
                f"resnet expects image inputs (channels, height, width), found {tuple(input_shape)}."
            )
        if isinstance(channels, str) or not channels or not all(_positive(c) for c in channels):
            raise ConfigError(
                f"resnet: expected option `channels` to be a non-empty list of positive "
                f"integers, found {channels!r}."
            )
        if not _positive(blocks_per_stage):
            raise ConfigError(
                f"resnet: expected option `blocks_per_stage` to be a positive integer, "
                f"found {blocks_per_stage!r}."
            )
        if out_features is not None and not _positive(out_features):
            raise ConfigError(
                f"resnet: expected option `out_features` to be a positive integer or null, "
                f"found {out_features!r}."
            )
        widths = list(channels)
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        previous = widths[0]
        for i, width in enumerate(widths):
            blocks = [BasicBlock(previous, width, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.projection: nn.Module = nn.Identity()
        if out_features is not None:
            self.projection = nn.Sequential(nn.Linear(previous, out_features), nn.ReLU())
        self.out_features = previous if out_features is None else out_features
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.projection(self.pool(self.stages(self.stem(x))))
        return out
