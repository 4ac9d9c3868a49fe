"""Evaluation: exact metrics over a split, the selection score, and chance level.

Chance level is what a constant predictor scores, with the task's own metrics, on a split:
see :func:`chance_level`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .data.base import Split
from .data.checks import check_step
from .data.loading import JOINT, epoch_schedule, iterate_batches, to_device
from .data.tensor import TensorMTLDataset
from .metrics.base import Metric
from .models.base import MultiTaskModel
from .progress import ProgressFactory
from .tasks import Task

__all__ = [
    "CHANCE_KINDS",
    "EvalResult",
    "autocast",
    "chance_level",
    "chance_values",
    "collect_targets",
    "constant_prediction",
    "evaluate",
    "split_datasets",
    "tensor_targets",
]

CHANCE_KINDS = ("classification", "multilabel", "regression")
"""Task kinds whose best constant predictor :func:`constant_prediction` knows."""

#: the prevalences a multi-label constant predictor's logits are clipped to (logits +-9.2)
_PREVALENCE_CLIP = 1e-4


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
    split_name: str = "evaluated",
    input_shape: tuple[int, ...] | None = None,
    integer_inputs: bool = False,
    shard: tuple[int, int] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on a whole split; metrics are exact over the split.

    ``shard=(rank, world)``: in a data-parallel run, this process evaluates the ``rank``-th
    contiguous part of the split (every sample in exactly one part) and the metrics' states
    and the loss sums are merged over the processes (every process gets the whole split's
    values).

    ``progress(total, desc)``, when given, shows the progress over the split's batches.
    Every batch is checked first (:func:`polytask.data.checks.check_batch`; ``split_name``,
    ``input_shape`` and ``integer_inputs`` are for the check): bad data is a
    :class:`~polytask.errors.DataError`, never a NaN score.
    """
    was_training = model.training
    model.eval()
    datasets = split_datasets(split, tasks)
    if shard is not None:
        datasets = {k: _shard_dataset(d, *shard) for k, d in datasets.items()}
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
        batches_iter = iterate_batches(datasets, steps, num_workers=num_workers)
        for i, (step, batches) in enumerate(zip(steps, batches_iter, strict=True)):
            check_step(
                batches,
                step,
                tasks,
                split=split_name,
                where=f"evaluation batch {i + 1}",
                input_shape=input_shape,
                integer_inputs=integer_inputs,
            )
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
    if shard is not None:
        import torch.distributed as dist

        sums = torch.tensor([[loss_sum[t], loss_count[t]] for t in tasks], dtype=torch.float64)
        sums = sums.to(device)
        dist.all_reduce(sums)
        for i, task_name in enumerate(tasks):
            loss_sum[task_name] = float(sums[i, 0])
            loss_count[task_name] = float(sums[i, 1])
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


def _shard_dataset(dataset: Any, rank: int, world: int) -> Any:
    """The ``rank``-th contiguous part of ``dataset`` (a data set's own ``collate`` kept)."""
    from torch.utils.data import Subset

    n = len(dataset)
    part: Any = Subset(dataset, range(rank * n // world, (rank + 1) * n // world))
    collate = getattr(dataset, "collate", None)
    if collate is not None:
        part.collate = collate
    return part


# -- chance level: the scores of a constant predictor ----------------------------------------


def _chance_ready(task: Task, target: Tensor) -> bool:
    """Whether ``target`` has the form the constant predictor of ``task.kind`` needs."""
    if target.shape[0] == 0:
        return False
    if task.kind == "classification":
        return target.dim() == 1 and not target.is_floating_point() and int(target.min()) >= 0
    if task.kind == "multilabel":
        return target.dim() in (1, 2) and bool(((target == 0) | (target == 1)).all())
    if task.kind == "regression":
        return target.is_floating_point() and target.dim() >= 1
    return False


def constant_prediction(task: Task, reference: Tensor, n: int) -> Tensor | None:
    """A constant prediction for ``n`` samples, in the form ``task``'s metrics receive
    (after :meth:`Task.prepare`), from the targets ``reference`` (labelled samples only).

    * ``"classification"`` (class indices ``[N]``): the majority class of ``reference`` (the
      smallest index among tied ones) as one-hot scores ``[n, C]``;
    * ``"multilabel"`` (0 / 1 targets ``[N, L]`` or ``[N]``): every label's prevalence ``p``
      in ``reference`` as the logit ``log(p / (1 - p))``, ``p`` clipped to
      ``[1e-4, 1 - 1e-4]``;
    * ``"regression"`` (float targets ``[N, ...]``): the mean of ``reference``.

    ``None`` for other kinds, or when ``reference`` does not have that form.
    """
    if not _chance_ready(task, reference):
        return None
    if task.kind == "classification":
        counts = torch.bincount(reference.long())
        majority = int(counts.argmax())
        scores = torch.zeros(n, max(task.output_dim, majority + 1))
        scores[:, majority] = 1.0
        return scores
    if task.kind == "multilabel":
        p = reference.double().mean(dim=0).clamp(_PREVALENCE_CLIP, 1.0 - _PREVALENCE_CLIP)
        logits = torch.log(p / (1.0 - p)).float()
        return logits.expand(n, *logits.shape).clone()
    mean = reference.double().mean(dim=0).to(reference.dtype)
    return mean.expand(n, *mean.shape).clone()


def chance_values(
    tasks: Mapping[str, Task],
    targets: Mapping[str, Tensor],
    reference: Mapping[str, Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {value: float}}``: what the constant predictor of each task (see
    :func:`constant_prediction`), built from ``reference[task]`` (or, where that is missing
    or of another shape, from ``targets[task]`` itself), scores on ``targets[task]`` with the
    task's own metrics. Tasks of other kinds, or whose metrics refuse the prediction, are
    left out."""
    values: dict[str, dict[str, float]] = {}
    for name, target in targets.items():
        task = tasks[name]
        if task.kind not in CHANCE_KINDS or not _chance_ready(task, target):
            continue
        ref = None if reference is None else reference.get(name)
        if ref is None or ref.shape[1:] != target.shape[1:] or not _chance_ready(task, ref):
            ref = target
        pred = constant_prediction(task, ref, target.shape[0])
        if pred is None:
            continue
        try:
            scored: dict[str, float] = {}
            for metric in task.make_metrics().values():
                metric.update(pred, target)
                scored.update(metric.compute())
        except (ValueError, RuntimeError, TypeError, IndexError):
            continue  # a metric that does not take this prediction: no chance level
        values[name] = scored
    return values


def tensor_targets(split: Split, tasks: Mapping[str, Task]) -> dict[str, Tensor]:
    """The labelled targets of the :data:`CHANCE_KINDS` tasks of ``split`` that are held in
    memory by a :class:`~polytask.data.TensorMTLDataset` (read without loading any input);
    tasks of other data sets are missing from the result."""
    datasets = split_datasets(split, tasks)
    result: dict[str, Tensor] = {}
    for name, task in tasks.items():
        if task.kind not in CHANCE_KINDS:
            continue
        dataset = datasets.get(name, datasets.get(JOINT))
        if not isinstance(dataset, TensorMTLDataset) or name not in dataset.targets:
            continue
        target = dataset.targets[name]
        mask = None if dataset.mask is None else dataset.mask.get(name)
        result[name] = (target if mask is None else target[mask]).detach().cpu()
    return result


def collect_targets(
    split: Split, tasks: Mapping[str, Task], *, batch_size: int, num_workers: int = 0
) -> dict[str, Tensor]:
    """The labelled targets of every :data:`CHANCE_KINDS` task of ``split`` (on the CPU),
    read from memory where the data set allows it (:func:`tensor_targets`), otherwise
    with one pass over the split's batches (no model)."""
    result = tensor_targets(split, tasks)
    missing = {n: t for n, t in tasks.items() if t.kind in CHANCE_KINDS and n not in result}
    if not missing:
        return result
    datasets = split_datasets(split, tasks)
    if JOINT not in datasets:
        datasets = {k: d for k, d in datasets.items() if k in missing}
    sizes = {k: len(d) for k, d in datasets.items()}
    steps = epoch_schedule(
        sizes, batch_size=batch_size, seed=0, epoch=0, shuffle=False, strategy="round_robin"
    )
    parts: dict[str, list[Tensor]] = {name: [] for name in missing}
    for batches in iterate_batches(datasets, steps, num_workers=num_workers):
        for key, batch in batches.items():
            masks = batch.get("mask") or {}
            for name in missing if key == JOINT else (key,):
                target, mask = batch["targets"][name], masks.get(name)
                if mask is not None:
                    target = target[mask.to(torch.bool)]
                parts[name].append(target.detach().cpu())
    result.update({name: torch.cat(p) for name, p in parts.items() if p})
    return result


def chance_level(
    tasks: Mapping[str, Task],
    split: Split,
    *,
    reference: Split | None = None,
    batch_size: int,
    num_workers: int = 0,
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """What a constant predictor scores on ``split``, for every task of a
    :data:`CHANCE_KINDS` kind: ``({task: {value: float}}, {task: "train" | "evaluated"})``.

    The constant comes from the targets of ``reference`` (the training split) where they are
    in memory (:func:`tensor_targets`; "train"), otherwise from the evaluated split's own
    targets ("evaluated"). A threshold for warnings (a model that does no better has learned
    nothing), not a result.
    """
    targets = collect_targets(split, tasks, batch_size=batch_size, num_workers=num_workers)
    if not targets:
        return {}, {}
    ref = tensor_targets(reference, tasks) if reference is not None else {}
    values = chance_values(tasks, targets, ref)
    source = {
        name: "train"
        if name in ref
        and ref[name].shape[1:] == targets[name].shape[1:]
        and _chance_ready(tasks[name], ref[name])
        else "evaluated"
        for name in values
    }
    return values, source
