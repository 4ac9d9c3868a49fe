"""The registry of metric classes, kept apart from ``__init__`` so metric modules can import it."""

from __future__ import annotations

from ..registry import Registry
from .base import Metric

__all__ = ["METRICS"]

METRICS = Registry[type[Metric]]("metric")
"""Metric classes by name (``"segmentation"``, ``"depth"``, ...); see :mod:`polytask.metrics`."""
