"""STCH: the smooth Tchebycheff scalarisation of the normalised log-losses."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ...errors import ConfigError, did_you_mean
from ..base import BALANCERS, LossWeighting

__all__ = ["STCH"]


def _positive(key: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"balancer.options.{key}: expected a finite number > 0, found {value!r}.")
    return float(value)


@BALANCERS.register("stch")
class STCH(LossWeighting):
    r"""Smooth Tchebycheff scalarisation (Lin et al., "Smooth Tchebycheff
    Scalarization for Multi-Objective Optimization", ICML 2024,
    https://arxiv.org/abs/2402.19078; multi-task code https://github.com/Xi-L/STCH,
    ``STCH_MTL``).

    The paper's scalarisation of objectives ``f_k`` with preference ``lambda`` and ideal
    point ``z`` is ``mu log sum_k exp(lambda_k (f_k - z_k) / mu)``: a smooth maximum that
    tends to the Tchebycheff scalarisation ``max_k lambda_k (f_k - z_k)`` as the smoothing
    ``mu -> 0``. Its multi-task experiments apply it to the logarithms of the losses
    normalised by a *nadir* vector ``n`` estimated during a warm-up; polytask implements
    exactly that procedure:

    1. **Warm-up**, epochs ``0 .. warmup_epoch``: the model is trained on
       ``sum_k log(L_k + eps)``.
    2. **Normaliser**: ``n_k`` is the mean training loss of task ``k`` over epoch
       ``warmup_epoch`` (the last warm-up epoch; the trainer's unweighted epoch mean,
       already reduced over processes).
    3. From epoch ``warmup_epoch + 1`` on, with ``u_k = lambda_k log(L_k / n_k + eps)``,

       .. math::
           L = K \mu \log \sum_k \exp(u_k / \mu)

       (computed as a log-sum-exp, stable for any ``mu``). In the paper's notation the
       objectives are ``f_k = log L_k`` and the ideal point is ``z_k = log n_k``; ``K`` is a
       constant factor of the official code (the number of tasks).

    The weights returned for logging are the effective multipliers ``dL / dL_k``:
    ``1 / (L_k + eps)`` during the warm-up, then
    ``K softmax(u / mu)_k lambda_k / (L_k + eps n_k)``.

    Defaults: ``mu = 1`` and ``warmup_epoch = 0`` (normaliser from the first epoch; the
    official code takes both from its command line, ``--STCH_mu`` and
    ``--STCH_warmup_epoch``, with the same meaning of ``warmup_epoch``); ``eps = 1e-20`` as
    in the official code; ``preference`` is ``lambda``, 1 for every task by default (the
    official multi-task code has no preference; any positive ``lambda`` is the paper's
    general form).

    Conventions and deviations:

    - The official code averages the batch losses of the warm-up epoch itself; polytask
      takes the trainer's epoch means of the same losses (identical for equal batches).
    - A task whose epoch mean is not a positive finite number (no labels in that epoch, or a
      zero loss) gets its normaliser from the next epoch that has one; the warm-up
      objective continues until every task has one.
    - **Missing tasks**: the log-sum-exp runs over the tasks present in the batch (``K``
      stays the number of tasks).
    - A loss with ``L_k + eps <= 0`` is a :class:`~polytask.errors.ConfigError`; the check
      reads one boolean from the device per step.

    The normalisers are a buffer of the module: saved in checkpoints, the same on every
    process.

    Args:
        tasks: task names.
        mu: the smoothing parameter ``mu > 0``.
        warmup_epoch: the last warm-up epoch (0-based), ``>= 0``.
        preference: ``{task: lambda_k > 0}`` for any of the tasks (others 1).
        eps: added inside the logarithms, ``>= 0``.
    """

    nadir: Tensor
    preference: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        mu: float = 1.0,
        warmup_epoch: int = 0,
        preference: Mapping[str, float] | None = None,
        eps: float = 1e-20,
    ) -> None:
        super().__init__(tasks)
        self.mu = _positive("mu", mu)
        if isinstance(warmup_epoch, bool) or not isinstance(warmup_epoch, int) or warmup_epoch < 0:
            raise ConfigError(
                f"balancer.options.warmup_epoch: expected an integer >= 0, found {warmup_epoch!r}."
            )
        self.warmup_epoch = warmup_epoch
        if (
            isinstance(eps, bool)
            or not isinstance(eps, (int, float))
            or not math.isfinite(eps)
            or eps < 0
        ):
            raise ConfigError(f"balancer.options.eps: expected a number >= 0, found {eps!r}.")
        self.eps = float(eps)
        lambdas = [1.0] * len(self.task_names)
        if preference is not None:
            if not isinstance(preference, Mapping):
                raise ConfigError(
                    f"balancer.options.preference: expected {{task: weight}}, found {preference!r}."
                )
            for name, value in preference.items():
                if name not in self.task_names:
                    raise ConfigError(
                        f"balancer.options.preference: unknown task {name!r}."
                        f"{did_you_mean(str(name), self.task_names)} The tasks are "
                        f"{', '.join(self.task_names)}."
                    )
                lambdas[self.task_names.index(name)] = _positive(f"preference.{name}", value)
        self._index = {t: i for i, t in enumerate(self.task_names)}
        self.register_buffer("preference", torch.tensor(lambdas, dtype=torch.float64))
        self.register_buffer(
            "nadir", torch.full((len(self.task_names),), math.nan, dtype=torch.float64)
        )

    def extra_repr(self) -> str:
        return f"mu={self.mu}, warmup_epoch={self.warmup_epoch}, eps={self.eps}"

    @property
    def warming_up(self) -> bool:
        """Whether some task still lacks its normaliser (the log-sum objective is used)."""
        return bool(torch.isnan(self.nadir).any())

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float]) -> None:
        if epoch < self.warmup_epoch or not self.warming_up:
            return
        for t, i in self._index.items():
            value = train_losses.get(t, math.nan)
            if math.isnan(float(self.nadir[i])) and math.isfinite(value) and value > 0:
                self.nadir[i] = float(value)

    def _ordered(self, losses: Mapping[str, Tensor]) -> list[str]:
        unknown = [t for t in losses if t not in self._index]
        if unknown:
            raise ValueError(
                f"STCH: unknown task(s) {unknown}; the method was built for {list(self.task_names)}."
            )
        return sorted(losses, key=self._index.__getitem__)

    def _terms(self, losses: Mapping[str, Tensor], names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """The differentiable objective and its detached derivatives by the losses."""
        values = torch.stack([losses[t] for t in names])
        dtype = values.dtype
        index = [self._index[t] for t in names]
        if self.warming_up:
            shifted = values + self.eps
            self._check(shifted, names)
            return torch.log(shifted).sum(), (1.0 / shifted).detach()
        nadir = self.nadir[index].to(device=values.device, dtype=dtype)
        lambdas = self.preference[index].to(device=values.device, dtype=dtype)
        shifted = values / nadir + self.eps
        self._check(shifted, names)
        u = lambdas * torch.log(shifted)
        k = len(self.task_names)
        total = k * self.mu * torch.logsumexp(u / self.mu, dim=0)
        soft = torch.softmax(u.detach() / self.mu, dim=0)
        return total, (k * soft * lambdas / (shifted.detach() * nadir))

    @staticmethod
    def _check(shifted: Tensor, names: Sequence[str]) -> None:
        if bool((shifted.detach() <= 0).any()):  # one synchronisation per step
            bad = [t for t, v in zip(names, shifted.tolist(), strict=True) if v <= 0]
            raise ConfigError(
                f"balancer.name=stch takes the logarithm of the loss, which is not positive for "
                f"task(s) {bad}; use a non-negative loss or a larger balancer.options.eps."
            )

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The effective multipliers ``dL / dL_k`` (detached)."""
        names = self._ordered(losses)
        if not names:
            return {}
        _, derivatives = self._terms({t: losses[t].detach() for t in names}, names)
        by_task = dict(zip(names, derivatives, strict=True))
        return {t: by_task[t] for t in losses}

    def combine(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        names = self._ordered(losses)
        total, derivatives = self._terms(losses, names)
        by_task = dict(zip(names, derivatives, strict=True))
        return total, {t: by_task[t] for t in losses}
