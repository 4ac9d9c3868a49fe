"""Single-task learning: an independent network per task, trained side by side."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import Tensor, nn

from ...errors import ConfigError
from ...tasks import Task
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel, out_features

__all__ = ["SingleTask"]


@ARCHITECTURES.register("single_task")
class SingleTask(MultiTaskModel):
    """One network per task and nothing shared: the baseline of Delta_m.

    Training it jointly under equal weighting is exactly training each task alone, since no
    parameter receives gradient from two tasks.

    Args:
        tasks: the tasks, by name.
        backbone: builds one task's backbone.
        head: builds one task's head.
        network: ``None`` (default): each task's network is the backbone and its head.
            Otherwise the name of a registered architecture built for each task alone, e.g.
            ``"stan"``: one single-task attention network per task, the MTAN paper's STAN
            row (its #P 4.56 is three of them).
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        network: str | None = None,
    ) -> None:
        super().__init__(list(tasks))
        if network == "single_task":
            raise ConfigError("model.options.network: single_task cannot nest itself.")
        factory = None if network is None else ARCHITECTURES.get(network)
        columns: dict[str, nn.Module] = {}
        for name, task in tasks.items():
            if factory is None:
                encoder = backbone()
                columns[name] = nn.Sequential(encoder, head(task, out_features(encoder)))
            else:
                columns[name] = factory(tasks={name: task}, backbone=backbone, head=head)
        self.network = network
        self.columns = nn.ModuleDict(columns)

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        names = self.task_names if task is None else (task,)
        if self.network is None:
            return {name: self.columns[name](x) for name in names}
        return {name: self.columns[name](x)[name] for name in names}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.columns[task].parameters()
