"""Task regularisers, attached to any architecture's task-specific layers
(``model.regularizers`` in a config), each registered in :data:`REGULARIZERS`."""

from .base import (
    REGULARIZERS,
    RegularizerSpec,
    TaskRegularizer,
    attach_regularizers,
    select_layers,
)
from .clustered import ClusteredTasks
from .group_lasso import GroupLasso
from .task_covariance import TaskCovariance
from .tensor_normal import TensorNormal

__all__ = [
    "REGULARIZERS",
    "ClusteredTasks",
    "GroupLasso",
    "RegularizerSpec",
    "TaskCovariance",
    "TaskRegularizer",
    "TensorNormal",
    "attach_regularizers",
    "select_layers",
]
