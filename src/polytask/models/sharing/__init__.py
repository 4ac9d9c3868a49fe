"""Sharing schemes, each registered in :data:`polytask.models.ARCHITECTURES`."""

from .hard import HardSharing
from .mtan import MTAN, STAN
from .single_task import SingleTask

__all__ = ["MTAN", "STAN", "HardSharing", "SingleTask"]
