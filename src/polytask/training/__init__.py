"""Training: the loop, checkpoints, run directories, seeding and batch order."""

from ..data.loading import JOINT, STRATEGIES, epoch_schedule
from .build import Components, build_components
from .checkpoint import load_checkpoint, save_atomic
from .rundir import RunDirectory, new_run_path
from .trainer import StepEnd, Trainer

__all__ = [
    "JOINT",
    "STRATEGIES",
    "Components",
    "RunDirectory",
    "StepEnd",
    "Trainer",
    "build_components",
    "epoch_schedule",
    "load_checkpoint",
    "new_run_path",
    "save_atomic",
]
