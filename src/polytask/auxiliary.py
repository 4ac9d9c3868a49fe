"""Auxiliary tasks: tasks that serve the others, and tasks a configuration adds to a data set.

Ruder ("An Overview of Multi-Task Learning in Deep Neural Networks", 2017,
https://arxiv.org/abs/1706.05098, section 9) lists auxiliary tasks that help a main task
without being of interest themselves. polytask offers them through ``task_settings`` in a
configuration (see docs/concepts.md, "Auxiliary tasks"):

- any task can be marked **auxiliary** (:attr:`polytask.Task.auxiliary`): it is trained and
  reported, but left out of model selection, Delta_m and grid comparisons;
- an **adversarial** task puts a gradient-reversal layer before its head
  (:mod:`polytask.models.reversal`; Ganin and Lempitsky 2015);
- tasks the data set lacks are **added** by a builder of :data:`AUXILIARY_TASKS`:

  - ``reconstruction``: the target is the input itself, predicted by a decoder head
    (:mod:`polytask.models.decoders`): the shared layers must keep what describes the input,
    the regulariser of the autoencoder auxiliary losses (Ruder's "representation learning");
  - ``hint``: the target is a feature computed from the input (Ruder's "hints", after Yu and
    Jiang 2016, who predict whether a sentence holds a positive or a negative sentiment word):
    a cheap signal that tells the shared layers what to attend to. The features are the
    functions of :data:`HINT_FEATURES`.

An added task's targets are computed from every split's inputs when the data is built: at
once for a :class:`~polytask.data.TensorMTLDataset` (a shallow copy with one more target
tensor), sample by sample for any other data set (:class:`WithTargets`). Added tasks need
single-input data (every sample carries an input for every task).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .config import TaskConfig
from .errors import ConfigError, DataError, did_you_mean
from .losses import L1Loss, Loss, MSELoss
from .metrics.regression import RegressionMetric
from .options import Limit, check_options
from .registry import Registry, call_with_options
from .tasks import Task, main_names

if TYPE_CHECKING:
    from .data.base import DataBundle
    from .models.base import HeadFactory

__all__ = [
    "AUXILIARY_TASKS",
    "HINT_FEATURES",
    "AddedTask",
    "HintFeature",
    "WithTargets",
    "add_targets",
    "apply_task_settings",
    "check_task_settings",
    "hint",
    "reconstruction",
    "task_head_factory",
    "task_training_steps",
]


@dataclass(frozen=True)
class AddedTask:
    """A task a configuration adds, and how its targets come from the inputs.

    ``targets(inputs)`` maps a batch of inputs ``(N, *input_shape)`` to the task's targets
    ``(N, ...)`` (float32); it must not depend on which samples are in the batch together.
    """

    task: Task
    targets: Callable[[Tensor], Tensor]


AUXILIARY_TASKS: Registry[Callable[..., AddedTask]] = Registry("auxiliary task")
"""Builders of added tasks: ``builder(*, name, input_shape, **options) -> AddedTask``
(``task_settings.NAME.add`` in a configuration; ``options`` are the builder's options)."""

#: the arguments polytask passes to the builders itself
PROVIDED = ("name", "input_shape")


def _loss(name: str) -> Loss:
    return MSELoss() if name == "mse" else L1Loss()


def _as_float(inputs: Tensor) -> Tensor:
    return inputs if inputs.is_floating_point() else inputs.to(torch.float32)


@AUXILIARY_TASKS.register("reconstruction")
def reconstruction(
    *, name: str, input_shape: tuple[int, ...], loss: Literal["mse", "l1"] = "mse"
) -> AddedTask:
    """Input reconstruction: the target is the input itself, with the shape of the input.

    Its head defaults to ``decoder`` (:func:`polytask.models.decoders.decoder_head`: a
    two-layer perceptron from flat shared features to the input's shape); with a backbone
    that gives feature maps set ``task_settings.NAME.head: conv_decoder``. Trained with the
    mean squared (``loss: mse``) or absolute (``l1``) error per input element, evaluated by
    MAE and RMSE in the input's unit (kind ``reconstruction``).
    """
    if not input_shape or any(n < 1 for n in input_shape):
        raise ConfigError(f"reconstruction task {name!r}: bad input shape {input_shape}.")
    task = Task(
        name=name,
        loss=_loss(loss),
        metrics={"regression": RegressionMetric},
        output_dim=math.prod(input_shape),
        kind="reconstruction",
        description=f"the input itself, shape {tuple(input_shape)}",
        extra={"target_shape": list(input_shape)},
        auxiliary=True,
        head="decoder",
    )
    return AddedTask(task, _as_float)


@dataclass(frozen=True)
class HintFeature:
    """A feature of the input for hint tasks: ``compute(inputs, options) -> (N, d)`` and
    ``size(input_shape, options) -> d`` (raising ConfigError where it does not apply)."""

    compute: Callable[[Tensor, Mapping[str, Any]], Tensor]
    size: Callable[[tuple[int, ...], Mapping[str, Any]], int]
    description: str


def _mean(inputs: Tensor, options: Mapping[str, Any]) -> Tensor:
    return _as_float(inputs).flatten(1).mean(dim=1, keepdim=True)


def _pooled(inputs: Tensor, options: Mapping[str, Any]) -> Tensor:
    size = int(options["size"])
    return F.adaptive_avg_pool2d(_as_float(inputs), (size, size)).flatten(1)


def _pooled_size(shape: tuple[int, ...], options: Mapping[str, Any]) -> int:
    if len(shape) != 3:
        raise ConfigError(
            f"the hint feature 'pooled' needs image inputs (channels, height, width), found "
            f"inputs of shape {shape}; use feature: mean or columns."
        )
    size = int(options["size"])
    if size > min(shape[1:]):
        raise ConfigError(
            f"the hint feature 'pooled': size {size} exceeds the image's {shape[1]} x {shape[2]}."
        )
    return shape[0] * size * size


def _columns(inputs: Tensor, options: Mapping[str, Any]) -> Tensor:
    return _as_float(inputs)[:, list(options["columns"])]


def _columns_size(shape: tuple[int, ...], options: Mapping[str, Any]) -> int:
    columns = list(options["columns"])
    if len(shape) != 1:
        raise ConfigError(
            f"the hint feature 'columns' needs flat inputs (features,), found shape {shape}."
        )
    if not columns or any(not 0 <= c < shape[0] for c in columns):
        raise ConfigError(
            f"the hint feature 'columns' needs a non-empty list of input columns in "
            f"[0, {shape[0] - 1}], found {columns}."
        )
    return len(columns)


HINT_FEATURES: dict[str, HintFeature] = {
    "mean": HintFeature(_mean, lambda shape, options: 1, "the mean of the input's values"),
    "pooled": HintFeature(
        _pooled,
        _pooled_size,
        "the image average-pooled to size x size per channel (where the content is)",
    ),
    "columns": HintFeature(_columns, _columns_size, "the input's features at `columns`"),
}
"""The features a ``hint`` task can predict, by name; add your own to the mapping."""


@AUXILIARY_TASKS.register("hint", limits={"size": Limit(ge=1, le=64)})
def hint(
    *,
    name: str,
    input_shape: tuple[int, ...],
    feature: str = "pooled",
    size: int = 2,
    columns: Sequence[int] = (),
    loss: Literal["mse", "l1"] = "mse",
) -> AddedTask:
    """A hint: a feature of the input (:data:`HINT_FEATURES`) as a regression target.

    ``feature``: ``pooled`` (an image average-pooled to ``size`` x ``size`` per channel),
    ``mean`` (the mean of the input) or ``columns`` (the given features of a flat input).
    Head: ``model.head`` (or ``task_settings.NAME.head``); kind ``regression``.
    """
    if feature not in HINT_FEATURES:
        raise ConfigError(
            f"hint task {name!r}: unknown feature {feature!r}; known: {', '.join(HINT_FEATURES)}."
        )
    spec = HINT_FEATURES[feature]
    options = {"size": size, "columns": list(columns)}
    dim = spec.size(tuple(input_shape), options)
    task = Task(
        name=name,
        loss=_loss(loss),
        metrics={"regression": RegressionMetric},
        output_dim=dim,
        kind="regression",
        description=f"hint: {spec.description}, {dim} value(s)",
        extra={"hint": feature, **({"size": size} if feature == "pooled" else {})},
        auxiliary=True,
    )
    return AddedTask(task, lambda inputs: spec.compute(inputs, options))


class WithTargets(Dataset[dict[str, Any]]):
    """``dataset`` whose samples carry more targets, computed from each sample's input.

    ``targets`` maps a task name to ``fn(inputs (N, ...)) -> (N, ...)``, called here with one
    sample (N = 1). The data set's own ``collate`` is kept.
    """

    def __init__(self, dataset: Dataset[Any], targets: Mapping[str, Callable[[Tensor], Tensor]]):
        self.dataset, self.extra_targets = dataset, dict(targets)
        collate = getattr(dataset, "collate", None)
        if collate is not None:
            self.collate = collate

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        inputs = sample["input"]
        if not isinstance(inputs, Tensor):
            raise DataError(
                f"added tasks {list(self.extra_targets)} need tensor inputs, found "
                f"{type(inputs).__name__}."
            )
        sample["targets"] = dict(sample["targets"])
        for name, fn in self.extra_targets.items():
            sample["targets"][name] = fn(inputs.unsqueeze(0))[0]
        if "mask" in sample:
            sample["mask"] = dict(sample["mask"])
            for name in self.extra_targets:
                sample["mask"][name] = torch.tensor(True)
        return sample


def add_targets(dataset: Any, targets: Mapping[str, Callable[[Tensor], Tensor]]) -> Any:
    """``dataset`` with the added tasks' targets: a shallow copy of a
    :class:`~polytask.data.TensorMTLDataset` (subclass and attributes kept) with the targets
    computed at once, else a :class:`WithTargets`."""
    from .data.tensor import TensorMTLDataset

    if not isinstance(dataset, TensorMTLDataset):
        return WithTargets(dataset, targets)
    result = copy.copy(dataset)
    result.targets = dict(dataset.targets)
    for name, fn in targets.items():
        with torch.no_grad():
            computed = fn(dataset.inputs)
        if computed.shape[0] != len(dataset):
            raise DataError(
                f"added task {name!r}: its targets have {computed.shape[0]} samples for "
                f"{len(dataset)} inputs."
            )
        result.targets[name] = computed
    return result


# -- applying a configuration's task_settings ------------------------------------------------


def apply_task_settings(
    settings: Mapping[str, TaskConfig], bundle: DataBundle, tasks: Mapping[str, Task]
) -> tuple[DataBundle, dict[str, Task]]:
    """The data and the tasks with ``task_settings`` applied: added tasks built (their
    targets added to every split), and ``auxiliary``, ``head`` and ``head_options`` set.

    Raises:
        ConfigError: a setting names a task that is neither learnt nor added, an added task
            takes the name of a data set's task, tasks are added to multi-input data, or
            every task would be auxiliary.
    """
    from .data.base import SPLITS

    added: dict[str, AddedTask] = {}
    for name, setting in settings.items():
        where = f"task_settings.{name}"
        if setting.add is None:
            if name not in tasks:
                if name in bundle.tasks:
                    raise ConfigError(
                        f"{where}: task {name!r} is not among the tasks learnt "
                        f"({', '.join(tasks)}); add it to `tasks` or remove its settings."
                    )
                raise ConfigError(
                    f"{where}: the data set has no task {name!r}"
                    f"{did_you_mean(name, list(bundle.tasks))} (its tasks: "
                    f"{', '.join(bundle.tasks)}); to add a task, set {where}.add "
                    f"({', '.join(AUXILIARY_TASKS.names())})."
                )
            if setting.options:
                raise ConfigError(
                    f"{where}.options: options are for added tasks (with {where}.add); the "
                    "data set's tasks are declared by the data set."
                )
            continue
        if name in bundle.tasks:
            raise ConfigError(
                f"{where}.add: the data set already has a task {name!r}; give the added task "
                "another name."
            )
        builder = AUXILIARY_TASKS.get(setting.add)
        result = call_with_options(
            builder,
            setting.options,
            where=f"{where}.options",
            provided={"name": name, "input_shape": tuple(bundle.input_shape)},
            schema=AUXILIARY_TASKS.schema(setting.add, PROVIDED),
        )
        if not isinstance(result, AddedTask):
            raise TypeError(f"auxiliary task builder {setting.add!r} returned {result!r}")
        added[name] = result
    if added and bundle.multi_input:
        raise ConfigError(
            f"task_settings: added tasks ({', '.join(added)}) need single-input data (every "
            "sample an input of every task); this data set is multi-input."
        )
    result_tasks: dict[str, Task] = {}
    for name, task in [*tasks.items(), *((n, a.task) for n, a in added.items())]:
        own = settings.get(name)
        if own is not None:
            changes: dict[str, Any] = {}
            if own.auxiliary is not None:
                changes["auxiliary"] = own.auxiliary
            if own.head is not None:
                changes["head"] = own.head
            if own.head_options:
                changes["head_options"] = dict(own.head_options)
            task = dataclasses.replace(task, **changes)
        result_tasks[name] = task
    if not main_names(result_tasks):
        raise ConfigError(
            "task_settings: every task is auxiliary; at least one task must count (model "
            "selection and Delta_m read the tasks that are not auxiliary)."
        )
    if not added:
        return bundle, result_tasks
    functions = {name: a.targets for name, a in added.items()}
    done: dict[int, Any] = {}  # a split shared by two names (val is test) stays shared
    splits: dict[str, Any] = {}
    for split in SPLITS:
        data = bundle.split(split)
        if id(data) not in done:
            done[id(data)] = add_targets(data, functions)
        splits[split] = done[id(data)]
    new_bundle = dataclasses.replace(
        bundle, tasks={**bundle.tasks, **{n: result_tasks[n] for n in added}}, **splits
    )
    return new_bundle, result_tasks


def check_task_settings(settings: Mapping[str, TaskConfig]) -> None:
    """Check the added tasks' builders, options and the heads' names before anything is
    built (the input shape is not known yet: options that depend on it are checked when the
    data is built)."""
    from .models.base import HEADS

    for name, setting in settings.items():
        where = f"task_settings.{name}"
        if not name or not all(c.isalnum() or c in "_-" for c in name):
            raise ConfigError(
                f"{where}: expected a task name of letters, digits, '_' or '-', found {name!r}."
            )
        if setting.add is not None:
            schema = AUXILIARY_TASKS.schema(setting.add, PROVIDED)
            check_options(schema, setting.options, where=f"{where}.options", provided=PROVIDED)
        if setting.head is not None:
            factory = HEADS.get(setting.head)
            positional = tuple(list(inspect.signature(factory).parameters)[:2])
            check_options(
                HEADS.schema(setting.head, positional),
                setting.head_options,
                where=f"{where}.head_options",
            )


def task_head_factory(
    default: str,
    settings: Mapping[str, TaskConfig],
    steps: Mapping[str, int] | None = None,
) -> HeadFactory:
    """The head factory an architecture calls for every task: the task's own head
    (:attr:`Task.head`, else ``default``, the configuration's ``model.head``) with its
    ``head_options``, behind a :class:`~polytask.models.reversal.GradientReversal` where
    ``task_settings.NAME.reversal`` is set. ``steps``: each task's training steps over the
    run (the steps whose batch holds it: the ``ganin`` schedule's total)."""
    from .models.base import HEADS
    from .models.reversal import GradientReversal, ReversedHead

    def head(task: Task, in_features: int) -> nn.Module:
        name = task.head or default
        factory = HEADS.get(name)
        # a head factory takes (task, features) positionally, whatever their names
        positional = tuple(list(inspect.signature(factory).parameters)[:2])
        where = f"task_settings.{task.name}.head_options"
        options = check_options(
            HEADS.schema(name, positional), dict(task.head_options), where=where
        )
        module: nn.Module = factory(task, in_features, **options)
        setting = settings.get(task.name)
        if setting is None or setting.reversal is None:
            return module
        total = None
        if setting.reversal_schedule == "ganin":
            total = max(1, int((steps or {}).get(task.name, 0)))
        reversal = GradientReversal(
            setting.reversal, schedule=setting.reversal_schedule, total_steps=total
        )
        return ReversedHead(reversal, module, task=task.name)

    return head


def task_training_steps(
    bundle: DataBundle,
    tasks: Mapping[str, Task],
    *,
    batch_size: int,
    drop_last: bool,
    sampling: str,
    epochs: int,
) -> dict[str, int]:
    """Per task, how many training steps hold it over ``epochs`` epochs (under torchrun every
    process runs every step on its shard of the batch: the same count)."""
    from .data.loading import JOINT, epoch_schedule
    from .evaluation import split_datasets

    datasets = split_datasets(bundle.train, tasks)
    sizes = {k: len(d) for k, d in datasets.items()}
    steps = epoch_schedule(
        sizes, batch_size=batch_size, seed=0, epoch=0, drop_last=drop_last, strategy=sampling
    )
    return {
        name: epochs * sum(1 for step in steps if name in step or JOINT in step) for name in tasks
    }
