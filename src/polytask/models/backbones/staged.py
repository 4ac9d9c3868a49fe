"""Staged backbones: networks made of stages with known widths, for wrapping schemes.

Sharing schemes that act *between* the layers of a network (MTAN's attention, cross-stitch
and sluice mixing) are written once against :class:`StagedBackbone` instead of once per
network. A staged backbone is an encoder of stages, each followed by a parameter-free
resolution change (:meth:`~StagedBackbone.downsample`, the identity where there is none), and
optionally a decoder of stages, each preceded by one (:meth:`~StagedBackbone.upsample`, which
may use what the encoder's downsampling recorded, such as max-pooling indices)::

    x -> enc 0 -> down 0 -> enc 1 -> down 1 -> ... -> up 0 -> dec 0 -> up 1 -> dec 1 -> ...

Every stage reports the output of its first layer and of its last layer
(:class:`StageOutput`), and its widths (:class:`StageSpec`). The backbone's features, the
tensor heads read, are the last decoder stage's output, or the last encoder stage's
downsampled output when there is no decoder; :func:`run_stages` computes them and keeps
every intermediate tensor a wrapping scheme may read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from torch import Tensor, nn

from ...errors import ConfigError

__all__ = [
    "DecoderTrace",
    "EncoderTrace",
    "StageOutput",
    "StageSpec",
    "StagedBackbone",
    "StagedTrace",
    "as_staged",
    "run_stages",
]


@dataclass(frozen=True)
class StageSpec:
    """The widths of one stage.

    Attributes:
        in_channels: channels of the stage's input (after upsampling, for a decoder stage).
        first_channels: channels of the output of the stage's first layer.
        out_channels: channels of the output of the stage's last layer.
    """

    in_channels: int
    first_channels: int
    out_channels: int


class StageOutput(NamedTuple):
    """What one stage computes: its first layer's output and its last layer's output."""

    first: Tensor
    last: Tensor


@runtime_checkable
class StagedBackbone(Protocol):
    """A backbone that exposes its stages (see the module documentation).

    ``downsample`` and ``upsample`` must be free of parameters and independent of the
    number of channels, so that wrapping schemes may apply them to their own tensors of the
    same resolution. ``upsample(d, x, states)`` receives the states returned by every
    encoder stage's ``downsample`` (in encoder order) and picks the one it pairs with.
    """

    @property
    def encoder_stages(self) -> Sequence[StageSpec]:
        """The encoder's stages, in execution order (at least one)."""
        ...

    @property
    def decoder_stages(self) -> Sequence[StageSpec]:
        """The decoder's stages, in execution order (empty for an encoder-only network)."""
        ...

    @property
    def out_features(self) -> int:
        """Channels of the backbone's features (what a head reads)."""
        ...

    def encode(self, stage: int, x: Tensor) -> StageOutput:
        """Run encoder stage ``stage`` on ``x``."""
        ...

    def downsample(self, stage: int, x: Tensor) -> tuple[Tensor, object]:
        """The resolution change after encoder stage ``stage``, and what ``upsample`` needs."""
        ...

    def upsample(self, stage: int, x: Tensor, states: Sequence[object]) -> Tensor:
        """The resolution change before decoder stage ``stage``."""
        ...

    def decode(self, stage: int, x: Tensor) -> StageOutput:
        """Run decoder stage ``stage`` on ``x`` (already upsampled)."""
        ...


@dataclass
class EncoderTrace:
    """The tensors of one encoder stage: first and last layer outputs, and after downsampling."""

    first: Tensor
    last: Tensor
    pooled: Tensor


@dataclass
class DecoderTrace:
    """The tensors of one decoder stage: its upsampled input, first and last layer outputs."""

    input: Tensor
    first: Tensor
    last: Tensor


@dataclass
class StagedTrace:
    """Every intermediate tensor of one pass through a staged backbone, and its features."""

    encoder: list[EncoderTrace]
    decoder: list[DecoderTrace]
    output: Tensor


def run_stages(backbone: StagedBackbone, x: Tensor) -> StagedTrace:
    """Run ``backbone`` stage by stage, recording what every stage computes."""
    encoder: list[EncoderTrace] = []
    states: list[object] = []
    for j in range(len(backbone.encoder_stages)):
        out = backbone.encode(j, x)
        x, state = backbone.downsample(j, out.last)
        encoder.append(EncoderTrace(first=out.first, last=out.last, pooled=x))
        states.append(state)
    decoder: list[DecoderTrace] = []
    for d in range(len(backbone.decoder_stages)):
        up = backbone.upsample(d, x, states)
        out = backbone.decode(d, up)
        decoder.append(DecoderTrace(input=up, first=out.first, last=out.last))
        x = out.last
    return StagedTrace(encoder=encoder, decoder=decoder, output=x)


def as_staged(backbone: nn.Module, *, needed_by: str) -> StagedBackbone:
    """``backbone`` as a :class:`StagedBackbone`, or a :class:`ConfigError` naming the user."""
    if not isinstance(backbone, StagedBackbone) or not backbone.encoder_stages:
        raise ConfigError(
            f"{needed_by} needs a staged backbone (one exposing encoder_stages, "
            f"decoder_stages, encode, downsample, upsample and decode, such as segnet); "
            f"found {type(backbone).__name__}."
        )
    return backbone
