"""The contract every multi-task architecture follows.

A :class:`MultiTaskModel` maps an input batch to ``{task name: prediction}`` and declares
what it shares:

- :meth:`~MultiTaskModel.shared_parameters`: parameters that more than one task's loss
  depends on (gradient-balancing methods manipulate the per-task gradients of these);
- :meth:`~MultiTaskModel.task_parameters`: parameters only that task's loss depends on.

Every parameter is in exactly one of those groups; :func:`check_parameter_partition` tests it.

Architectures also mark their **shared representation**: every tensor computed by shared
modules that a task-specific module reads passes through
:meth:`~MultiTaskModel.shared_representation`. Feature-level balancing methods take the
per-task gradients with respect to exactly these tensors (see :func:`capture_representation`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import Registry
from ..tasks import Task

__all__ = [
    "ARCHITECTURES",
    "BACKBONES",
    "HEADS",
    "AdaptContext",
    "BackboneFactory",
    "HeadFactory",
    "MultiTaskModel",
    "RepresentationCapture",
    "RepresentationPoint",
    "capture_representation",
    "check_parameter_partition",
    "out_features",
]

BackboneFactory = Callable[[], nn.Module]
"""Builds a fresh backbone (an ``nn.Module`` with an integer attribute ``out_features``)."""

HeadFactory = Callable[[Task, int], nn.Module]
"""Builds the prediction head of a task from the backbone's ``out_features``."""


@dataclass
class RepresentationPoint:
    """One marked tensor of the shared representation.

    ``original`` is the tensor the shared modules computed (and go on with); ``leaves`` maps
    a task name to the detached copy that task's modules read, or ``None`` to the single
    copy that every task reads (see :meth:`MultiTaskModel.shared_representation`).
    """

    name: str
    original: Tensor
    leaves: dict[str | None, Tensor] = field(default_factory=dict)

    @property
    def per_task(self) -> bool:
        """True when every task reads its own copy (then one backward pass separates them)."""
        return None not in self.leaves


@dataclass
class RepresentationCapture:
    """The shared-representation points of one forward pass, in the order they were marked.

    Per-task gradients with respect to the leaves are the feature-level Jacobian; one backward
    of the originals with the combined gradient then trains the trunk.
    """

    points: list[RepresentationPoint] = field(default_factory=list)
    _by_name: dict[str, RepresentationPoint] = field(default_factory=dict, repr=False)

    def mark(self, z: Tensor, name: str, task: str | None) -> Tensor:
        """Record ``z`` as point ``name`` (read by ``task``, or by any task) and return its leaf."""
        leaf = z.detach().requires_grad_(True)
        if task is None:
            self.points.append(RepresentationPoint(name, z, {None: leaf}))
            return leaf
        point = self._by_name.get(name)
        if point is None:
            point = self._by_name[name] = RepresentationPoint(name, z)
            self.points.append(point)
        elif point.original is not z:
            raise ValueError(
                f"shared representation point {name!r} was marked with two different tensors"
            )
        elif task in point.leaves:
            raise ValueError(f"shared representation point {name!r} marked twice for {task!r}")
        point.leaves[task] = leaf
        return leaf

    def names(self) -> list[str]:
        """The points' names, in order."""
        return [p.name for p in self.points]

    def leaves(self) -> list[Tensor]:
        """Every leaf of every point, in order."""
        return [leaf for p in self.points for leaf in p.leaves.values()]


SampleLosses = Callable[[int], dict[str, tuple[Tensor, Tensor]]]
"""``sample_losses(n)``: ``{task: (losses, labelled)}`` on the first ``n`` training samples."""


@dataclass
class AdaptContext:
    """What :meth:`MultiTaskModel.adapt` receives at the end of a training epoch.

    Attributes:
        epoch: the epoch that just ended (0-based).
        sample_losses: ``sample_losses(n)`` evaluates the model as it is now (evaluation
            mode, no gradient) on the first ``n`` samples of the training split (fewer if the
            split is smaller; always the same samples) and returns, for every task, the
            loss of each sample alone, shape ``(n,)``, and whether the sample is labelled
            for the task, a boolean ``(n,)`` (the loss of an unlabelled sample is 0). Only
            for single-input data; the model never sees the data set itself.
        log: writes a line to the run's log (the model's decisions).
    """

    epoch: int
    sample_losses: SampleLosses
    log: Callable[[str], None] = field(default=lambda line: None)


class MultiTaskModel(nn.Module, ABC):
    """Base class of architectures: named tasks in, named predictions out."""

    _capture: RepresentationCapture | None

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a multi-task model needs at least one task")
        self.task_names: tuple[str, ...] = tuple(tasks)
        object.__setattr__(self, "_capture", None)

    def shared_representation(self, z: Tensor, name: str = "z", task: str | None = None) -> Tensor:
        """Mark ``z`` as shared features that task-specific modules read; return what they read.

        With ``task=None`` the returned tensor may be read by any task's modules. With a task
        name, only that task's modules may read it: an architecture that calls this once per
        task for the same ``z`` and ``name`` gives every task its own copy, and feature-level
        methods then get all per-task gradients from **one** backward pass through the
        task-specific modules instead of K (the contract that no other task reads a task's
        copy is what makes this exact; the model tests check it for every architecture).

        Outside :func:`capture_representation` this returns ``z`` itself, at no cost.
        """
        capture = self._capture
        if capture is None or not torch.is_grad_enabled():
            return z
        return capture.mark(z, name, task)

    @abstractmethod
    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        """Predictions for every task, or only for ``task`` (multi-input mode)."""

    @abstractmethod
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that several tasks' losses depend on."""

    @abstractmethod
    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters that only ``task``'s loss depends on."""

    def regularization(self) -> Tensor | None:
        """A penalty added to every training step's objective (soft sharing, sluice), or None.

        Its gradient is added to the balanced task gradients as is: a balancing method never
        weights it.
        """
        return None

    def diagnostics(self) -> dict[str, Any]:
        """Numbers that describe the architecture's learned state, logged once per epoch.

        The trainer stores what this returns in every epoch record of ``metrics.jsonl``
        under ``"architecture"`` (nothing when it is empty, the default), so reports can draw
        how the state evolved without the model. Values must be JSON data: numbers, lists
        and ``{str: ...}`` mappings. Keep it small (it is written every epoch) and cheap.
        """
        return {}

    @torch.no_grad()
    def inspect(self, inputs: Tensor) -> dict[str, Tensor]:
        """Tensors that show what the architecture does on a few fixed ``inputs``.

        Called once at the end of a run, in evaluation mode and without gradient, on the
        first validation samples; the trainer stores the result in the run directory
        (``inspection.npz``) so reports can draw it without the data set or the model. Keys
        are ``/``-separated names (task names never contain ``/``). Empty by default.
        """
        return {}

    def adapt(self, context: AdaptContext) -> bool:
        """Change the model's structure during training; True when it changed.

        Called by the trainer at the end of every training epoch, after the balancer's
        ``on_epoch_end`` and the learning-rate schedule's step, before validation. An architecture that grows (adds or
        replaces parameters) returns True; the trainer then rebuilds the optimizer's
        parameter groups (parameters kept keep their optimizer state, new ones start
        fresh, removed ones lose theirs), the learning-rate schedule (at the same position)
        and the parameters a gradient method manipulates. Everything :meth:`structure`
        describes must be decided here, deterministically, from the model and the context.
        Static architectures (the default) never change.
        """
        return False

    def structure(self) -> dict[str, Any] | None:
        """The current structure of a model that :meth:`adapt` changes, as JSON data.

        Saved in every checkpoint next to the weights; :meth:`set_structure` rebuilds it
        before the weights are loaded, so a run resumes (and a checkpoint loads) across a
        change. None (the default) for a static architecture.
        """
        return None

    def set_structure(self, structure: dict[str, Any]) -> None:
        """Rebuild the modules for ``structure`` (what :meth:`structure` returned).

        The weights of rebuilt modules are arbitrary: a ``load_state_dict`` follows.
        """
        raise TypeError(f"{type(self).__name__} has a fixed structure")

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


@contextmanager
def capture_representation(
    model: MultiTaskModel, enabled: bool = True
) -> Iterator[RepresentationCapture | None]:
    """Record the shared-representation points of the forward passes run inside the block."""
    if not enabled:
        yield None
        return
    capture = RepresentationCapture()
    object.__setattr__(model, "_capture", capture)
    try:
        yield capture
    finally:
        object.__setattr__(model, "_capture", None)


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

HEADS: Registry[HeadFactory] = Registry("head")
"""Head factories ``head(task, in_features) -> nn.Module`` (``model.head`` in a config)."""

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
"""``factory(*, input_shape, **options) -> nn.Module`` with ``out_features``."""
