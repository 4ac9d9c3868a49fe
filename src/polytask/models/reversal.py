"""The gradient-reversal layer, for adversarial auxiliary tasks.

Ganin and Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015
(https://arxiv.org/abs/1409.7495), section 3.2: a layer ``R_lambda`` with

    forward:  R_lambda(x) = x
    backward: dR_lambda / dx = -lambda I

Placed between the shared layers and a task's head, it leaves the head's own gradient as it
is (the head still learns to predict its task) and multiplies by ``-lambda`` what that task's
loss sends to everything below it: the shared layers ascend the task's loss, learning
features that do **not** predict it (the domain classifier of the paper, or any nuisance
label). The paper raises lambda from 0 to its final value over training,

    lambda_p = lambda * (2 / (1 + exp(-gamma p)) - 1),   gamma = 10,

with ``p`` the training progress in [0, 1] (``schedule="ganin"``); ``schedule="constant"``
keeps ``lambda`` throughout.

``p`` is counted in optimizer steps, as the paper's fraction of training iterations done:
the layer's buffer ``steps`` (saved with the model, so a resumed run goes on where it
stopped) moves on by :meth:`GradientReversal.advance`, which polytask's trainer calls after
every optimizer step whose batch held the task, and ``total_steps`` is the number of such
steps the run is expected to make (polytask computes it from the data and
``train.epochs``; under torchrun per process). Forward passes do not count, so methods
that run the model several times per step (batch parts, look-aheads, perturbed rows) do
not hurry the ramp. Outside polytask's trainer, call ``advance()`` after each step.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "GAMMA",
    "GradientReversal",
    "ReversedHead",
    "advance_reversals",
    "ganin_factor",
    "reversal_schedules",
    "reverse_gradient",
]

#: gamma of the paper's schedule 2 / (1 + exp(-gamma p)) - 1
GAMMA = 10.0


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * -ctx.scale, None


def reverse_gradient(x: Tensor, scale: float = 1.0) -> Tensor:
    """``x`` unchanged; its gradient multiplied by ``-scale`` on the way back."""
    out: Tensor = _Reverse.apply(x, float(scale))  # type: ignore[no-untyped-call]
    return out


def ganin_factor(progress: float, gamma: float = GAMMA) -> float:
    """``2 / (1 + exp(-gamma p)) - 1`` for ``p = progress`` clipped to [0, 1]: 0 at the
    start, about 0.9999 at the end (Ganin and Lempitsky 2015)."""
    p = min(max(progress, 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class GradientReversal(nn.Module):
    """The identity forward; the gradient times ``-lambda`` backward (see the module).

    Args:
        lam: the final ``lambda`` (>= 0; 0 blocks the task's gradient to the shared layers).
        schedule: ``"constant"`` or ``"ganin"`` (the paper's ramp from 0 to ``lam``).
        total_steps: training forward passes over which ``"ganin"`` ramps ``p`` from 0 to 1.
    """

    steps: Tensor

    def __init__(
        self,
        lam: float = 1.0,
        *,
        schedule: Literal["constant", "ganin"] = "constant",
        total_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"Expected `lam` to be a finite number >= 0, found {lam!r}.")
        if schedule not in ("constant", "ganin"):
            raise ValueError(f"Expected `schedule` to be constant or ganin, found {schedule!r}.")
        if schedule == "ganin" and (total_steps is None or total_steps < 1):
            raise ValueError(f"the ganin schedule needs `total_steps` >= 1, found {total_steps!r}.")
        self.lam, self.schedule, self.total_steps = float(lam), schedule, total_steps
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        # the factor of the present step, read from the buffer once per step (not once per
        # forward pass, which would wait on the device every time)
        self._factor: float | None = None
        self.register_load_state_dict_post_hook(_forget_factor)  # type: ignore[no-untyped-call]

    def advance(self) -> None:
        """One training step done: ``p`` moves on by ``1 / total_steps``."""
        self.steps += 1
        self._factor = None

    def factor(self) -> float:
        """The current ``lambda`` (the schedule applied to the steps counted so far)."""
        if self.schedule == "constant":
            return self.lam
        if self._factor is None:
            assert self.total_steps is not None
            self._factor = self.lam * ganin_factor(int(self.steps) / self.total_steps)
        return self._factor

    def forward(self, x: Tensor) -> Tensor:
        return reverse_gradient(x, self.factor())

    def extra_repr(self) -> str:
        return f"lam={self.lam}, schedule={self.schedule!r}, total_steps={self.total_steps}"


def _forget_factor(module: nn.Module, incompatible: Any) -> None:
    """After ``load_state_dict``: the factor is read again from the loaded step count."""
    if isinstance(module, GradientReversal):
        module._factor = None


class ReversedHead(nn.Module):
    """A task's head behind a :class:`GradientReversal`: ``head(R_lambda(features))``.
    ``task``: the task whose steps move the schedule on (see :func:`advance_reversals`)."""

    def __init__(self, reversal: GradientReversal, head: nn.Module, task: str | None = None):
        super().__init__()
        self.reversal, self.head, self.task = reversal, head, task

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.reversal(x))
        return out


def reversal_schedules(model: nn.Module) -> list[tuple[str | None, GradientReversal]]:
    """Every scheduled reversal of ``model`` with the task whose steps advance it (None: any
    step), for :func:`advance_reversals`."""
    return [
        (m.task, m.reversal)
        for m in model.modules()
        if isinstance(m, ReversedHead) and m.reversal.schedule != "constant"
    ]


def advance_reversals(
    schedules: Sequence[tuple[str | None, GradientReversal]], tasks: Collection[str]
) -> None:
    """After an optimizer step on a batch holding ``tasks``: advance their schedules."""
    for task, reversal in schedules:
        if task is None or task in tasks:
            reversal.advance()
