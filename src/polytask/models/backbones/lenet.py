"""LeNet: the shared network of the MultiMNIST experiments of Sener and Koltun (2018,
https://arxiv.org/abs/1810.04650) and Pareto MTL (Lin et al., 2019,
https://arxiv.org/abs/1912.12854).

Two convolutions, each followed by a ReLU and 2x2 max-pooling, then a linear layer with a
ReLU over the flattened map. The defaults are the Pareto MTL code's network for 36x36
inputs: 10 filters of 9x9, 20 filters of 5x5, 50 features (30,890 parameters for one input
channel; Sener and Koltun's has 5x5 filters in both layers, dropout, and pools before the
ReLU, which is the same function without dropout). The flattened map keeps *where* things
are, which the two-item tasks need (a global average pooling would mix the left and right
items).

Implements :class:`~polytask.models.backbones.staged.StagedBackbone` (encoder only), so
cross-stitch, sluice and MTAN can wrap it: one stage per convolution (its ReLU included;
one layer, so its first output is its last), each followed by 2x2 max-pooling, and a last
stage, the linear layer and its ReLU, computed on the pooled map and returned as an
``(N, out_features, 1, 1)`` map (so that schemes acting on feature maps, such as MTAN's
1x1-convolution attention, act on it too) whose "downsampling" flattens it into the
``(N, out_features)`` features the heads read. The cross-stitch paper's placement (after
pool1, pool2 and the fully connected layers) is then the ``pool`` placement.

Under MTAN two consequences of the 1x1 last stage: the shared 3x3 convolution that follows
its attention sees a 1x1 map, so only its centre taps act (the others count as parameters
but never get a gradient), and the batch normalisation of its attention needs training
batches of at least two samples (``data.drop_last: true`` if the last batch may hold one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ...options import CHANNELS, WIDTH, Limit, parameters_budget
from ..base import BACKBONES
from .staged import StageOutput, StageSpec

__all__ = ["LeNet"]


def _lenet_parameters(options: Mapping[str, Any]) -> int:
    """Weights of the convolutions and of a linear layer over at least a 1x1 map."""
    channels, kernels = list(options["channels"]), list(options["kernels"])
    sizes = [3, *channels]
    convs = sum(k * k * a * b for a, b, k in zip(sizes, sizes[1:], kernels, strict=False))
    return int(convs + channels[-1] * int(options["out_features"]))


@BACKBONES.register(
    "lenet",
    limits={"channels": CHANNELS, "kernels": Limit(ge=1, le=64), "out_features": WIDTH},
    budgets=[parameters_budget(_lenet_parameters, "channels", "kernels", "out_features")],
)
class LeNet(nn.Module):
    """conv-ReLU-pool blocks, then a linear layer with ReLU over the flattened map.

    Args:
        input_shape: ``(channels, height, width)`` of one sample.
        channels: output channels of each convolution.
        kernels: kernel size of each convolution (no padding), as many as ``channels``.
        out_features: size of the feature vector the heads read.

    Raises:
        ConfigError: the options are not positive, or the images are too small for the
            convolutions and poolings (each needs a map of at least its kernel size, then 2).
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        channels: Sequence[int] = (10, 20),
        kernels: Sequence[int] = (9, 5),
        out_features: int = 50,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(
                f"lenet expects image inputs (channels, height, width), found {tuple(input_shape)}."
            )
        channels, kernels = list(channels), list(kernels)
        if not channels or len(kernels) != len(channels):
            raise ConfigError(
                f"lenet needs as many `kernels` as `channels` (at least one), found "
                f"{len(kernels)} and {len(channels)}."
            )
        if any(c < 1 for c in channels) or any(k < 1 for k in kernels) or out_features < 1:
            raise ConfigError(
                f"lenet needs positive `channels`, `kernels` and `out_features`, found "
                f"{channels}, {kernels} and {out_features}."
            )
        height, width = int(input_shape[1]), int(input_shape[2])
        in_channels = int(input_shape[0])
        convs: list[nn.Conv2d] = []
        specs: list[StageSpec] = []
        for c, k in zip(channels, kernels, strict=True):
            if height - k + 1 < 2 or width - k + 1 < 2:
                raise ConfigError(
                    f"lenet: images of {input_shape[1]} x {input_shape[2]} pixels are too small "
                    f"for kernels {kernels} (a {height} x {width} map reaches a {k} x {k} "
                    "convolution and a 2x2 pooling)."
                )
            height, width = (height - k + 1) // 2, (width - k + 1) // 2
            convs.append(nn.Conv2d(in_channels, c, k))
            specs.append(StageSpec(in_channels, c, c))
            in_channels = c
        flat = in_channels * height * width
        specs.append(StageSpec(in_channels, out_features, out_features))
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(flat, out_features)
        self.out_features = out_features
        self._encoder_specs = tuple(specs)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        out: Tensor = F.relu(self.fc(x.flatten(1)))
        return out

    @property
    def encoder_stages(self) -> Sequence[StageSpec]:
        return self._encoder_specs

    @property
    def decoder_stages(self) -> Sequence[StageSpec]:
        return ()

    def encode(self, stage: int, x: Tensor) -> StageOutput:
        if stage < len(self.convs):
            h = F.relu(self.convs[stage](x))
        else:
            h = F.relu(self.fc(x.flatten(1)))[:, :, None, None]
        return StageOutput(h, h)

    def downsample(self, stage: int, x: Tensor) -> tuple[Tensor, object]:
        if stage < len(self.convs):
            return F.max_pool2d(x, 2), None
        return x.flatten(1), None

    def upsample(self, stage: int, x: Tensor, states: Sequence[object]) -> Tensor:
        raise IndexError(f"lenet has no decoder stage {stage}.")

    def decode(self, stage: int, x: Tensor) -> StageOutput:
        raise IndexError(f"lenet has no decoder stage {stage}.")
