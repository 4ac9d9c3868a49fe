"""Small backbones for CPU-sized experiments: a compact CNN and an MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ...options import CHANNELS, WIDTH, Limit, dense_parameters, parameters_budget
from ..base import BACKBONES
from .staged import StageOutput, StageSpec

__all__ = ["MLP", "SmallCNN"]


def _conv_parameters(channels: Sequence[int], kernels: Sequence[int] | int = 3) -> int:
    """Weights of a chain of convolutions from 3 input channels (an estimate for limits)."""
    sizes = [3, *channels]
    ks = [kernels] * len(channels) if isinstance(kernels, int) else list(kernels)
    return sum(k * k * a * b for a, b, k in zip(sizes, sizes[1:], ks, strict=False))


@BACKBONES.register(
    "small_cnn",
    limits={"channels": CHANNELS, "out_features": WIDTH},
    budgets=[
        parameters_budget(
            lambda o: _conv_parameters(o["channels"]) + o["channels"][-1] * o["out_features"],
            "channels",
            "out_features",
        )
    ],
)
class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks with 2x2 max-pooling, then global average pooling and a linear layer.

    Implements :class:`~polytask.models.backbones.staged.StagedBackbone` (encoder only), so
    cross-stitch, sluice and MTAN can wrap it, with ``len(channels) + 1`` encoder stages:

    - stage ``j < len(channels)``: conv block ``j`` (one layer: its first output is its last),
      followed by 2x2 max-pooling, or by global average pooling to ``(N, C, 1, 1)`` after
      the last block;
    - the last stage: the linear layer and its ReLU, computed on the pooled ``(N, C, 1, 1)``
      map and returned as an ``(N, out_features, 1, 1)`` map, so that wrapping schemes that
      act on feature maps (MTAN's 1x1-convolution attention) act on it too; its
      "downsampling" flattens it into the ``(N, out_features)`` features the heads read.

    Running the stages computes exactly :meth:`forward`; the modules, their names and the
    parameters are those of the plain network. Its global average pooling discards where
    things are, which tasks about positions need (use ``lenet`` for MultiMNIST); under MTAN
    the 1x1 last stage has the consequences described in :mod:`.lenet`.

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
        specs: list[StageSpec] = []
        blocks: list[tuple[int, int]] = []
        for i, c in enumerate(channels):
            blocks.append((len(layers), len(layers) + 3))
            layers += [nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            specs.append(StageSpec(in_channels, c, c))
            in_channels = c
        specs.append(StageSpec(in_channels, out_features, out_features))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, out_features)]
        layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.out_features = out_features
        self._blocks = tuple(blocks)
        self._encoder_specs = tuple(specs)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out

    @property
    def encoder_stages(self) -> Sequence[StageSpec]:
        return self._encoder_specs

    @property
    def decoder_stages(self) -> Sequence[StageSpec]:
        return ()

    def encode(self, stage: int, x: Tensor) -> StageOutput:
        if stage < len(self._blocks):
            start, stop = self._blocks[stage]
            for k in range(start, stop):
                x = self.net[k](x)
        else:
            linear, relu = self.net[-2], self.net[-1]
            x = relu(linear(x.flatten(1)))[:, :, None, None]
        return StageOutput(x, x)

    def downsample(self, stage: int, x: Tensor) -> tuple[Tensor, object]:
        last_block = len(self._blocks) - 1
        if stage < last_block:
            return F.max_pool2d(x, 2), None
        if stage == last_block:
            return F.adaptive_avg_pool2d(x, 1), None
        return x.flatten(1), None

    def upsample(self, stage: int, x: Tensor, states: Sequence[object]) -> Tensor:
        raise IndexError(f"small_cnn has no decoder stage {stage}.")

    def decode(self, stage: int, x: Tensor) -> StageOutput:
        raise IndexError(f"small_cnn has no decoder stage {stage}.")


@BACKBONES.register(
    "mlp",
    limits={"hidden": WIDTH, "dropout": Limit(ge=0, lt=1)},
    budgets=[parameters_budget(lambda o: dense_parameters(o["hidden"]), "hidden")],
)
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
