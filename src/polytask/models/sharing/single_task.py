"""Single-task learning: an independent network per task, trained side by side."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import Tensor, nn

from ...tasks import Task
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel, out_features

__all__ = ["SingleTask"]


@ARCHITECTURES.register("single_task")
class SingleTask(MultiTaskModel):
    """One backbone and head per task and nothing shared: the baseline of Delta_m.

    Training it jointly under equal weighting is exactly training each task alone, since no
    parameter receives gradient from two tasks.
    """

    def __init__(
        self, *, tasks: Mapping[str, Task], backbone: BackboneFactory, head: HeadFactory
    ) -> None:
        super().__init__(list(tasks))
        columns: dict[str, nn.Module] = {}
        for name, task in tasks.items():
            encoder = backbone()
            columns[name] = nn.Sequential(encoder, head(task, out_features(encoder)))
        self.columns = nn.ModuleDict(columns)

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        names = self.task_names if task is None else (task,)
        return {name: self.columns[name](x) for name in names}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.columns[task].parameters()
