"""Soft parameter sharing: one network per task, kept close by a penalty on their parameters.

Nothing is shared in the forward pass (the model computes exactly what
:class:`~polytask.models.sharing.single_task.SingleTask` does with the same weights); the
columns are tied by a regulariser over their *corresponding* backbone parameters (the
parameters of the same name in the K backbones, flattened to ``theta_{t,p}``):

- ``penalty="l2"`` (Duong, Cohn, Bird and Cook, "Low Resource Dependency Parsing:
  Cross-lingual Parameter Sharing in a Neural Network Parser", ACL 2015): the squared L2
  distance, summed over the unordered pairs of columns (the paper has two)::

      R = weight * sum_p sum_{s < t} ||theta_{s,p} - theta_{t,p}||_2^2

- ``penalty="trace_norm"`` (Yang and Hospedales, "Trace Norm Regularised Deep Multi-Task
  Learning", ICLR 2017 workshop, https://arxiv.org/abs/1606.04038): the nuclear norm of the
  ``K x n_p`` matrix stacking the K columns' flattened parameter ``p``::

      R = weight * sum_p ||[theta_{1,p}; ...; theta_{K,p}]||_*

  low rank means the columns' parameters are combinations of few shared ones. (Yang and
  Hospedales also study other unfoldings of the stacked weight tensor; this is the one whose
  rank is the number of independent columns.)

Every backbone parameter takes part (weights, biases and normalisation parameters); the
heads do not, since their outputs differ between tasks. :meth:`SoftSharing.regularization`
returns ``R``; the trainer adds its gradient to the task losses'.

Partition: nothing is shared; each task owns its column (backbone and head). Its parameters
get gradient from its own loss and from the regulariser, which is not a task's loss, so the
contract holds. There is no shared representation (feature-level balancing does not apply).
The columns are laid out as in ``single_task`` (``columns.<task>.0`` backbone,
``columns.<task>.1`` head), so the two load each other's weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Literal, cast

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...options import Limit
from ...tasks import Task
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel, out_features
from .cross_stitch import _check_choice

__all__ = ["SoftSharing"]


@ARCHITECTURES.register("soft", limits={"weight": Limit(ge=0)})
class SoftSharing(MultiTaskModel):
    """One backbone and head per task, tied by an L2 or trace-norm penalty (see module docs).

    Args:
        tasks: the tasks, by name (at least two).
        backbone: builds one column's backbone (any backbone).
        head: builds a task's head from the backbone's ``out_features``.
        penalty: ``"l2"`` or ``"trace_norm"``.
        weight: the penalty's weight (>= 0).
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        penalty: Literal["l2", "trace_norm"] = "l2",
        weight: float = 1e-3,
    ) -> None:
        super().__init__(list(tasks))
        arch = "soft"
        if len(tasks) < 2:
            raise ConfigError(
                f"architecture {arch} ties the columns of several tasks; found {len(tasks)} "
                f"task ({', '.join(tasks)}). Use single_task for one task."
            )
        _check_choice(arch, "penalty", penalty, ("l2", "trace_norm"))
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise ConfigError(
                f"architecture {arch}: expected option `weight` to be a finite number >= 0, "
                f"found {weight!r}."
            )
        self.penalty = penalty
        self.weight = float(weight)
        columns: dict[str, nn.Module] = {}
        for name, task in tasks.items():
            net = backbone()
            columns[name] = nn.Sequential(net, head(task, out_features(net)))
        self.columns = nn.ModuleDict(columns)
        shapes = [
            [(n, p.shape) for n, p in self._backbone(t).named_parameters()] for t in self.task_names
        ]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ConfigError(
                f"architecture {arch}: the backbone factory built backbones with different "
                "parameters; the columns' parameters must correspond one to one."
            )

    def _backbone(self, task: str) -> nn.Module:
        return cast(nn.Sequential, self.columns[task])[0]

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        names = self.task_names if task is None else (task,)
        return {name: self.columns[name](x) for name in names}

    def corresponding_parameters(self) -> dict[str, list[nn.Parameter]]:
        """``{backbone parameter name: [that parameter in each column]}`` (task order)."""
        per_column = [dict(self._backbone(t).named_parameters()) for t in self.task_names]
        return {name: [column[name] for column in per_column] for name in per_column[0]}

    def regularization(self) -> Tensor | None:
        """``weight`` times the L2 or trace-norm penalty over corresponding parameters (0-d);
        None at weight 0 (the columns are then independent, as in ``single_task``)."""
        if self.weight == 0:
            return None
        total: Tensor | None = None
        for params in self.corresponding_parameters().values():
            if self.penalty == "l2":
                term = torch.stack(
                    [
                        (params[s] - params[t]).square().sum()
                        for s in range(len(params))
                        for t in range(s + 1, len(params))
                    ]
                ).sum()
            else:
                stacked = torch.stack([p.reshape(-1) for p in params])
                term = torch.linalg.matrix_norm(stacked, ord="nuc")
            total = term if total is None else total + term
        return None if total is None else self.weight * total

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.columns[task].parameters()
