"""Architectures (how tasks share), backbones and heads."""

from . import backbones, sharing
from .base import (
    ARCHITECTURES,
    BACKBONES,
    HEADS,
    BackboneFactory,
    HeadFactory,
    MultiTaskModel,
    RepresentationCapture,
    RepresentationPoint,
    capture_representation,
    check_parameter_partition,
    out_features,
)
from .decoders import conv_decoder_head, decoder_head
from .heads import linear_head, mlp_head
from .heads_dense import segnet_head
from .reversal import GradientReversal, ReversedHead, reverse_gradient

__all__ = [
    "ARCHITECTURES",
    "BACKBONES",
    "HEADS",
    "BackboneFactory",
    "GradientReversal",
    "HeadFactory",
    "MultiTaskModel",
    "RepresentationCapture",
    "RepresentationPoint",
    "ReversedHead",
    "backbones",
    "capture_representation",
    "check_parameter_partition",
    "conv_decoder_head",
    "decoder_head",
    "linear_head",
    "mlp_head",
    "out_features",
    "reverse_gradient",
    "segnet_head",
    "sharing",
]

from . import regularizers

__all__ += ["regularizers"]
