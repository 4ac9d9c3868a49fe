"""Hard parameter sharing: one shared trunk, one head per task (Caruana 1997)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import Tensor, nn

from ...tasks import Task
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel, out_features

__all__ = ["HardSharing"]


@ARCHITECTURES.register("hps")
class HardSharing(MultiTaskModel):
    """A shared encoder whose features every task's head reads.

    The shared representation (the point where task-specific modules read shared features)
    is the encoder's output, returned by :meth:`encode`.
    """

    def __init__(
        self, *, tasks: Mapping[str, Task], backbone: BackboneFactory, head: HeadFactory
    ) -> None:
        super().__init__(list(tasks))
        self.encoder = backbone()
        features = out_features(self.encoder)
        self.heads = nn.ModuleDict({name: head(task, features) for name, task in tasks.items()})

    def encode(self, x: Tensor) -> Tensor:
        out: Tensor = self.encoder(x)
        return out

    def decode(self, z: Tensor, task: str) -> Tensor:
        out: Tensor = self.heads[task](z)
        return out

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        z = self.encode(x)
        names = self.task_names if task is None else (task,)
        return {name: self.decode(self.shared_representation(z, task=name), name) for name in names}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()
