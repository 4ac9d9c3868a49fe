"""What a data set provides to polytask: its tasks and its splits.

A sample is a mapping with the keys

- ``"input"``: a tensor (or any collatable structure) fed to the model: for a graph, a
  mapping of tensors (see :mod:`polytask.data.graphs`);
- ``"targets"``: ``{task name: tensor}``, one entry for every task, labelled or not (a filler
  value where the label is missing, so that samples collate into batches);
- ``"mask"`` (optional): ``{task name: bool tensor of shape ()}``, false where the sample has
  no label for that task. Without ``"mask"`` every sample is labelled for every task.

Samples become batches by PyTorch's default collation (tensors stacked along a new first
dimension), unless the data set defines a method ``collate(samples) -> batch``: then every
loader uses it. Data sets of variable-size samples, such as graphs, need one
(:func:`polytask.data.graphs.collate_graphs`). Either way a batch is
``{"input": ..., "targets": {task: tensor}, "mask": ...}`` with the targets' first dimension
the number of samples: polytask counts samples from the targets, never from the input, so
an input may be any structure of tensors the model reads (a graph batch is a dict of tensors,
moved to the device like any other).

In **single-input** mode (the usual case: one batch carries every task's labels) each split
is one ``Dataset``. In **multi-input** mode every task has a data set of its own, and each
split is ``{task name: Dataset}``; samples of the data set of task ``t`` need only carry
``targets[t]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from torch.utils.data import Dataset

from ..registry import Registry
from ..tasks import Task

__all__ = ["DATASETS", "SPLITS", "DataBundle", "Split"]

Split = Union["Dataset[Any]", Mapping[str, "Dataset[Any]"]]
SPLITS = ("train", "val", "test")


@dataclass
class DataBundle:
    """The tasks and the train / val / test splits of one data set.

    ``val`` is used for model selection. It should be a split of its own; data sets whose
    published protocol has none (NYUv2 and CityScapes evaluate the test split every epoch)
    may make it the test split itself, and then say so with ``info["val_is_test"] = True``:
    the trainer warns when such a run chooses its epoch on it (``selection.protocol: best``).
    """

    tasks: dict[str, Task]
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    multi_input: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"Expected a split in {SPLITS}, found {name!r}.")
        result: Split = getattr(self, name)
        return result


DATASETS: Registry[Any] = Registry("dataset")
"""Data set builders: ``builder(**options) -> DataBundle``."""
