"""Small backbones for CPU-sized experiments: a compact CNN and an MLP."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ...errors import ConfigError
from ..base import BACKBONES

__all__ = ["MLP", "SmallCNN"]


@BACKBONES.register("small_cnn")
class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks with 2x2 max-pooling, then global average pooling and a linear layer.

    Args:
        input_shape: ``(channels, height, width)`` of one sample.
        channels: output channels of each conv block; a pooling follows every block but the last.
        out_features: size of the feature vector the heads read.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        channels: Sequence[int] = (32, 64, 64),
        out_features: int = 128,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(
                f"small_cnn expects image inputs (channels, height, width), found {tuple(input_shape)}."
            )
        if not channels or any(c < 1 for c in channels) or out_features < 1:
            raise ConfigError("small_cnn needs positive `channels` and `out_features`.")
        layers: list[nn.Module] = []
        in_channels = input_shape[0]
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            in_channels = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, out_features)]
        layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


@BACKBONES.register("mlp")
class MLP(nn.Module):
    """Fully connected layers with ReLU for vector inputs (any input shape is flattened)."""

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not hidden or any(h < 1 for h in hidden):
            raise ConfigError(f"mlp needs positive `hidden` sizes, found {list(hidden)}.")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"Expected `dropout` in [0, 1) but got {dropout}.")
        in_features = 1
        for d in input_shape:
            in_features *= d
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(in_features, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_features = h
        self.net = nn.Sequential(*layers)
        self.out_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out
