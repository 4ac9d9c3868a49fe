"""Fixed combinations of the task gradients: the mean, the sum and constant weights."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS
from ..gradient import Level
from ._common import TaskGramianWeighting, task_indices

__all__ = ["Constant", "Mean", "Sum", "task_vector_option"]


def task_vector_option(
    key: str, value: object, tasks: Sequence[str], *, positive_sum: bool = False
) -> dict[str, float]:
    """A per-task option given as a list (in the order of the tasks) or a mapping from task
    names to numbers: every value finite and ``>= 0``; a :class:`ConfigError` naming
    ``balancer.options.<key>`` otherwise. ``positive_sum``: some value must be positive."""
    where = f"balancer.options.{key}"
    if isinstance(value, Mapping):
        unknown = sorted(set(map(str, value)) - set(tasks))
        missing = [t for t in tasks if t not in value]
        if unknown or missing:
            raise ConfigError(
                f"{where}: expected one number per task {list(tasks)}; "
                + (f"unknown {unknown}" if unknown else f"missing {missing}")
                + "."
            )
        items = [(t, value[t]) for t in tasks]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != len(tasks):
            raise ConfigError(
                f"{where}: expected {len(tasks)} numbers (one per task, in the order "
                f"{list(tasks)}), found {len(value)}."
            )
        items = list(zip(tasks, value, strict=True))
    else:
        raise ConfigError(
            f"{where}: expected a list of numbers or a mapping from task to number, "
            f"found {value!r}."
        )
    out: dict[str, float] = {}
    for task, v in items:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{where}: expected a finite number >= 0 for {task!r}, found {v!r}.")
        out[task] = float(v)
    if positive_sum and not any(v > 0 for v in out.values()):
        raise ConfigError(f"{where}: at least one value must be positive.")
    return out


class _Fixed(TaskGramianWeighting):
    """Weights that do not depend on the gradients (only on which tasks are present)."""

    @abstractmethod
    def _fixed(self, tasks: Sequence[str]) -> list[float]:
        """The weights of ``tasks`` (the rows of this step, in order)."""

    def weights_for(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        task_indices(self.task_names, tasks)
        return torch.tensor(self._fixed(tasks), dtype=torch.float64, device=gramian.device)


_LINEAR_NOTE = """
    A fixed linear combination gives the same update at both levels and as a loss weighting
    (``backward(sum_k w_k L_k)``), which costs one backward pass: this method exists so that
    a Jacobian-descent set-up can name it (as TorchJD's aggregator), and it pays a gradient
    method's cost (K backward passes at the parameter level; the K x K Gramian, logged as a
    diagnostic)."""


@BALANCERS.register("mean")
class Mean(_Fixed):
    __doc__ = (
        """The mean of the task gradients, ``d = (1/K) sum_k g_k`` (TorchJD's ``Mean``).

    K is the number of tasks of the step (those with labels).
"""
        + _LINEAR_NOTE
        + """

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
    """
    )

    def __init__(self, tasks: Sequence[str], level: Level = "parameter") -> None:
        super().__init__(tasks, level)

    def _fixed(self, tasks: Sequence[str]) -> list[float]:
        return [1.0 / len(tasks)] * len(tasks)


@BALANCERS.register("sum")
class Sum(_Fixed):
    __doc__ = (
        """The sum of the task gradients, ``d = sum_k g_k`` (TorchJD's ``Sum``; the update of
    ``equal`` loss weighting).
"""
        + _LINEAR_NOTE
        + """

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
    """
    )

    def __init__(self, tasks: Sequence[str], level: Level = "parameter") -> None:
        super().__init__(tasks, level)

    def _fixed(self, tasks: Sequence[str]) -> list[float]:
        return [1.0] * len(tasks)


@BALANCERS.register("constant")
class Constant(_Fixed):
    __doc__ = (
        """Constant weights from the configuration, ``d = sum_k w_k g_k`` (TorchJD's
    ``Constant``).

    ``weights`` is a list (in the order of the tasks) or a mapping from task names to
    numbers, each finite and ``>= 0`` (default: all 1, the sum). A task without labels in a step contributes nothing;
    the others keep their weights (no renormalisation).
"""
        + _LINEAR_NOTE
        + """

    Args:
        tasks: task names.
        weights: one weight per task (default: all 1).
        level: ``"parameter"`` or ``"feature"``.
    """
    )

    def __init__(
        self,
        tasks: Sequence[str],
        weights: Sequence[float] | Mapping[str, float] | None = None,
        level: Level = "parameter",
    ) -> None:
        super().__init__(tasks, level)
        if weights is None:
            weights = [1.0] * len(self.task_names)
        self.fixed_weights = task_vector_option("weights", weights, self.task_names)

    def _fixed(self, tasks: Sequence[str]) -> list[float]:
        return [self.fixed_weights[t] for t in tasks]
