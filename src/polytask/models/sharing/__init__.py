"""Sharing schemes, each registered in :data:`polytask.models.ARCHITECTURES`."""

from .cross_stitch import CrossStitch
from .dense import Dense
from .fafs import FAFS
from .hard import HardSharing
from .mmoe import MMoE
from .mtan import MTAN, STAN
from .ple import PLE
from .single_task import SingleTask
from .sluice import Sluice
from .soft import SoftSharing
from .split import Split

__all__ = ["MTAN", "STAN", "HardSharing", "SingleTask"]
__all__ += ["PLE", "MMoE"]
__all__ += ["Dense", "Split"]
__all__ += ["CrossStitch", "Sluice", "SoftSharing"]
__all__ += ["FAFS"]
from .drn import deep_relationship_network  # noqa: E402

__all__ += ["deep_relationship_network"]
from .depths import JointManyTask, TaskDepths  # noqa: E402
from .tensor_factorised import TensorFactorised  # noqa: E402

__all__ += ["JointManyTask", "TaskDepths", "TensorFactorised"]
