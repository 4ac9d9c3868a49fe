"""polytask: multi-task learning in PyTorch.

How tasks share (architectures), how they are balanced (loss weighting and gradient
aggregation), exact metrics with Delta_m, and reproducible, resumable runs.
"""

from .api import evaluate_run, resume, train
from .config import Config, load_config
from .errors import CheckpointError, ConfigError, DataError, PolytaskError, TrainingDiverged
from .tasks import Task

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "PolytaskError",
    "Task",
    "TrainingDiverged",
    "__version__",
    "evaluate_run",
    "load_config",
    "resume",
    "train",
]
