"""The contract every multi-task architecture follows.

A :class:`MultiTaskModel` maps an input batch to ``{task name: prediction}`` and declares
what it shares:

- :meth:`~MultiTaskModel.shared_parameters`: parameters that more than one task's loss
  depends on (gradient-balancing methods manipulate the per-task gradients of these);
- :meth:`~MultiTaskModel.task_parameters`: parameters only that task's loss depends on.

Every parameter is in exactly one of those groups; :func:`check_parameter_partition` tests it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from ..registry import Registry
from ..tasks import Task

__all__ = [
    "ARCHITECTURES",
    "BACKBONES",
    "BackboneFactory",
    "HeadFactory",
    "MultiTaskModel",
    "check_parameter_partition",
    "out_features",
]

BackboneFactory = Callable[[], nn.Module]
"""Builds a fresh backbone (an ``nn.Module`` with an integer attribute ``out_features``)."""

HeadFactory = Callable[[Task, int], nn.Module]
"""Builds the prediction head of a task from the backbone's ``out_features``."""


class MultiTaskModel(nn.Module, ABC):
    """Base class of architectures: named tasks in, named predictions out."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a multi-task model needs at least one task")
        self.task_names: tuple[str, ...] = tuple(tasks)

    @abstractmethod
    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        """Predictions for every task, or only for ``task`` (multi-input mode)."""

    @abstractmethod
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that several tasks' losses depend on."""

    @abstractmethod
    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters that only ``task``'s loss depends on."""

    def optimizer_param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; override to give parts their own learning rate."""
        return [{"params": list(self.parameters()), "lr": lr, "name": "model"}]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"shared": [...], task: [...]}``: the partition of the parameters."""
        groups: dict[str, list[nn.Parameter]] = {"shared": list(self.shared_parameters())}
        for task in self.task_names:
            groups[task] = list(self.task_parameters(task))
        return groups

    def describe(self) -> dict[str, Any]:
        """Parameter counts per group, for logs and reports."""
        groups = self.parameter_groups()
        return {name: sum(p.numel() for p in params) for name, params in groups.items()}


def check_parameter_partition(model: MultiTaskModel) -> None:
    """Raise ``AssertionError`` unless shared and task parameters partition ``model.parameters()``."""
    seen: dict[int, str] = {}
    for group, params in model.parameter_groups().items():
        for p in params:
            if id(p) in seen:
                raise AssertionError(f"parameter in both {seen[id(p)]!r} and {group!r}")
            seen[id(p)] = group
    missing = [name for name, p in model.named_parameters() if id(p) not in seen]
    if missing:
        raise AssertionError(f"parameters in no group: {missing}")


def out_features(backbone: nn.Module) -> int:
    """The size of a backbone's output features (its ``out_features`` attribute)."""
    value = getattr(backbone, "out_features", None)
    if not isinstance(value, int) or value < 1:
        raise TypeError(
            f"backbone {type(backbone).__name__} must have a positive integer attribute "
            f"`out_features`, found {value!r}"
        )
    return value


ARCHITECTURES: Registry[Callable[..., MultiTaskModel]] = Registry("architecture")
"""``factory(*, tasks, backbone, head, **options) -> MultiTaskModel``."""

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
"""``factory(*, input_shape, **options) -> nn.Module`` with ``out_features``."""
