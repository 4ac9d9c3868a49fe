"""Dynamic Weight Average (DWA): weights from the rate at which each task's loss falls."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS, BackwardContext, LossWeighting

__all__ = ["DWA"]

Mode = Literal["epoch", "window"]


@BALANCERS.register("dwa")
class DWA(LossWeighting):
    r"""Dynamic Weight Average (Liu, Johns and Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019, https://arxiv.org/abs/1803.10704).

    The total loss is ``sum_k lambda_k L_k`` with

    .. math::
        \lambda_k(t) = \frac{K \exp(w_k(t-1) / T)}{\sum_i \exp(w_i(t-1) / T)}, \qquad
        w_k(t-1) = \frac{L_k(t-1)}{L_k(t-2)},

    so the weights sum to ``K`` (the number of tasks of the method, present in the batch or
    not). A task whose loss falls more slowly gets a larger weight.

    **mode="epoch"** (default; the paper and the MTAN code): ``L_k(t)`` is the *unweighted*
    mean training loss of task ``k`` in epoch ``t``, the value the trainer passes to
    :meth:`on_epoch_end`. The weights are constant within an epoch, and ``lambda_k = 1`` in
    the first two epochs (before two means exist). The trainer's mean weighs batches by their
    number of labelled samples; the MTAN code averages batch losses with equal weight (the
    same unless the last batch is smaller or labels are missing).

    **mode="window"** (the variant in the Nash-MTL and FAMO code): the epoch means are
    replaced by means over ``window`` (= W) training iterations, recomputed every iteration.
    Each task keeps its last ``2 W`` losses in a first-in-first-out buffer initialised with
    ones; every call of :meth:`backward` first appends the step's detached loss of each
    present task, then, once more than W steps have been recorded before the current one
    (from the W + 2-th step on), sets ``w_k`` = (mean of the newest W entries) / (mean of the
    older W entries) and recomputes ``lambda`` (before that ``lambda = 1``). As in that code,
    the current step's loss is part of the newest window and the buffer's initial ones take
    part in the older window until 2 W steps have been seen. Deviation: that code returns
    ``mean_k lambda_k L_k`` (the sum divided by K); polytask uses the paper's sum.

    Missing tasks. The weights of all K tasks are computed together and a batch without
    labels for some tasks simply uses the weights of the tasks it has. In "epoch" mode a task
    with no labelled sample in an epoch (its epoch mean is NaN) keeps the ratio it had (1 if
    it never had one) until two consecutive finite means give a new one; the same holds for
    a ratio that is not finite (a zero mean loss in the denominator). In "window" mode a
    task's buffer advances only in steps where it is present, and a ratio that is not finite
    keeps its previous value (initially 1). Neither mode reads values back from the device
    during steps ("epoch" mode copies the K weights to it once per epoch).

    State: the last two epoch means, the current ratios and the number of completed epochs
    (``get_extra_state``), the window buffers (buffers of the module) and ``lambda``
    (buffer ``lambdas``), so that training resumes exactly.

    Args:
        tasks: task names.
        temperature: ``T > 0``; larger values make the weights more uniform (paper: 2).
        mode: ``"epoch"`` or ``"window"`` (see above).
        window: ``W >= 1``, the window length in iterations ("window" mode only; default 25,
            as in the Nash-MTL code).
    """

    lambdas: Tensor
    window_losses: Tensor
    window_ratios: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        temperature: float = 2.0,
        mode: Mode = "epoch",
        window: int = 25,
    ) -> None:
        super().__init__(tasks)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise ConfigError(
                f"balancer.options.temperature: expected a positive number, found {temperature!r}."
            )
        if mode not in ("epoch", "window"):
            raise ConfigError(f"balancer.options.mode: expected epoch or window, found {mode!r}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(
                f"balancer.options.window: expected a positive integer, found {window!r}."
            )
        self.temperature = float(temperature)
        self.mode: Mode = mode
        self.window = window
        k = len(self.task_names)
        self._index = {t: i for i, t in enumerate(self.task_names)}
        self.register_buffer("lambdas", torch.ones(k))
        # "epoch" mode
        self._epochs_seen = 0
        self._history: dict[str, list[float]] = {t: [] for t in self.task_names}
        self._ratios: dict[str, float] = dict.fromkeys(self.task_names, 1.0)
        # "window" mode
        self._steps = 0
        if mode == "window":
            self.register_buffer("window_losses", torch.ones(k, 2 * window))
            self.register_buffer("window_ratios", torch.ones(k))

    def extra_repr(self) -> str:
        window = f", window={self.window}" if self.mode == "window" else ""
        return f"temperature={self.temperature}, mode={self.mode!r}{window}"

    def _positions(self, losses: Mapping[str, Tensor]) -> list[int]:
        unknown = [t for t in losses if t not in self._index]
        if unknown:
            raise ValueError(
                f"DWA: unknown task(s) {unknown}; the method was built for {list(self.task_names)}."
            )
        return [self._index[t] for t in losses]

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        positions = self._positions(losses)
        if not losses:
            return {}
        first = next(iter(losses.values()))
        # a copy, so that the returned weights do not change when the buffer is updated
        lam = self.lambdas.to(device=first.device, dtype=first.dtype, copy=True)
        return {t: lam[i] for t, i in zip(losses, positions, strict=True)}

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        if self.mode == "window":
            self._record(losses)
        return super().backward(losses, ctx)

    def _softmax_weights(self, ratios: Tensor) -> Tensor:
        return len(self.task_names) * torch.softmax(ratios / self.temperature, dim=0)

    # -- "window" mode -------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, losses: Mapping[str, Tensor]) -> None:
        buffer = self.window_losses
        losses = self.reduce_losses(losses)
        for t, i in zip(losses, self._positions(losses), strict=True):
            row = buffer[i]
            row.copy_(torch.cat((row[1:], losses[t].detach().reshape(1).to(buffer.dtype))))
        if self._steps > self.window:
            w = self.window
            ratios = buffer[:, w:].mean(dim=1) / buffer[:, :w].mean(dim=1)
            ratios = torch.where(torch.isfinite(ratios), ratios, self.window_ratios)
            self.window_ratios.copy_(ratios)
            self.lambdas.copy_(self._softmax_weights(ratios))
        self._steps += 1

    # -- "epoch" mode --------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float]) -> None:
        if self.mode != "epoch":
            return
        self._epochs_seen += 1
        for t in self.task_names:
            history = self._history[t]
            history.append(float(train_losses.get(t, math.nan)))
            del history[:-2]
        if self._epochs_seen < 2:
            return
        for t in self.task_names:
            older, newer = self._history[t]
            if math.isfinite(older) and math.isfinite(newer) and older != 0:
                ratio = newer / older
                if math.isfinite(ratio):
                    self._ratios[t] = ratio
        ratios = torch.tensor([self._ratios[t] for t in self.task_names], dtype=torch.float64)
        self.lambdas.copy_(self._softmax_weights(ratios))

    # -- state ---------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "tasks": list(self.task_names),
            "mode": self.mode,
            "epochs_seen": self._epochs_seen,
            "history": {t: list(v) for t, v in self._history.items()},
            "ratios": dict(self._ratios),
            "steps": self._steps,
        }

    def set_extra_state(self, state: Any) -> None:
        if list(state["tasks"]) != list(self.task_names) or state["mode"] != self.mode:
            raise ValueError(
                f"DWA state for tasks {state['tasks']} in mode {state['mode']!r} cannot be "
                f"loaded into DWA for tasks {list(self.task_names)} in mode {self.mode!r}"
            )
        self._epochs_seen = int(state["epochs_seen"])
        self._history = {t: [float(x) for x in state["history"][t]] for t in self.task_names}
        self._ratios = {t: float(state["ratios"][t]) for t in self.task_names}
        self._steps = int(state["steps"])
