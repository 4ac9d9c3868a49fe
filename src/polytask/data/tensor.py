"""A multi-task data set held in memory as tensors: the quickest way to bring your own data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError

__all__ = ["TensorMTLDataset"]


class TensorMTLDataset(Dataset[dict[str, Any]]):
    """In-memory multi-task samples, following the sample contract of :mod:`polytask.data.base`.

    Sample ``i`` is ``{"input": inputs[i], "targets": {task: targets[task][i]}}``, plus
    ``"mask": {task: mask[task][i]}`` (boolean scalars) when ``mask`` is given. Every tensor is
    indexed along its first dimension, which must be the same everywhere. Where a sample has no
    label for a task, its entry in ``targets`` is a filler value of your choice (it must still
    collate), and its mask entry is false; tasks absent from ``mask`` are labelled everywhere.

    Args:
        inputs: model inputs, shape ``(N, ...)``.
        targets: ``{task name: tensor of shape (N, ...)}``, at least one task.
        mask: optional ``{task name: bool tensor of shape (N,)}`` for some or all of the tasks
            of ``targets``; true where the sample is labelled for the task.

    Raises:
        DataError: a tensor has the wrong type, no first dimension or a first dimension other
            than ``N``; a mask names a task without targets or is not a 1-D boolean tensor.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> data = TensorMTLDataset(
        ...     torch.randn(6, 3),
        ...     {"label": torch.tensor([0, 1, 2, 0, -1, 1]), "score": torch.randn(6, 1)},
        ...     mask={"label": torch.tensor([True, True, True, True, False, True])},
        ... )
        >>> len(data), data.tasks
        (6, ('label', 'score'))
        >>> batch = next(iter(DataLoader(data, batch_size=4)))
        >>> batch["input"].shape, batch["targets"]["score"].shape, batch["mask"]["label"].shape
        (torch.Size([4, 3]), torch.Size([4, 1]), torch.Size([4]))
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Mapping[str, Tensor],
        mask: Mapping[str, Tensor] | None = None,
    ) -> None:
        if not isinstance(inputs, Tensor):
            raise DataError(f"Expected `inputs` to be a tensor, found {type(inputs).__name__}.")
        if inputs.dim() == 0:
            raise DataError(
                "Expected `inputs` to have a first (sample) dimension, found a scalar tensor."
            )
        n = inputs.shape[0]
        if not isinstance(targets, Mapping) or not targets:
            raise DataError(
                "Expected `targets` to be a non-empty mapping {task name: tensor}, "
                f"found {targets!r}."
            )
        for task, target in targets.items():
            self._check_task_name(task, "targets")
            if not isinstance(target, Tensor):
                raise DataError(
                    f"Expected the targets of task {task!r} to be a tensor, "
                    f"found {type(target).__name__}."
                )
            if target.dim() == 0 or target.shape[0] != n:
                raise DataError(
                    f"Expected the targets of task {task!r} to have {n} samples (the first "
                    f"dimension of `inputs`, shape {tuple(inputs.shape)}), "
                    f"found shape {tuple(target.shape)}."
                )
        if mask is not None:
            if not isinstance(mask, Mapping):
                raise DataError(
                    "Expected `mask` to be a mapping {task name: bool tensor}, "
                    f"found {type(mask).__name__}."
                )
            for task, task_mask in mask.items():
                self._check_task_name(task, "mask")
                if task not in targets:
                    raise DataError(
                        f"`mask` names task {task!r}, which has no targets. "
                        f"Tasks with targets: {', '.join(targets)}."
                    )
                if not isinstance(task_mask, Tensor):
                    raise DataError(
                        f"Expected the mask of task {task!r} to be a tensor, "
                        f"found {type(task_mask).__name__}."
                    )
                if task_mask.dtype != torch.bool or tuple(task_mask.shape) != (n,):
                    raise DataError(
                        f"Expected the mask of task {task!r} to be a bool tensor of shape "
                        f"({n},), found dtype {task_mask.dtype} and shape "
                        f"{tuple(task_mask.shape)}."
                    )
        self.inputs = inputs
        self.targets: dict[str, Tensor] = dict(targets)
        self.mask: dict[str, Tensor] | None = None if mask is None else dict(mask)

    @staticmethod
    def _check_task_name(task: object, where: str) -> None:
        if not isinstance(task, str) or not task:
            raise DataError(
                f"Expected the keys of `{where}` to be non-empty task names, found {task!r}."
            )

    @property
    def tasks(self) -> tuple[str, ...]:
        """The names of the tasks that have targets, in the order given."""
        return tuple(self.targets)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = {
            "input": self.inputs[index],
            "targets": {task: target[index] for task, target in self.targets.items()},
        }
        if self.mask is not None:
            sample["mask"] = {task: task_mask[index] for task, task_mask in self.mask.items()}
        return sample

    def __repr__(self) -> str:
        masked = "" if self.mask is None else f", masked={list(self.mask)}"
        return (
            f"{type(self).__name__}(n={len(self)}, input_shape={tuple(self.inputs.shape[1:])}, "
            f"tasks={list(self.targets)}{masked})"
        )
