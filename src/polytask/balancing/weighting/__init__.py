"""Loss-level balancing methods."""

from .equal import Equal

__all__ = ["Equal"]
