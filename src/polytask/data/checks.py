"""Checks of every batch against what its tasks need: data that lies fails at once, by name.

:func:`check_batch` runs on the collated batch while it is still on the CPU (before it moves
to the device), so it costs a few reductions over the batch and never a device
synchronisation. It refuses, with a :class:`~polytask.errors.DataError` naming the task, the
split, the sample index and the value:

- a non-finite (NaN, inf) value in a floating-point input or target;
- an integer input (the built-in backbones take floating-point inputs; a backbone that reads
  integers, e.g. token ids, says so with a class attribute ``integer_inputs = True``);
- an input whose shape is not the data set's declared ``input_shape``;
- a missing target, or targets whose first dimension is not the batch's size;
- for ``"classification"`` and ``"segmentation"`` tasks: floating-point class labels, a
  label outside ``0 .. output_dim - 1`` other than the loss's ``ignore_index`` (-1 in the
  built-in cross-entropy), a classification target that is not one label per sample, a
  segmentation target without spatial dimensions;
- for ``"multilabel"`` tasks: a value other than 0 or 1, or another number of labels than
  ``output_dim``;
- for ``"regression"`` tasks: integer targets, or another number of values per sample than
  ``output_dim``.

Samples whose mask is false for a task (no label) are not checked for that task: their
target is a filler value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError
from ..tasks import Task
from .loading import JOINT

__all__ = ["check_batch", "check_step"]

_CLASS_KINDS = ("classification", "segmentation")
_SHAPE_KINDS = ("regression", "multilabel")


def _value(x: Tensor) -> str:
    v = x.item()
    return repr(v) if isinstance(v, float) else str(v)


def _first_row(bad: Tensor) -> int:
    """The first row (sample) of a boolean tensor ``(B, ...)`` with a true element."""
    rows = bad.reshape(bad.shape[0], -1).any(dim=1)
    return int(rows.nonzero()[0, 0])


def _finite(x: Tensor) -> bool:
    """Whether every element of a floating-point tensor is finite: one sum in the common case
    (NaN and inf propagate into it), an exact check only when the sum is not finite."""
    if x.numel() == 0:
        return True
    if x.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def _nonfinite(x: Tensor) -> tuple[int, str]:
    bad = ~torch.isfinite(x)
    row = _first_row(bad)
    return row, _value(x[row][bad[row]][0])


class _Context:
    def __init__(self, split: str, where: str, indices: Sequence[int] | None) -> None:
        self.split, self.where, self.indices = split, where, indices

    def sample(self, row: int) -> str:
        if self.indices is not None and row < len(self.indices):
            return f"sample {self.indices[row]}"
        return f"row {row} of the batch"

    def fail(self, task: str | None, text: str) -> DataError:
        who = f"task {task!r}, " if task is not None else ""
        return DataError(f"bad data: {who}{self.split} split ({self.where}): {text}.")


def check_batch(
    batch: Any,
    tasks: Mapping[str, Task],
    *,
    split: str,
    where: str,
    indices: Sequence[int] | None = None,
    input_shape: Sequence[int] | None = None,
    integer_inputs: bool = False,
) -> None:
    """Check one collated batch (``{"input", "targets", "mask"}``) of the tasks ``tasks``.

    Args:
        split: the split's name, for the message.
        where: where in the run the batch is (``"epoch 1, step 3"``), for the message.
        indices: the data set indices of the batch's samples, in order (the message names
            the offending sample by its index).
        input_shape: the data set's declared shape of one input; None: not checked.
        integer_inputs: integer inputs are allowed (the model reads them).

    Raises:
        DataError: the first fault found (see the module docstring).
    """
    ctx = _Context(split, where, indices)
    names = ", ".join(repr(t) for t in tasks)
    if not isinstance(batch, Mapping) or "input" not in batch or "targets" not in batch:
        raise ctx.fail(
            None,
            f"a batch for task(s) {names} is not a mapping with an 'input' "
            f"and 'targets', found {type(batch).__name__}",
        )
    targets = batch["targets"]
    masks = batch.get("mask") or {}
    if not isinstance(targets, Mapping):
        raise ctx.fail(None, f"'targets' is a {type(targets).__name__}, not a mapping by task")
    inputs = batch["input"]
    size: int | None = None
    if isinstance(inputs, Tensor):
        size = int(inputs.shape[0]) if inputs.dim() else None
        _check_input(inputs, ctx, names, input_shape, integer_inputs)
    elif isinstance(inputs, Mapping):  # graphs and other structured inputs
        for key, value in inputs.items():
            if isinstance(value, Tensor) and value.is_floating_point() and not _finite(value):
                row, v = _nonfinite(value)
                raise ctx.fail(
                    None, f"input {key!r} of task(s) {names} holds {v} (in its row {row})"
                )
    for name, task in tasks.items():
        if name not in targets:
            raise ctx.fail(name, f"the batch has no targets for it (it has {list(targets)})")
        target = targets[name]
        if not isinstance(target, Tensor):
            raise ctx.fail(name, f"targets are a {type(target).__name__}, not a tensor")
        if target.dim() == 0:
            raise ctx.fail(name, "targets are a scalar, not one per sample")
        if size is not None and target.shape[0] != size:
            raise ctx.fail(
                name,
                f"{target.shape[0]} targets for a batch of {size} inputs "
                f"(target shape {tuple(target.shape)})",
            )
        mask = masks.get(name) if isinstance(masks, Mapping) else None
        _check_target(task, target, mask, ctx)


def _check_input(
    inputs: Tensor,
    ctx: _Context,
    names: str,
    input_shape: Sequence[int] | None,
    integer_inputs: bool,
) -> None:
    if not inputs.is_floating_point():
        if not integer_inputs:
            raise ctx.fail(
                None,
                f"the inputs of task(s) {names} are of dtype {inputs.dtype}; the model takes "
                "floating-point inputs (convert them with .float() in the data set)",
            )
    elif not _finite(inputs):
        row, v = _nonfinite(inputs)
        raise ctx.fail(None, f"the input of {ctx.sample(row)} (task(s) {names}) holds {v}")
    if input_shape is not None and tuple(inputs.shape[1:]) != tuple(input_shape):
        raise ctx.fail(
            None,
            f"inputs of shape {tuple(inputs.shape[1:])} per sample (task(s) {names}); the data "
            f"set declares input_shape {tuple(input_shape)}",
        )


def _check_target(task: Task, target: Tensor, mask: Any, ctx: _Context) -> None:
    name, kind = task.name, task.kind
    rows: Tensor | None = None
    if (
        isinstance(mask, Tensor)
        and mask.dim() == 1
        and mask.shape[0] == target.shape[0]
        and not bool(mask.all())
    ):
        rows = mask.to(torch.bool).nonzero().flatten()
        target = target[rows]

    def sample(row: int) -> str:
        return ctx.sample(row if rows is None else int(rows[row]))

    if target.dtype == torch.bool:
        target = target.to(torch.uint8)
    floating = target.is_floating_point()
    # multi-label targets: NaN and inf fail the 0 / 1 test below, no separate pass
    if floating and kind != "multilabel" and not _finite(target):
        row, v = _nonfinite(target)
        raise ctx.fail(name, f"{sample(row)} has the target value {v}")
    if kind in _CLASS_KINDS:
        if floating or target.is_complex():
            raise ctx.fail(
                name,
                f"class labels of dtype {target.dtype} (e.g. {_value(target.flatten()[0])} for "
                f"{sample(0)}) where integer class indices are needed"
                if target.numel()
                else f"class labels of dtype {target.dtype} where integers are needed",
            )
        if kind == "classification" and target.dim() != 1:
            raise ctx.fail(
                name,
                f"targets of shape {tuple(target.shape)}; a classification task needs one class "
                "index per sample, shape (batch,)",
            )
        if kind == "segmentation" and target.dim() < 2:
            raise ctx.fail(
                name,
                f"targets of shape {tuple(target.shape)}; a segmentation task needs a class "
                "index per pixel, shape (batch, height, width)",
            )
        if target.numel() == 0:
            return
        classes = task.output_dim
        ignore = getattr(task.loss, "ignore_index", None)
        low, high = torch.aminmax(target)
        if int(low) >= 0 and int(high) < classes:
            return
        bad = (target < 0) | (target >= classes)
        if isinstance(ignore, int):
            bad &= target != ignore
        if not bool(bad.any()):
            return
        row = _first_row(bad)
        value = _value(target[row][bad[row]][0])
        skipped = f", or {ignore} (ignore_index: no label)" if isinstance(ignore, int) else ""
        raise ctx.fail(
            name,
            f"{sample(row)} has the class label {value}; the task has {classes} classes: "
            f"labels 0 to {classes - 1}{skipped}",
        )
    if kind in _SHAPE_KINDS:
        per_sample = 1
        for d in target.shape[1:]:
            per_sample *= int(d)
        if per_sample != task.output_dim:
            raise ctx.fail(
                name,
                f"targets of shape {tuple(target.shape)}, {per_sample} value(s) per sample; "
                f"the task predicts {task.output_dim} (output_dim)",
            )
    if kind == "regression" and not floating:
        raise ctx.fail(
            name, f"regression targets of dtype {target.dtype}; floating-point values are needed"
        )
    if kind == "multilabel" and target.numel():
        bad = (target != 0) & (target != 1)
        if bool(bad.any()):
            row = _first_row(bad)
            raise ctx.fail(
                name,
                f"{sample(row)} has the label value {_value(target[row][bad[row]][0])}; "
                "multi-label targets are 0 or 1",
            )


def check_step(
    batches: Mapping[str, Any],
    step: Mapping[str, Sequence[int]] | None,
    tasks: Mapping[str, Task],
    *,
    split: str,
    where: str,
    input_shape: Sequence[int] | None = None,
    integer_inputs: bool = False,
) -> None:
    """:func:`check_batch` on every batch of one step ``{key: batch}`` (``key`` is
    :data:`~polytask.data.loading.JOINT` or, in multi-input mode, a task), whose sample
    indices are ``step[key]``."""
    for key, batch in batches.items():
        check_batch(
            batch,
            tasks if key == JOINT else {key: tasks[key]},
            split=split,
            where=where,
            indices=None if step is None else step.get(key),
            input_shape=input_shape or None,
            integer_inputs=integer_inputs,
        )
