"""The balancing contract: a balancer owns the backward pass of a multi-task step.

The trainer computes one loss per task and calls :meth:`Balancer.backward` once; the balancer
decides how the per-task losses (or, for gradient methods, the per-task gradients) become the
gradients the optimizer applies. It never sees the model or the data, only what
:class:`BackwardContext` hands it.

State (running loss histories, learnable log-variances, random generators) lives in the
balancer: learnable quantities are ``nn.Parameter``\\ s of the balancer (the trainer gives them
an optimizer parameter group of their own), everything else is returned by
``get_extra_state`` so that it is saved in checkpoints and restored on resume.

Hooks the trainer calls: :meth:`~Balancer.on_epoch_start`, :meth:`~Balancer.on_epoch_end`
(with the epoch's unweighted mean training losses, for epoch-level methods such as DWA) and
:meth:`~Balancer.after_optimizer_step`.

Several processes: a method's state must stay identical on every process, so it is updated
only from global quantities. Gradient methods read the complete Jacobian
(:meth:`~polytask.balancing.gradient.GradientBalancer.synchronize`); a state update that reads
per-step losses (FAMO, GradNorm, DWA's window mode) reads them through
:meth:`~Balancer.reduce_losses`, which a multi-process trainer points at a collective by
setting :attr:`~Balancer.loss_reducer`. The epoch means given to ``on_epoch_end`` are the
trainer's, already global. Gradients of a balancer's own parameters are ordinary gradients,
reduced like the model's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models.base import RepresentationCapture
from ..registry import Registry

__all__ = ["BALANCERS", "BackwardContext", "Balancer", "LossWeighting"]


@dataclass
class BackwardContext:
    """What a balancer may use besides the losses.

    Attributes:
        shared_parameters: the parameters the architecture declares shared (or the user's
            override); gradient methods combine per-task gradients of exactly these.
        other_parameters: every other trainable parameter of the model; gradient methods
            give them the ordinary gradient of the sum of the task losses.
        grad_scaler: the fp16 loss scaler when mixed precision with loss scaling is on.
        epoch: the current epoch (0-based).
        step: the global optimizer step (0-based).
        representation: the shared-representation points of this step's forward pass,
            recorded when the balancer's ``needs_representation`` is true.
        parts: for a balancer whose :attr:`~Balancer.batch_parts` is ``P > 1``: the per-task
            losses of each of the step's disjoint parts (each a mean over its own samples,
            with its own graph), in order; the ``losses`` given to ``backward`` are then their
            sample-weighted mean, the loss of the whole batch. Empty otherwise. A step with
            fewer samples than ``P`` (the last batch of an epoch) has fewer parts.
        recompute: ``recompute(evaluation=False, part=None, values=None) -> {task: loss}``:
            the step's per-task losses recomputed on the same batch (``part=i``: on part
            ``i`` of a step in parts) by a new forward pass, with a graph unless gradients are
            disabled, under the run's autocast; the model's buffers (BatchNorm statistics)
            are read from copies, so they are left unchanged and nothing the step's own graph
            saved is written in place. At the parameters' current values, or at ``values``
            (``{parameter: tensor}``, through ``torch.func.functional_call``: the parameters
            themselves are not touched). ``evaluation=True`` runs the model in evaluation
            mode. Methods that evaluate losses at other parameter values (SAMO, Auto-Lambda)
            use it. None outside a trainer.
        learning_rate: ``learning_rate(param) -> (lr, weight_decay)``: the current values of
            the optimizer group that trains ``param`` (for methods that simulate an optimizer
            step, such as Auto-Lambda's look-ahead); None outside a trainer.
    """

    shared_parameters: Sequence[nn.Parameter]
    other_parameters: Sequence[nn.Parameter] = ()
    grad_scaler: torch.amp.GradScaler | None = None
    epoch: int = 0
    step: int = 0
    representation: RepresentationCapture | None = None
    parts: Sequence[Mapping[str, Tensor]] = ()
    recompute: Callable[..., dict[str, Tensor]] | None = None
    learning_rate: Callable[[Tensor], tuple[float, float]] | None = None

    def scale(self, loss: Tensor) -> Tensor:
        """``loss`` multiplied by the loss scale (unchanged without a scaler)."""
        return loss if self.grad_scaler is None else self.grad_scaler.scale(loss)


class Balancer(nn.Module, ABC):
    """Base class of every balancing method (loss weighting or gradient aggregation).

    Args:
        tasks: the task names, in a fixed order used for any tensor of per-task values.
    """

    #: learning rate of the balancer's own parameters (None: the model's learning rate)
    lr: float | None = None

    #: set by a multi-process trainer: maps this process's per-task losses to their means
    #: over all processes (see :meth:`reduce_losses`); None in a single process
    loss_reducer: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a balancer needs at least one task")
        self.task_names: tuple[str, ...] = tuple(tasks)

    @abstractmethod
    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        """Accumulate the step's gradients into ``.grad``; return the weight used per task.

        ``losses`` holds the tasks that have labels in this batch (a subset of
        :attr:`task_names` when labels are missing). The returned weights are detached
        0-d tensors (no device synchronisation); they are logged as diagnostics.
        """

    #: whether the trainer must record the shared representation (feature-level methods)
    needs_representation: bool = False

    def diagnostics(self) -> Mapping[str, Tensor]:
        """Per-step diagnostics of the last backward (e.g. ``"gramian"``: K x K, detached)."""
        return {}

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the first step of every epoch."""

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float]) -> None:
        """Called after every epoch with the unweighted mean training loss of each task."""

    def on_structure_changed(self) -> None:
        """Called when the model's structure changed during training (an architecture that
        grows, such as ``fafs``): the shared parameters, and the representation's width, are
        new, so state sized to the old ones no longer applies. Methods holding such state
        start it again here; the rest (task weights, step counts) carries on."""

    #: into how many disjoint parts the trainer cuts every step's batch, forwarding each part
    #: on its own (``BackwardContext.parts``): methods that need independent gradient samples
    #: per step (MoDo, SDMGrad) set it above 1; the step's samples and forward work stay
    #: those of one batch
    batch_parts: int = 1

    #: whether :meth:`after_optimizer_step` needs the losses of the same batch recomputed
    #: with the updated parameters (FAMO); costs one extra forward pass per step
    needs_post_step_losses: bool = False

    def after_optimizer_step(self, losses: Mapping[str, Tensor] | None = None) -> None:
        """Called after every optimizer step.

        ``losses`` are the step's tasks' losses on the same batch after the update (detached),
        given only when :attr:`needs_post_step_losses` is true.
        """

    def reduce_losses(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The detached per-task losses a state update may read: their means over all
        training processes (this process's values in a single process).

        Every method whose state follows the losses of a step calls this, so that the state
        stays identical on every process; :attr:`loss_reducer` does the reduction.
        """
        detached = {t: v.detach() for t, v in losses.items()}
        reducer = self.loss_reducer
        if reducer is None:
            return detached
        reduced = dict(reducer(detached))
        if reduced.keys() != detached.keys():
            raise ValueError(
                f"loss_reducer returned tasks {sorted(reduced)} for losses of {sorted(detached)}"
            )
        return reduced

    def get_extra_state(self) -> dict[str, Any]:
        """Non-tensor state (histories, counters) saved with checkpoints; override to add."""
        return {}

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned."""


class LossWeighting(Balancer):
    """A balancer that scales each task's loss: ``backward(sum_k w_k L_k)``.

    Subclasses implement :meth:`weights`; weights may depend on learnable parameters of the
    balancer (then they carry gradient to them) or on its state.
    """

    @abstractmethod
    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The weight of each task in ``losses``."""

    def combine(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total loss and the (detached) weights."""
        weights = self.weights(losses)
        total = torch.stack([weights[t] * losses[t] for t in losses]).sum()
        return total, {t: w.detach() for t, w in weights.items()}

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        total, weights = self.combine(losses)
        ctx.scale(total).backward()  # type: ignore[no-untyped-call]
        return weights


BALANCERS: Registry[Callable[..., Balancer]] = Registry("balancing method")
"""``factory(*, tasks, **options) -> Balancer``."""
