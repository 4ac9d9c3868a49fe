"""Sharing schemes, each registered in :data:`polytask.models.ARCHITECTURES`."""

from .hard import HardSharing
from .mmoe import MMoE
from .mtan import MTAN, STAN
from .ple import PLE
from .single_task import SingleTask

__all__ = ["MTAN", "STAN", "HardSharing", "SingleTask"]
__all__ += ["PLE", "MMoE"]
