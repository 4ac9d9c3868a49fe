"""SegNet (Badrinarayanan et al., TPAMI 2017) as in the MTAN reference code (Liu et al., CVPR 2019).

A VGG-16-style encoder of five stages (2, 2, 3, 3, 3 conv3x3-BN-ReLU layers of widths
64, 128, 256, 512, 512), each followed by 2x2 max-pooling that keeps its indices, and a
symmetric decoder whose stages start with max-unpooling at those indices. At ``width=1`` it
has 24,943,296 parameters; the reference's single-task networks add a
:func:`~polytask.models.heads_dense.segnet_head`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch.nn.functional as F
from torch import Size, Tensor, nn

from ...errors import ConfigError
from ...options import Limit
from ..base import BACKBONES
from .staged import StageOutput, StageSpec, run_stages

__all__ = ["SEGNET_FILTERS", "SEGNET_LAYERS", "SegNet", "xavier_init_"]

SEGNET_FILTERS = (64, 128, 256, 512, 512)
"""Output width of each encoder stage at ``width=1``."""

SEGNET_LAYERS = (2, 2, 3, 3, 3)
"""conv3x3-BN-ReLU layers of each encoder stage (the decoder mirrors them)."""


def xavier_init_(module: nn.Module) -> None:
    """The reference initialisation: Xavier-normal convolutions with zero bias, BN (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3 (padding 1) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _Pooled(NamedTuple):
    indices: Tensor
    size: Size


#: 8 times the reference network's widths: about 64 x 29 million parameters
@BACKBONES.register("segnet", limits={"width": Limit(gt=0, le=8)})
class SegNet(nn.Module):
    """SegNet encoder-decoder; its features are the last decoder stage's output.

    Implements :class:`~polytask.models.backbones.staged.StagedBackbone`: encoder stage ``j``
    is the ``SEGNET_LAYERS[j]`` convolutions of width ``SEGNET_FILTERS[j]``; decoder stage
    ``d`` mirrors encoder stage ``4 - d``, mapping its width back to the width before it
    (its first convolution changes the width, as in the reference).

    Unpooling restores the exact size before pooling, so inputs need not be multiples of 32
    (the reference assumes they are; for those the two agree).

    Args:
        input_shape: ``(channels, height, width)`` of one sample; height and width >= 32.
        width: multiplier of every stage's width, rounded, at least 1 channel
            (``width=1`` is the reference network; smaller values give CPU-sized models).
    """

    def __init__(self, *, input_shape: Sequence[int], width: float = 1.0) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(
                f"segnet expects image inputs (channels, height, width), found {tuple(input_shape)}."
            )
        min_size = 2 ** len(SEGNET_FILTERS)
        if min(input_shape[1:]) < min_size:
            raise ConfigError(
                f"segnet pools {len(SEGNET_FILTERS)} times and needs images of at least "
                f"{min_size} x {min_size} pixels, found {input_shape[1]} x {input_shape[2]}."
            )
        if not width > 0:
            raise ConfigError(f"Expected `width` of segnet to be positive but got {width}.")
        filters = [max(1, round(c * width)) for c in SEGNET_FILTERS]
        encoder: list[StageSpec] = []
        in_channels = input_shape[0]
        for c in filters:
            encoder.append(StageSpec(in_channels, c, c))
            in_channels = c
        # Decoder stage d undoes encoder stage 4 - d: from its width to the width before it
        # (the first stage's own width at the end, where the width before it is the image's).
        targets = [filters[0], *filters[:-1]]
        decoder = [StageSpec(c, t, t) for c, t in zip(filters[::-1], targets[::-1], strict=True)]
        self._encoder_specs = tuple(encoder)
        self._decoder_specs = tuple(decoder)
        self.encoder = nn.ModuleList(
            self._stage(spec, n) for spec, n in zip(encoder, SEGNET_LAYERS, strict=True)
        )
        self.decoder = nn.ModuleList(
            self._stage(spec, n) for spec, n in zip(decoder, SEGNET_LAYERS[::-1], strict=True)
        )
        xavier_init_(self)

    @staticmethod
    def _stage(spec: StageSpec, layers: int) -> nn.Sequential:
        blocks = [conv_bn_relu(spec.in_channels, spec.out_channels)]
        blocks += [conv_bn_relu(spec.out_channels, spec.out_channels) for _ in range(layers - 1)]
        return nn.Sequential(*blocks)

    @property
    def encoder_stages(self) -> Sequence[StageSpec]:
        return self._encoder_specs

    @property
    def decoder_stages(self) -> Sequence[StageSpec]:
        return self._decoder_specs

    @property
    def out_features(self) -> int:
        return self._decoder_specs[-1].out_channels

    @staticmethod
    def _run(stage: nn.Module, x: Tensor) -> StageOutput:
        blocks = list(stage.children())
        first: Tensor = blocks[0](x)
        last = first
        for block in blocks[1:]:
            last = block(last)
        return StageOutput(first, last)

    def encode(self, stage: int, x: Tensor) -> StageOutput:
        return self._run(self.encoder[stage], x)

    def downsample(self, stage: int, x: Tensor) -> tuple[Tensor, object]:
        pooled, indices = F.max_pool2d(x, kernel_size=2, stride=2, return_indices=True)
        return pooled, _Pooled(indices, x.shape[-2:])

    def upsample(self, stage: int, x: Tensor, states: Sequence[object]) -> Tensor:
        state = states[len(states) - 1 - stage]
        assert isinstance(state, _Pooled)
        return F.max_unpool2d(x, state.indices, (2, 2), (2, 2), output_size=state.size)

    def decode(self, stage: int, x: Tensor) -> StageOutput:
        return self._run(self.decoder[stage], x)

    def forward(self, x: Tensor) -> Tensor:
        return run_stages(self, x).output
