"""Task regularisers: penalties over the task-specific layers of any architecture.

A :class:`TaskRegularizer` sees, for each selected *layer*, the K tasks' weight tensors of
that layer (task order), e.g. the first layer of every task head, whose input is the shared
feature. It returns a penalty and may keep state that it updates in closed form from the
current weights (a task covariance learned jointly with the network, by alternating
minimisation: one gradient step on the weights, then the exact minimiser of the objective in
the covariance for these weights).

:func:`attach_regularizers` installs regularisers on a built model, whatever its
architecture: their state becomes a submodule ``task_regularizers`` (so it is saved in
checkpoints), and the model's :meth:`~polytask.models.MultiTaskModel.regularization`,
:meth:`~polytask.models.MultiTaskModel.diagnostics` and
:meth:`~polytask.models.MultiTaskModel.inspect` gain the regularisers' terms. The model keeps
its own class behaviour and parameter names: like :mod:`torch.nn.utils.parametrize`, the
model's class is replaced by a subclass that adds these three methods.

Which parameters a regulariser reads (see :func:`select_layers`): for each task, the
parameters of ``task_parameters(task)`` with at least two dimensions (weights, not biases),
in declaration order, optionally only those whose name matches a shell pattern in which
``{task}`` stands for the task's name; ``layers`` then picks among them by index (``0``: the
first, ``-1``: the last). The k-th selected layer of every task forms one layer group.
"""

from __future__ import annotations

import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...registry import Registry
from ..base import MultiTaskModel

__all__ = [
    "REGULARIZERS",
    "RegularizerSpec",
    "TaskRegularizer",
    "attach_regularizers",
    "select_layers",
]


class TaskRegularizer(nn.Module, ABC):
    """A penalty over the K tasks' weights of one or several layer groups.

    Args:
        tasks: the task names, in the order of the weights passed to every method.
        shapes: for each layer group, the shape of each task's weight (task order).
    """

    def __init__(self, tasks: Sequence[str], shapes: Sequence[Sequence[tuple[int, ...]]]) -> None:
        super().__init__()
        if len(tasks) < 2:
            raise ConfigError(
                f"{type(self).__name__} relates the weights of several tasks; found "
                f"{len(tasks)} task ({', '.join(tasks)})."
            )
        if not shapes:
            raise ConfigError(f"{type(self).__name__}: no layer was selected.")
        for i, group in enumerate(shapes):
            if len(group) != len(tasks):
                raise ValueError(
                    f"layer group {i}: expected one shape per task ({len(tasks)}), "
                    f"found {len(group)}"
                )
        self.tasks: tuple[str, ...] = tuple(tasks)
        self.shapes: tuple[tuple[tuple[int, ...], ...], ...] = tuple(
            tuple(tuple(s) for s in group) for group in shapes
        )

    def _same_shapes(self, what: str) -> None:
        """Raise a :class:`ConfigError` unless the tasks' weights of every group agree."""
        for i, group in enumerate(self.shapes):
            if any(s != group[0] for s in group):
                listed = ", ".join(
                    f"{t}: {tuple(s)}" for t, s in zip(self.tasks, group, strict=True)
                )
                raise ConfigError(
                    f"{what} needs the tasks' weights of each layer to have one shape; "
                    f"layer group {i} has {listed}. Select other layers (`layers`, "
                    "`parameters`)."
                )

    def update(self, layers: Sequence[Sequence[Tensor]]) -> None:
        """Update the regulariser's state from the current weights (no gradient). By
        default there is no state; the closed-form methods override this."""

    @abstractmethod
    def penalty(self, layers: Sequence[Sequence[Tensor]]) -> Tensor:
        """The penalty (0-d) of ``layers[g][k]``: the weight of task k in layer group g."""

    def diagnostics(self) -> dict[str, Any]:
        """Small JSON data that describe the learned relations (logged every epoch)."""
        return {}

    def inspect(self) -> dict[str, Tensor]:
        """Tensors that show the learned relations (stored once at the end of a run)."""
        return {}


RegularizerFactory = Callable[..., TaskRegularizer]

REGULARIZERS: Registry[RegularizerFactory] = Registry("regularizer")
"""``factory(*, tasks, shapes, **options) -> TaskRegularizer`` (``model.regularizers``)."""


@dataclass
class RegularizerSpec:
    """One regulariser to attach: its registered ``name``, ``weight`` and ``options``, and
    which layers it reads (see :func:`select_layers`)."""

    name: str
    weight: float = 1e-3
    options: Mapping[str, Any] = field(default_factory=dict)
    parameters: str | None = None
    layers: Sequence[int] = (0,)


def select_layers(
    model: MultiTaskModel, parameters: str | None = None, layers: Sequence[int] = (0,)
) -> list[list[str]]:
    """The names of the selected weights: ``result[g][k]`` is task k's weight of group g.

    A task's candidates are its task parameters with at least two dimensions, in
    declaration order, whose name (as in ``model.named_parameters()``) matches
    ``parameters.format(task=...)`` when ``parameters`` is given; ``layers`` indexes them.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    shared = {id(p) for p in model.shared_parameters()}
    per_task: dict[str, list[str]] = {}
    for task in model.task_names:
        pattern = None if parameters is None else parameters.replace("{task}", task)
        found = []
        for p in model.task_parameters(task):
            if p.dim() < 2 or id(p) in shared:
                continue
            name = names[id(p)]
            if pattern is None or fnmatch.fnmatchcase(name, pattern):
                found.append(name)
        if not found:
            raise ConfigError(
                f"no task-specific weight of task {task!r} to regularise"
                + (f" matches {pattern!r}" if pattern is not None else "")
                + "; the task's parameters with two or more dimensions are: "
                + (
                    ", ".join(names[id(p)] for p in model.task_parameters(task) if p.dim() >= 2)
                    or "(none)"
                )
                + "."
            )
        per_task[task] = found
    if not layers:
        raise ConfigError("expected at least one layer index in `layers`, found [].")
    groups = []
    for index in layers:
        group = []
        for task, found in per_task.items():
            if not -len(found) <= index < len(found):
                raise ConfigError(
                    f"layer index {index} is out of range for task {task!r}, which has "
                    f"{len(found)} selected weight(s): {', '.join(found)}."
                )
            group.append(found[index])
        groups.append(group)
    return groups


class _Regularized:
    """What :func:`attach_regularizers` adds to a model's class (placed first in its MRO)."""

    task_regularizers: nn.ModuleDict
    _regularizer_layers: dict[str, list[list[str]]]
    _regularizer_weights: dict[str, float]

    def _regularizer_inputs(self, key: str) -> list[list[Tensor]]:
        model: MultiTaskModel = self  # type: ignore[assignment]
        return [[model.get_parameter(n) for n in group] for group in self._regularizer_layers[key]]

    def regularization(self) -> Tensor | None:
        """The architecture's own penalty plus each regulariser's ``weight * penalty``.

        In training mode, each regulariser first updates its state in closed form from the
        current weights (for the trainer, which calls this once per step before the
        backward pass: the alternating minimisation of the papers)."""
        total: Tensor | None = super().regularization()  # type: ignore[misc]
        for key, reg in self.task_regularizers.items():
            weight = self._regularizer_weights[key]
            if weight == 0:
                continue
            layers = self._regularizer_inputs(key)
            assert isinstance(reg, TaskRegularizer)
            if reg.training:
                with torch.no_grad():
                    reg.update([[w.detach() for w in group] for group in layers])
            term = weight * reg.penalty(layers)
            total = term if total is None else total + term
        return total

    def diagnostics(self) -> dict[str, Any]:
        result: dict[str, Any] = dict(super().diagnostics())  # type: ignore[misc]
        own = {k: r.diagnostics() for k, r in self.task_regularizers.items()}  # type: ignore[operator]
        own = {k: v for k, v in own.items() if v}
        if own:
            result["regularizers"] = own
        return result

    @torch.no_grad()
    def inspect(self, inputs: Tensor) -> dict[str, Tensor]:
        result: dict[str, Tensor] = dict(super().inspect(inputs))  # type: ignore[misc]
        for key, reg in self.task_regularizers.items():
            for name, value in reg.inspect().items():  # type: ignore[operator]
                result[f"regularizers/{key}/{name}"] = value
        return result

    def regularizer_parameters(self, key: str) -> Iterator[nn.Parameter]:
        """The parameters regulariser ``key`` reads (its gradient reaches only these)."""
        for group in self._regularizer_layers[key]:
            for name in group:
                yield self.get_parameter(name)  # type: ignore[attr-defined]


_CLASSES: dict[type, type] = {}


def _regularized_class(cls: type) -> type:
    if issubclass(cls, _Regularized):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Regularized{cls.__name__}", (_Regularized, cls), {})
    return _CLASSES[cls]


def attach_regularizers(
    model: MultiTaskModel, specs: Sequence[RegularizerSpec], *, where: str = "regularizers"
) -> MultiTaskModel:
    """Install ``specs`` on ``model`` (in place; the model is returned).

    Each regulariser is built by its :data:`REGULARIZERS` factory with ``tasks`` (the model's
    task names) and ``shapes`` (of the selected weights), its options checked against the
    factory's annotations; errors name ``where[i]``. It is stored under its name (``name_2``,
    ... for a name used again) in ``model.task_regularizers``.
    """
    from ...registry import call_with_options

    if not specs:
        return model
    if model.structure() is not None:
        raise ConfigError(
            f"{where}: {type(model).__name__} changes its structure during training (its "
            "parameters are replaced when it widens); regularisers select fixed parameters and "
            "cannot be attached to it."
        )
    if hasattr(model, "task_regularizers") and not isinstance(model, _Regularized):
        raise ConfigError(
            f"{type(model).__name__} already has an attribute `task_regularizers`; "
            "regularisers cannot be attached to it."
        )
    if not isinstance(model, _Regularized):
        model.task_regularizers = nn.ModuleDict()
        model._regularizer_layers = {}  # type: ignore[assignment]
        model._regularizer_weights = {}  # type: ignore[assignment]
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        if not spec.name:
            raise ConfigError(
                f"{at}.name: expected the name of a regularizer "
                f"({', '.join(REGULARIZERS.names())}), found {spec.name!r}."
            )
        factory = REGULARIZERS.get(spec.name)
        weight = spec.weight
        if isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{at}.weight: expected a finite number >= 0, found {weight!r}.")
        try:
            groups = select_layers(model, spec.parameters, spec.layers)
        except ConfigError as exc:
            raise ConfigError(f"{at}: {exc}") from None
        shapes = [[tuple(model.get_parameter(n).shape) for n in group] for group in groups]
        provided = {"tasks": list(model.task_names), "shapes": shapes}
        reg = call_with_options(
            factory,
            spec.options,
            where=f"{at}.options",
            provided=provided,
            schema=REGULARIZERS.schema(spec.name, list(provided)),
        )
        if not isinstance(reg, TaskRegularizer):
            raise TypeError(f"regularizer {spec.name!r} returned {type(reg).__name__}")
        key, n = spec.name, 1
        registered: nn.ModuleDict = model.task_regularizers  # type: ignore[assignment]
        while key in registered:
            n += 1
            key = f"{spec.name}_{n}"
        first = next(iter(model.parameters()), None)
        if first is not None:
            reg.to(device=first.device)
        registered[key] = reg
        state = vars(model)
        state["_regularizer_layers"][key] = groups
        state["_regularizer_weights"][key] = float(weight)
    model.__class__ = _regularized_class(type(model))
    return model
