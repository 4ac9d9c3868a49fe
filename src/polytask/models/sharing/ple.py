"""Progressive Layered Extraction (Tang, Liu, Zhao and Gong, "Progressive Layered Extraction
(PLE): A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020,
https://doi.org/10.1145/3383313.3412236).

Each extraction level ``j = 1 .. L`` has ``m_s`` shared experts and ``m_t`` experts of each
task. Task ``k``'s gate mixes its own experts and the shared experts; below the last level a
shared gate mixes every expert of the level (all tasks' and the shared ones)::

    g^{k,j} = sum_i w^{k,j}_i S^{k,j}_i,   w^{k,j} = softmax(W^{k,j} pool(g^{k,j-1}) + b^{k,j})
    S^{k,j} = [E^{k,j}_1(g^{k,j-1}), ..., E^{k,j}_{m_t}(g^{k,j-1}),
               E^{s,j}_1(g^{s,j-1}), ..., E^{s,j}_{m_s}(g^{s,j-1})]
    g^{s,j} = the same with every task's experts and the shared experts  (j < L)
    y_k     = h_k(g^{k,L})

with ``g^{k,0} = g^{s,0} = x``. One level (``L = 1``) is the paper's Customized Gate Control
(CGC). Level-1 experts are fresh backbones and their gates read the flattened input ``x``
(hence ``input_shape``); the paper leaves later experts unspecified: here an expert of a later
level is a linear map of the ``out_features`` channels followed by ReLU (applied on dimension
1, so that it also maps feature maps), and ``pool`` averages any spatial dimensions of a
gate's input (the identity on feature vectors). Gates have a bias, as in :mod:`.mmoe`.

Which parameters are shared: those that more than one task's loss depends on. With one level
(CGC) these are the shared experts, and task ``k`` owns its experts, its gate and its head.
With several levels the shared gate of level ``j < L`` reads every task's experts of level
``j``, so they feed the shared experts of level ``j + 1`` and with them every task: task
``k``'s experts below the last level, and its gates below level ``L - 1`` (which feed those
experts), are shared parameters too. Task ``k`` owns its experts of level ``L``, its gates of
levels ``L - 1`` and ``L``, and its head. (Gradient methods that should treat all of a
task's experts as its own can say so with ``balancer.shared``.)

Shared representation: every tensor computed by shared modules that a task-specific module
reads is marked with :meth:`~polytask.models.MultiTaskModel.shared_representation`: the
shared experts' outputs of the last level (``levels.L-1.shared.i``); with several levels,
also the outputs of level ``L - 1``'s experts (``levels.L-2.shared.i``,
``levels.L-2.<task>.i``), which the task gates of that level mix, and, with three levels or
more, the inputs of those gates (``levels.L-2.<task>.input``). Levels are numbered from 0 in
these names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...options import Limit
from ...tasks import Task
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel, out_features
from .mmoe import Gate, check_count, input_size, mix_experts

__all__ = ["PLE", "ExtractionLevel", "FeatureExpert"]


class FeatureExpert(nn.Module):
    """An expert of a later extraction level: ``ReLU(W z + b)`` on dimension 1 of ``z``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)

    def forward(self, z: Tensor) -> Tensor:
        out: Tensor = self.linear(z.movedim(1, -1)).relu()
        return out.movedim(-1, 1)


def _pool(z: Tensor) -> Tensor:
    """``z`` as ``(B, C)``: the mean over any dimensions after the first two."""
    return z if z.dim() == 2 else z.flatten(2).mean(dim=-1)


class ExtractionLevel(nn.Module):
    """One extraction level: shared and per-task experts, per-task gates, an optional shared gate."""

    def __init__(
        self,
        tasks: Sequence[str],
        expert: BackboneFactory,
        gate_in: int,
        shared_experts: int,
        task_experts: int,
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.shared_experts = nn.ModuleList(expert() for _ in range(shared_experts))
        self.task_experts = nn.ModuleDict(
            {t: nn.ModuleList(expert() for _ in range(task_experts)) for t in tasks}
        )
        self.task_gates = nn.ModuleDict(
            {t: Gate(gate_in, task_experts + shared_experts) for t in tasks}
        )
        everything = len(tasks) * task_experts + shared_experts
        self.shared_gate = Gate(gate_in, everything) if shared_gate else None

    def experts_of(self, task: str) -> nn.ModuleList:
        experts = self.task_experts[task]
        assert isinstance(experts, nn.ModuleList)
        return experts

    def any_expert(self) -> nn.Module:
        """One of the level's experts (they all have the same output width)."""
        if len(self.shared_experts):
            return self.shared_experts[0]
        return self.experts_of(next(iter(self.task_experts)))[0]


#: every expert is a whole backbone
@ARCHITECTURES.register(
    "ple",
    limits={
        "num_levels": Limit(ge=1, le=16),
        "shared_experts": Limit(ge=0, le=64),
        "task_experts": Limit(ge=0, le=64),
    },
)
class PLE(MultiTaskModel):
    """Stacked extraction levels of shared and task experts with per-task gates (CGC when
    ``num_levels=1``).

    Args:
        tasks: the tasks, by name.
        backbone: builds one expert of the first level.
        head: builds a task's head from the experts' ``out_features``.
        input_shape: the shape of one input sample; the first level's gates read it flattened.
        num_levels: the number of extraction levels ``L``.
        shared_experts: shared experts per level ``m_s`` (0 allowed: no shared experts).
        task_experts: experts of each task per level ``m_t`` (0 allowed: with one level this
            is :class:`~polytask.models.sharing.MMoE` with ``m_s`` experts).
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        input_shape: Sequence[int],
        num_levels: int = 1,
        shared_experts: int = 2,
        task_experts: int = 1,
    ) -> None:
        super().__init__(list(tasks))
        levels = check_count("ple", "num_levels", num_levels, 1)
        n_shared = check_count("ple", "shared_experts", shared_experts, 0)
        n_task = check_count("ple", "task_experts", task_experts, 0)
        if n_shared + n_task == 0:
            raise ConfigError(
                "architecture ple: `shared_experts` and `task_experts` are both 0; a task "
                "gate needs at least one expert to mix."
            )
        size = input_size("ple", input_shape)
        first = ExtractionLevel(self.task_names, backbone, size, n_shared, n_task, levels > 1)
        features = out_features(first.any_expert())

        def feature_expert() -> nn.Module:
            return FeatureExpert(features)

        self.levels = nn.ModuleList(
            [first]
            + [
                ExtractionLevel(
                    self.task_names, feature_expert, features, n_shared, n_task, j < levels - 1
                )
                for j in range(1, levels)
            ]
        )
        self.out_features = features
        self.heads = nn.ModuleDict({name: head(task, features) for name, task in tasks.items()})
        self._gate_usage: list[dict[str, Tensor]] = [{} for _ in range(levels)]
        self._shared_gate_usage: list[Tensor] = []
        self._recorded: dict[str, Tensor] | None = None

    def level(self, j: int) -> ExtractionLevel:
        level = self.levels[j]
        assert isinstance(level, ExtractionLevel)
        return level

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        names = self.task_names if task is None else (task,)
        last = len(self.levels) - 1
        task_in = dict.fromkeys(self.task_names, x)
        shared_in = x
        shared_usage: list[Tensor] = []
        for j in range(last + 1):
            level = self.level(j)
            # Below the last level the shared gate reads every task's experts; at the last
            # level only the requested tasks are computed.
            active = names if j == last else self.task_names
            feeds_task_gates = j >= last - 1  # the task gates of this level are task-specific
            shared = [e(shared_in) for e in level.shared_experts]
            own = {t: [e(task_in[t]) for e in level.experts_of(t)] for t in active}
            outputs: dict[str, Tensor] = {}
            for t in active:
                # each task reads its own copies of the marked tensors
                shared_read = shared
                own_read = own[t]
                gate_in = task_in[t]
                if feeds_task_gates:
                    shared_read = [
                        self.shared_representation(z, f"levels.{j}.shared.{i}", t)
                        for i, z in enumerate(shared)
                    ]
                if j == last - 1:  # this level's task experts (and gate inputs, j > 0) are shared
                    own_read = [
                        self.shared_representation(z, f"levels.{j}.{t}.{i}", t)
                        for i, z in enumerate(own_read)
                    ]
                    if j > 0:
                        gate_in = self.shared_representation(gate_in, f"levels.{j}.{t}.input", t)
                weights = level.task_gates[t](gate_in if j == 0 else _pool(gate_in))
                self._gate_usage[j][t] = weights.detach().mean(dim=0)
                if self._recorded is not None:
                    self._recorded[f"gate/{j}/{t}"] = weights.detach()
                outputs[t] = mix_experts(weights, own_read + shared_read)
            if level.shared_gate is not None:
                weights = level.shared_gate(shared_in if j == 0 else _pool(shared_in))
                shared_usage.append(weights.detach().mean(dim=0))
                if self._recorded is not None:
                    self._recorded[f"shared_gate/{j}"] = weights.detach()
                everything = [z for t in self.task_names for z in own[t]] + shared
                shared_in = mix_experts(weights, everything)
            task_in = outputs
        self._shared_gate_usage = shared_usage
        return {name: self.heads[name](task_in[name]) for name in names}

    def gate_usage(self, level: int = -1) -> dict[str, Tensor]:
        """``{task: mean gate weights}`` of the task gates of ``level`` (default: the last).

        Each is a detached tensor of shape ``(task_experts + shared_experts,)``, the task's
        own experts first, averaged over the batch of the last forward pass that computed the
        task. Empty before the first forward pass.
        """
        return dict(self._gate_usage[level])

    def shared_gate_usage(self) -> list[Tensor]:
        """The shared gates' mean weights in the last forward pass, one per level below the
        last (none for CGC), each of shape ``(num_tasks * task_experts + shared_experts,)``:
        every task's experts in task order, then the shared experts."""
        return list(self._shared_gate_usage)

    @torch.no_grad()
    def inspect(self, inputs: Tensor) -> dict[str, Tensor]:
        """The gate weights on ``inputs``: ``gate/<level>/<task>`` of shape
        ``(B, task_experts + shared_experts)`` (the task's own experts first) and, below the
        last level, ``shared_gate/<level>`` of shape
        ``(B, num_tasks * task_experts + shared_experts)``; levels numbered from 0.
        ``gate_layout`` is ``(task_experts, shared_experts)``, which names the columns."""
        self._recorded = {}
        try:
            self(inputs)
            first = self.level(0)
            own = len(first.experts_of(self.task_names[0]))
            layout = torch.tensor([own, len(first.shared_experts)])
            return {**self._recorded, "gate_layout": layout}
        finally:
            self._recorded = None

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        last = len(self.levels) - 1
        for j in range(last + 1):
            level = self.level(j)
            yield from level.shared_experts.parameters()
            if level.shared_gate is not None:
                yield from level.shared_gate.parameters()
            for t in self.task_names:
                if j < last:
                    yield from level.task_experts[t].parameters()
                if j < last - 1:
                    yield from level.task_gates[t].parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        last = len(self.levels) - 1
        if last > 0:
            yield from self.level(last - 1).task_gates[task].parameters()
        yield from self.level(last).task_experts[task].parameters()
        yield from self.level(last).task_gates[task].parameters()
        yield from self.heads[task].parameters()
