"""Multi-gate Mixture-of-Experts (Ma, Zhao, Yi, Chen, Hong and Chi, "Modeling Task
Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018,
https://doi.org/10.1145/3219819.3220007).

``E`` experts ``f_1 .. f_E`` (each a fresh backbone) read the input ``x``; every task ``t``
has a gate, a softmax over the experts of an affine map of the flattened input, and a head
``h_t``::

    g_t(x) = softmax(W_t vec(x) + b_t)                 (a point of the simplex in R^E)
    y_t    = h_t( sum_e g_t(x)_e * f_e(x) )

The paper's gate has no bias; here it has one (as common implementations do), so that a
gate can prefer an expert whatever the input. The gate reads the raw input, which is why the
architecture needs ``input_shape``. With a single expert every gate is exactly 1, and the
model computes exactly what hard parameter sharing of that expert computes.

Which parameters are shared: the experts, which every task's mixture reads. A gate only
weighs its own task's mixture, so it belongs to that task together with the head; gradient
methods therefore manipulate the experts' per-task gradients, and every gate and head gets
the gradient of its own loss only.

Shared representation: each expert's output ``f_e(x)`` (the tensors the task-specific gates'
mixtures read) is marked with :meth:`~polytask.models.MultiTaskModel.shared_representation`,
as ``experts.e``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...options import Limit
from ...tasks import Task
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel, out_features

__all__ = ["Gate", "MMoE", "check_count", "input_size", "mix_experts"]


class Gate(nn.Linear):
    """Mixture weights ``softmax(W vec(x) + b)`` over ``num_experts`` experts, shape ``(B, E)``."""

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__(in_features, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(super().forward(x.flatten(1)), dim=-1)


def mix_experts(weights: Tensor, outputs: Sequence[Tensor]) -> Tensor:
    """``sum_e weights[:, e] * outputs[e]`` for ``weights`` of shape ``(B, E)``.

    Each output has shape ``(B, ...)``; the weights broadcast over its trailing dimensions.
    Every term is a separate product, so tasks mixing the same outputs share no autograd node
    (the feature-level engine differentiates each task's loss on its own).
    """
    if weights.shape[1] != len(outputs):
        raise ValueError(f"{weights.shape[1]} gate weights for {len(outputs)} expert outputs")
    total: Tensor | None = None
    for e, z in enumerate(outputs):
        term = weights[:, e].reshape(-1, *([1] * (z.dim() - 1))) * z
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no expert outputs to mix")
    return total


def check_count(arch: str, option: str, value: object, minimum: int) -> int:
    """``value`` as an integer option of ``arch`` that is at least ``minimum``, or a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"architecture {arch}: expected option `{option}` to be an integer >= {minimum}, "
            f"found {value!r}."
        )
    return value


def input_size(arch: str, input_shape: Sequence[int]) -> int:
    """The number of values in one sample of shape ``input_shape`` (what a gate reads)."""
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ConfigError(
            f"architecture {arch}: expected `input_shape` to be positive integers, found {shape!r}."
        )
    return math.prod(shape)


#: every expert is a whole backbone
@ARCHITECTURES.register("mmoe", limits={"num_experts": Limit(ge=1, le=64)})
class MMoE(MultiTaskModel):
    """Experts shared by all tasks, mixed for each task by its own softmax gate.

    Args:
        tasks: the tasks, by name.
        backbone: builds one expert (called ``num_experts`` times).
        head: builds a task's head from the experts' ``out_features``.
        input_shape: the shape of one input sample; the gates read it flattened.
        num_experts: the number of experts ``E``.
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        input_shape: Sequence[int],
        num_experts: int = 4,
    ) -> None:
        super().__init__(list(tasks))
        count = check_count("mmoe", "num_experts", num_experts, 1)
        size = input_size("mmoe", input_shape)
        self.experts = nn.ModuleList(backbone() for _ in range(count))
        features = out_features(self.experts[0])
        self.out_features = features
        self.gates = nn.ModuleDict({name: Gate(size, count) for name in tasks})
        self.heads = nn.ModuleDict({name: head(task, features) for name, task in tasks.items()})
        self._gate_usage: dict[str, Tensor] = {}

    def expert_outputs(self, x: Tensor) -> list[Tensor]:
        """``[f_1(x), ..., f_E(x)]``."""
        return [expert(x) for expert in self.experts]

    def gate_weights(self, x: Tensor, task: str) -> Tensor:
        """``g_task(x)``: the task's mixture weights, shape ``(B, num_experts)``."""
        weights: Tensor = self.gates[task](x)
        return weights

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        experts = self.expert_outputs(x)
        names = self.task_names if task is None else (task,)
        out: dict[str, Tensor] = {}
        for name in names:
            weights = self.gate_weights(x, name)
            self._gate_usage[name] = weights.detach().mean(dim=0)
            # each task mixes its own copy of the expert outputs (the shared representation)
            own = [
                self.shared_representation(z, f"experts.{e}", name) for e, z in enumerate(experts)
            ]
            out[name] = self.heads[name](mix_experts(weights, own))
        return out

    def gate_usage(self) -> dict[str, Tensor]:
        """``{task: mean gate weights}`` (shape ``(num_experts,)``, detached, on the model's
        device) over the batch of the last forward pass that computed the task.

        Empty before the first forward pass. Reading the values is left to the caller, so that
        the forward pass never waits for the device.
        """
        return dict(self._gate_usage)

    @torch.no_grad()
    def inspect(self, inputs: Tensor) -> dict[str, Tensor]:
        """Every task's gate weights on ``inputs``: ``gate/<task>`` of shape
        ``(B, num_experts)``, each row on the simplex."""
        return {f"gate/{name}": self.gate_weights(inputs, name) for name in self.task_names}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.experts.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.gates[task].parameters()
        yield from self.heads[task].parameters()
