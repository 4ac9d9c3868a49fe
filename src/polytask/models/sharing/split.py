"""Split: the hard-sharing baselines of the MTAN paper (Liu, Johns and Davison, "End-to-End
Multi-Task Learning with Attention", CVPR 2019, section 5, https://arxiv.org/abs/1803.10704).

A shared network computes features that every task's head reads: hard parameter sharing
with the split after the last layer. The paper compares three sizes of the shared network,
so that the gain of MTAN (1.77 SegNets of parameters) is not just a gain of capacity:

- ``standard``: the backbone as it is (on SegNet with the reference heads: 25,055,185
  parameters, 1.003 SegNets); the same model as ``hps``.
- ``wide``: the deepest encoder stage twice as wide. The reference (``--type wide`` of
  ``model_segnet_split.py``) sets SegNet's filters to 64-128-256-512-**1024**: the three
  convolutions of the last encoder stage produce 1024 channels and the first convolution of
  the first decoder stage maps them back to 512. 43,934,161 parameters (1.76 SegNets).
- ``deep``: every layer twice as deep. The reference turns each conv3x3-BN-ReLU layer of the
  shared network, encoder and decoder, into two (the second at the same width): 26 become
  52 convolutions. The heads stay as they are. 50,807,761 parameters (2.03 SegNets).

``standard`` works with any backbone. ``wide`` and ``deep`` change the layers of the shared
network itself, which only SegNet's reference defines, so they need the ``segnet`` backbone
(any width multiplier); :func:`widen_segnet` and :func:`deepen_segnet` apply them to a
SegNet in place.

The reference's counts (25,055,188 / 43,934,164 / 50,807,764) include its three
uncertainty-weighting log-variances; in polytask that state belongs to the balancer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeVar, cast, get_args

from torch import nn

from ...errors import ConfigError
from ...tasks import Task
from ..backbones.segnet import SegNet, conv_bn_relu, xavier_init_
from ..backbones.staged import StageSpec
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory
from .hard import HardSharing

__all__ = ["Split", "SplitVariant", "deepen_segnet", "widen_segnet"]

_M = TypeVar("_M", bound=nn.Module)

SplitVariant = Literal["standard", "wide", "deep"]
"""The size of the shared network: as given, its deepest stage twice as wide, its layers doubled."""


def _layers(in_channels: int, widths: list[int]) -> nn.Sequential:
    """conv3x3-BN-ReLU layers of the given output widths, one after the other."""
    blocks = []
    for width in widths:
        blocks.append(conv_bn_relu(in_channels, width))
        in_channels = width
    return nn.Sequential(*blocks)


def _like(module: _M, net: SegNet) -> _M:
    """``module`` initialised as the reference does, on the device and dtype of ``net``."""
    xavier_init_(module)
    return module.to(next(net.parameters()))


def _depth(stage: nn.Module) -> int:
    """The number of layers of a SegNet stage."""
    return len(cast(nn.Sequential, stage))


def widen_segnet(net: SegNet) -> SegNet:
    """Make the deepest encoder stage of ``net`` twice as wide (split wide), in place.

    Every layer of the last encoder stage gets twice its width; the first layer of the first
    decoder stage reads those features and maps them to its own width, as before. The two
    rebuilt stages are freshly initialised; their stage widths are updated.
    """
    encoder, decoder = list(net.encoder_stages), list(net.decoder_stages)
    last, first = encoder[-1], decoder[0]
    wide = 2 * last.out_channels
    net.encoder[-1] = _like(_layers(last.in_channels, [wide] * _depth(net.encoder[-1])), net)
    net.decoder[0] = _like(_layers(wide, [first.out_channels] * _depth(net.decoder[0])), net)
    # SegNet offers no public way to set its stage widths
    net._encoder_specs = (*encoder[:-1], StageSpec(last.in_channels, wide, wide))
    net._decoder_specs = (StageSpec(wide, first.first_channels, first.out_channels), *decoder[1:])
    return net


def deepen_segnet(net: SegNet) -> SegNet:
    """Make every conv3x3-BN-ReLU layer of ``net`` two layers (split deep), in place.

    The existing layer is kept and followed by a new one of the same width, so the stage
    widths do not change.
    """
    stages = [*net.encoder, *net.decoder]
    specs = [*net.encoder_stages, *net.decoder_stages]
    for stage, spec in zip(stages, specs, strict=True):
        assert isinstance(stage, nn.Sequential)
        for k, layer in enumerate(list(stage)):
            extra = _like(conv_bn_relu(spec.out_channels, spec.out_channels), net)
            stage[k] = nn.Sequential(*cast(nn.Sequential, layer), *extra)
    return net


@ARCHITECTURES.register("split")
class Split(HardSharing):
    """Hard sharing with a shared network of standard, wide or deep size (see the module).

    Args:
        tasks: the tasks, by name.
        backbone: builds the shared network; ``wide`` and ``deep`` need a
            :class:`~polytask.models.backbones.SegNet`.
        head: builds a task's head from the width of the shared features.
        variant: ``"standard"``, ``"wide"`` or ``"deep"``.
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        variant: SplitVariant = "standard",
    ) -> None:
        variants = get_args(SplitVariant)
        if variant not in variants:
            raise ConfigError(
                f"Expected `variant` of architecture split to be one of "
                f"{', '.join(map(repr, variants))} but got {variant!r}."
            )

        def shared() -> nn.Module:
            net = backbone()
            if variant == "standard":
                return net
            if not isinstance(net, SegNet):
                raise ConfigError(
                    f"architecture split with variant {variant!r} resizes the layers of SegNet "
                    f"as the MTAN reference does and needs the segnet backbone, found "
                    f"{type(net).__name__}; use variant 'standard' with other backbones."
                )
            return widen_segnet(net) if variant == "wide" else deepen_segnet(net)

        super().__init__(tasks=tasks, backbone=shared, head=head)
        self.variant: SplitVariant = variant
