"""A task: a name, a loss, the metrics that evaluate it and how predictions are post-processed.

Tasks are always named, never counted: predictions, targets, losses, weights and results are
``dict[str, ...]`` keyed by :attr:`Task.name`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from .errors import ConfigError
from .losses import Loss
from .metrics.base import Metric

__all__ = ["Task", "check_task_names"]


@dataclass(frozen=True)
class Task:
    """One task of a multi-task problem.

    Args:
        name: unique identifier used as the key everywhere (letters, digits, ``_`` and ``-``;
            no ``.``, which separates task and value in names such as ``left.accuracy``).
        loss: ``loss(pred, target, mask) -> scalar``; see :mod:`polytask.losses`.
        metrics: metric factories by name; each evaluation builds fresh metric objects.
        output_dim: the number of outputs a prediction head needs (classes, regression
            targets, channels), used by architectures to build heads.
        postprocess: applied to raw predictions before metrics (never before the loss),
            e.g. a softmax or a clamp.
        kind: a free-form tag ("classification", "segmentation", ...) that architectures and
            reports may use to pick heads and plots.
    """

    name: str
    loss: Loss
    metrics: Mapping[str, Callable[[], Metric]]
    output_dim: int
    postprocess: Callable[[Tensor], Tensor] | None = None
    kind: str = "generic"
    description: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ConfigError(
                f"Expected a task name of letters, digits, '_' or '-', found {self.name!r}."
            )
        if not self.metrics:
            raise ConfigError(f"task {self.name!r} needs at least one metric.")
        if self.output_dim < 1:
            raise ConfigError(
                f"Expected `output_dim` of task {self.name!r} to be a positive integer "
                f"but got {self.output_dim}."
            )

    def compute_loss(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """The task's loss over the labelled samples of a batch (0 if none is labelled)."""
        return self.loss(pred, target, mask)

    def make_metrics(self) -> dict[str, Metric]:
        """Fresh metric objects; their value names must not collide within the task."""
        metrics = {name: factory() for name, factory in self.metrics.items()}
        seen: dict[str, str] = {}
        for metric_name, metric in metrics.items():
            for value in metric.higher_is_better:
                if value in seen:
                    raise ConfigError(
                        f"task {self.name!r}: metrics {seen[value]!r} and {metric_name!r} "
                        f"both produce a value named {value!r}."
                    )
                seen[value] = metric_name
        return metrics

    def higher_is_better(self) -> dict[str, bool]:
        """For every metric value of this task, whether higher is better."""
        result: dict[str, bool] = {}
        for metric in self.make_metrics().values():
            result.update(metric.higher_is_better)
        return result

    def prepare(self, pred: Tensor) -> Tensor:
        """Predictions as the metrics expect them."""
        return pred if self.postprocess is None else self.postprocess(pred)


def check_task_names(available: Mapping[str, Task], requested: list[str] | None) -> list[str]:
    """Validate a user's task selection against the tasks a data set provides."""
    if requested is None:
        return list(available)
    if not requested:
        raise ConfigError("`tasks` must name at least one task.")
    for name in requested:
        if name not in available:
            raise ConfigError(
                f"unknown task {name!r}. This data set provides: {', '.join(available)}."
            )
    if len(set(requested)) != len(requested):
        raise ConfigError(f"`tasks` names a task twice: {requested}.")
    return list(requested)
