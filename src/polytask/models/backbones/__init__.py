"""Backbones that architectures wrap; each registered in :data:`polytask.models.BACKBONES`."""

from .small import MLP, SmallCNN

__all__ = ["MLP", "SmallCNN"]
