"""A task: a name, a loss, the metrics that evaluate it and how predictions are post-processed.

Tasks are always named, never counted: predictions, targets, losses, weights and results are
``dict[str, ...]`` keyed by :attr:`Task.name`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from .errors import ConfigError, DataError
from .losses import BCEWithLogitsLoss, Loss
from .metrics.base import Metric
from .metrics.multilabel import MultiLabelMetric

__all__ = [
    "POS_WEIGHTS",
    "Task",
    "auxiliary_names",
    "check_task_names",
    "label_targets",
    "label_tasks",
    "main_names",
]

POS_WEIGHTS = ("none", "balanced")
"""How :func:`label_tasks` weighs the positive term of each label's loss."""


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
        auxiliary: an auxiliary task is trained (its loss is balanced with the others'),
            logged and reported, but left out of model selection, Delta_m and the
            comparisons of grids (mean rank, verdict, Pareto front): it serves the other
            tasks. :func:`main_names` and :func:`auxiliary_names` read this flag, and
            nothing else decides which tasks count.
        head: the head this task needs (a name in ``polytask.models.HEADS``) instead of the
            configuration's ``model.head``, e.g. ``"decoder"`` for input reconstruction;
            ``None``: the configuration's.
        head_options: keyword arguments of that head.
    """

    name: str
    loss: Loss
    metrics: Mapping[str, Callable[[], Metric]]
    output_dim: int
    postprocess: Callable[[Tensor], Tensor] | None = None
    kind: str = "generic"
    description: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)
    auxiliary: bool = False
    head: str | None = None
    head_options: Mapping[str, object] = field(default_factory=dict)

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


def main_names(tasks: Mapping[str, Task]) -> list[str]:
    """The tasks that count (not auxiliary), in order: model selection, Delta_m and grid
    comparisons read these."""
    return [name for name, task in tasks.items() if not task.auxiliary]


def auxiliary_names(tasks: Mapping[str, Task]) -> list[str]:
    """The auxiliary tasks, in order (see :attr:`Task.auxiliary`)."""
    return [name for name, task in tasks.items() if task.auxiliary]


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


def _label_groups(
    labels: Sequence[str], groups: str | Mapping[str, Sequence[str]], name: str
) -> dict[str, list[str]]:
    if groups == "each":
        return {label: [label] for label in labels}
    if groups == "all":
        return {name: list(labels)}
    if isinstance(groups, str) or not isinstance(groups, Mapping) or not groups:
        raise ConfigError(
            "Expected the label groups to be 'each' (one binary task per label), 'all' (one "
            f"multi-label task) or a mapping task name -> list of labels, found {groups!r}."
        )
    known = set(labels)
    seen: dict[str, str] = {}
    result: dict[str, list[str]] = {}
    for task, members in groups.items():
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise ConfigError(
                f"Expected label group {task!r} to be a non-empty list of labels, found "
                f"{members!r}."
            )
        for label in members:
            if label not in known:
                raise ConfigError(
                    f"label group {task!r} names an unknown label {label!r}. The labels are: "
                    f"{', '.join(labels)}."
                )
            if label in seen:
                raise ConfigError(
                    f"label {label!r} is in two label groups, {seen[label]!r} and {task!r}."
                )
            seen[label] = task
        result[str(task)] = [str(label) for label in members]
    return result


def label_tasks(
    labels: Sequence[str],
    groups: str | Mapping[str, Sequence[str]] = "each",
    *,
    train_targets: Tensor | None = None,
    pos_weight: str = "none",
    values: Sequence[str] = ("f1", "roc_auc"),
    name: str = "labels",
) -> dict[str, Task]:
    """Tasks for binary labels (multi-label data), declared once for all labels.

    Every task predicts a group of the labels with one logit per label, is trained with
    binary cross-entropy (:class:`~polytask.losses.BCEWithLogitsLoss`) and evaluated with
    :class:`~polytask.metrics.MultiLabelMetric` (macro over the group's labels); its kind is
    ``"multilabel"`` and its ``extra`` records its ``labels``, their ``columns`` in
    ``labels`` and, with ``train_targets``, their training ``positive_rate``.

    Args:
        labels: the names of the L labels, in the order of the targets' columns.
        groups: ``"each"``: one binary task per label, named by the label (L tasks, what
            loss weighting and gradient methods balance); ``"all"``: one task ``name`` with
            L outputs; or a mapping task name -> its labels (labels left out are not used).
        train_targets: the training split's targets, ``(N, L)`` in {0, 1}; needed by
            ``pos_weight="balanced"``.
        pos_weight: ``"none"``, or ``"balanced"``: each label's positive term weighted by
            ``n_negative / n_positive`` of the training split, so that a rare label's
            missed positives cost as much in all as its false alarms.
        values: what :class:`~polytask.metrics.MultiLabelMetric` reports, hence what
            Delta_m averages (default: macro F1 and ROC-AUC).
        name: the task's name with ``groups="all"``.

    Use :func:`label_targets` to cut an ``(N, L)`` target matrix into the tasks' targets.

    Raises:
        ConfigError: bad groups or options.
        DataError: ``pos_weight="balanced"`` and a label has no positive or no negative
            training sample.
    """
    if pos_weight not in POS_WEIGHTS:
        raise ConfigError(
            f"Expected `pos_weight` to be one of {', '.join(POS_WEIGHTS)}, found {pos_weight!r}."
        )
    if len(set(labels)) != len(labels) or not labels:
        raise ConfigError(f"Expected distinct label names, found {list(labels)!r}.")
    columns = {label: i for i, label in enumerate(labels)}
    rates: list[float] | None = None
    if train_targets is not None:
        if train_targets.dim() != 2 or train_targets.shape[1] != len(labels):
            raise DataError(
                f"Expected training targets of shape (N, {len(labels)}), found "
                f"{tuple(train_targets.shape)}."
            )
        positives = train_targets.to(torch.float64).sum(dim=0)
        rates = (positives / max(train_targets.shape[0], 1)).tolist()
    elif pos_weight == "balanced":
        raise ConfigError("`pos_weight: balanced` needs the training targets (train_targets).")
    tasks: dict[str, Task] = {}
    for task, members in _label_groups(labels, groups, name).items():
        cols = [columns[label] for label in members]
        weights: list[float] | None = None
        if pos_weight == "balanced":
            assert train_targets is not None and rates is not None
            n = train_targets.shape[0]
            weights = []
            for label, col in zip(members, cols, strict=True):
                pos = round(rates[col] * n)
                if pos == 0 or pos == n:
                    raise DataError(
                        f"label {label!r} has {pos} positive training samples of {n}: "
                        "`pos_weight: balanced` needs both kinds. Use `pos_weight: none` or "
                        "leave the label out."
                    )
                weights.append((n - pos) / pos)
        extra: dict[str, object] = {"labels": list(members), "columns": cols}
        if rates is not None:
            extra["positive_rate"] = [rates[c] for c in cols]
        if weights is not None:
            extra["pos_weight"] = weights
        what = f"label {members[0]!r}" if len(members) == 1 else f"{len(members)} labels"
        tasks[task] = Task(
            name=task,
            loss=BCEWithLogitsLoss(weights),
            metrics={"multilabel": partial(MultiLabelMetric, values=tuple(values))},
            output_dim=len(members),
            kind="multilabel",
            description=f"{what} in {{0, 1}}, one logit each, shape ({len(members)},)",
            extra=extra,
        )
    return tasks


def label_targets(targets: Tensor, tasks: Mapping[str, Task]) -> dict[str, Tensor]:
    """Cut an ``(N, L)`` label matrix into every :func:`label_tasks` task's ``(N, L_t)``
    targets (float32), by the columns the task records."""
    result: dict[str, Tensor] = {}
    for name, task in tasks.items():
        cols = task.extra.get("columns")
        if not isinstance(cols, list):
            raise ConfigError(f"task {name!r} was not declared by label_tasks (no `columns`).")
        result[name] = targets[:, cols].to(torch.float32).contiguous()
    return result
