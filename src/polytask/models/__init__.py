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
from .heads import linear_head, mlp_head
from .heads_dense import segnet_head

__all__ = [
    "ARCHITECTURES",
    "BACKBONES",
    "HEADS",
    "BackboneFactory",
    "HeadFactory",
    "MultiTaskModel",
    "RepresentationCapture",
    "RepresentationPoint",
    "backbones",
    "capture_representation",
    "check_parameter_partition",
    "linear_head",
    "mlp_head",
    "out_features",
    "segnet_head",
    "sharing",
]
