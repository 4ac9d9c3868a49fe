"""Evaluation: exact metrics over a split, and the selection score."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .data.base import Split
from .data.loading import JOINT, epoch_schedule, iterate_batches, to_device
from .metrics.base import Metric
from .models.base import MultiTaskModel
from .progress import ProgressFactory
from .tasks import Task

__all__ = ["EvalResult", "autocast", "evaluate", "split_datasets"]


@dataclass
class EvalResult:
    """Metric values ``{task: {value: float}}``, mean unweighted losses ``{task: float}`` and
    the metrics' per-class breakdowns ``{task: {name: [float | None]}}`` (see
    :meth:`~polytask.metrics.Metric.details`; only tasks that have some)."""

    metrics: dict[str, dict[str, float]]
    losses: dict[str, float]
    details: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"metrics": self.metrics, "losses": self.losses}
        if self.details:
            result["details"] = self.details
        return result


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for ``precision`` ("fp32" disables it)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def split_datasets(split: Split, tasks: Mapping[str, Task]) -> dict[str, Any]:
    """``{JOINT: dataset}`` for a single-input split, ``{task: dataset}`` for a multi-input one."""
    if isinstance(split, Mapping):
        return {t: split[t] for t in tasks}
    return {JOINT: split}


def forward_step(
    model: MultiTaskModel, tasks: Mapping[str, Task], batches: Mapping[str, Any]
) -> Iterator[tuple[str, Tensor, Tensor, Tensor | None]]:
    """Yield ``(task, prediction, target, mask)`` for every task present in one step."""
    for key, batch in batches.items():
        inputs, targets = batch["input"], batch["targets"]
        masks = batch.get("mask") or {}
        if key == JOINT:
            preds = model(inputs)
            for name in tasks:
                yield name, preds[name], targets[name], masks.get(name)
        else:
            pred = model(inputs, task=key)[key]
            yield key, pred, targets[key], masks.get(key)


@torch.no_grad()
def evaluate(
    model: MultiTaskModel,
    tasks: Mapping[str, Task],
    split: Split,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    num_workers: int = 0,
    progress: ProgressFactory | None = None,
) -> EvalResult:
    """Evaluate ``model`` on a whole split; metrics are exact over the split.

    ``progress(total, desc)``, when given, shows the progress over the split's batches.
    """
    was_training = model.training
    model.eval()
    datasets = split_datasets(split, tasks)
    sizes = {k: len(d) for k, d in datasets.items()}
    steps = epoch_schedule(
        sizes, batch_size=batch_size, seed=0, epoch=0, shuffle=False, strategy="round_robin"
    )
    metrics: dict[str, dict[str, Metric]] = {
        name: task.make_metrics() for name, task in tasks.items()
    }
    loss_sum = {name: 0.0 for name in tasks}
    loss_count = {name: 0.0 for name in tasks}
    bar = progress(len(steps), "evaluation") if progress is not None else None
    try:
        for batches in iterate_batches(datasets, steps, num_workers=num_workers):
            batches = to_device(batches, device)
            with autocast(device, precision):
                outputs = list(forward_step(model, tasks, batches))
            for name, pred, target, mask in outputs:
                pred = pred.float()
                task = tasks[name]
                n = float(target.shape[0] if mask is None else mask.sum().item())
                if n > 0:
                    loss_sum[name] += float(task.compute_loss(pred, target, mask)) * n
                    loss_count[name] += n
                prepared = task.prepare(pred)
                for metric in metrics[name].values():
                    metric.update(prepared, target, mask)
            if bar is not None:
                bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    values: dict[str, dict[str, float]] = {}
    details: dict[str, dict[str, list[float | None]]] = {}
    for name, task_metrics in metrics.items():
        values[name] = {}
        for metric in task_metrics.values():
            metric.sync()
            values[name].update(metric.compute())
            extra = metric.details()
            if extra:
                details.setdefault(name, {}).update(extra)
    losses = {
        name: (loss_sum[name] / loss_count[name] if loss_count[name] else float("nan"))
        for name in tasks
    }
    return EvalResult(metrics=values, losses=losses, details=details)
