"""Prediction heads built from a task's ``output_dim``."""

from __future__ import annotations

from torch import nn

from ..tasks import Task
from .base import HEADS

__all__ = ["linear_head", "mlp_head"]


@HEADS.register("linear")
def linear_head(task: Task, in_features: int) -> nn.Module:
    """One linear layer to the task's ``output_dim``."""
    return nn.Linear(in_features, task.output_dim)


@HEADS.register("mlp")
def mlp_head(task: Task, in_features: int, hidden: int = 64) -> nn.Module:
    """Linear-ReLU-Linear to the task's ``output_dim``."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, task.output_dim)
    )
