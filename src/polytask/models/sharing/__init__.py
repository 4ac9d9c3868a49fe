"""Sharing schemes, each registered in :data:`polytask.models.ARCHITECTURES`."""

from .hard import HardSharing
from .single_task import SingleTask

__all__ = ["HardSharing", "SingleTask"]
