"""Fast Adaptive Multitask Optimization (FAMO): balanced log-loss decrease from loss values only."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS, BackwardContext, LossWeighting

__all__ = ["FAMO"]

#: Adam's constants for the logits (torch defaults, as in the official code)
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


def _nonnegative(key: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"balancer.options.{key}: expected a number >= 0, found {value!r}.")
    return float(value)


def _finite(key: str, value: object) -> float:
    """A finite number (lower bounds may be negative, e.g. for log-likelihood losses)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"balancer.options.{key}: expected a finite number, found {value!r}.")
    return float(value)


@BALANCERS.register("famo")
class FAMO(LossWeighting):
    r"""Fast Adaptive Multitask Optimization (Liu, Feng, Stone and Liu, "FAMO: Fast Adaptive
    Multitask Optimization", NeurIPS 2023, https://arxiv.org/abs/2306.03792, Algorithm 1 and
    its practical form, Algorithm 2 in Appendix C; official code
    https://github.com/Cranial-XIX/FAMO).

    FAMO keeps task logits ``xi`` (K values, initially 0) and weights ``z = softmax(xi)``.
    With ``D_k = L_k - b_k + eps`` (``b`` = ``min_losses``, a lower bound of each loss) a
    training step minimises

    .. math::
        c \sum_k z_k \log D_k, \qquad c = \Big(\sum_k \frac{z_k}{D_k}\Big)^{-1}
        \ \text{(a constant in the backward pass)},

    so the model's gradient is ``sum_k (c z_k / D_k) grad L_k``: a convex combination of the
    task gradients. The weights returned for logging are these effective multipliers
    ``c z_k / D_k`` (they sum to 1). The backward pass differentiates the log form above,
    as the official code does.

    After the optimizer step the trainer recomputes the losses of the same batch
    (:attr:`needs_post_step_losses`) and passes them to :meth:`after_optimizer_step`, which
    measures ``delta_k = log D_k(before) - log D_k(after)`` and updates the logits with the
    gradient ``J_z^T delta + gamma xi``, where ``J_z = diag(z) - z z^T`` is the Jacobian of the
    softmax (so ``J_z^T delta = z * (delta - z . delta)``; tasks whose loss fell more lose
    weight). Algorithm 1 of the paper writes a plain gradient step with decay ``gamma``; its
    Algorithm 2 and the official code feed that gradient to Adam (betas 0.9 / 0.999, eps 1e-8,
    ``gamma`` as Adam's L2 ``weight_decay``), and so does polytask. The Adam step is
    implemented in the method so that its state (logits, moments, step counts) lives in the
    module's buffers and is checkpointed.

    Missing tasks: ``z`` is the softmax over the logits of the tasks present in the batch,
    and only the logits (and Adam moments and step counts) of tasks present both before and
    after the step are updated; the others are left untouched (a "lazy" Adam with a step
    count per task). When every task is always present this is exactly ``torch.optim.Adam``.

    Where it may differ from the official code:

    - ``gamma`` defaults to 1e-3, the value of Algorithm 2 (and TorchJD's default);
      the official code's ``FAMO`` class defaults to 1e-5 and its experiments' command line
      to 0.01: set ``balancer.options.gamma`` to reproduce a particular run.
    - The official ``backward`` calls gradient clipping *before* ``loss.backward()`` (a
      no-op); polytask does not clip here (use ``optim.grad_clip``).
    - The losses after the step are computed by the trainer with the model in training mode
      and without gradients, as in the official NYUv2 trainer (batch-norm statistics are
      updated by that second forward pass in both).
    - With fp16 loss scaling, a step the scaler skips still updates the logits (with
      ``delta = 0`` only the decay and Adam's momentum move them).
    - A loss with ``L_k - b_k + eps <= 0`` raises a :class:`~polytask.errors.ConfigError`
      (the official code would produce NaN); the check reads one boolean from the device
      per step, after the trainer has already synchronised on the same losses.

    Args:
        tasks: task names.
        gamma: decay of the logits (Adam's weight decay), >= 0.
        lr: learning rate of the logits' Adam (0.025 in the paper and the official code).
            It is an option of this method, not of the trainer's optimizer: the logits are
            not ``nn.Parameter``\ s and ``balancer.lr`` does not apply to them.
        min_losses: the lower bound ``b`` of every loss, or ``{task: bound}`` (others 0).
        eps: the constant ``eps`` added inside the logarithm (official code: 1e-8), >= 0.
    """

    needs_post_step_losses = True
    #: learning rate of the logits' own Adam (the ``lr`` option)
    lr: float = 0.025

    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_steps: Tensor
    min_losses: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        gamma: float = 1e-3,
        lr: float = 0.025,
        min_losses: float | Mapping[str, float] = 0.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks)
        self.gamma = _nonnegative("gamma", gamma)
        self.lr = _nonnegative("lr", lr)
        self.eps = _nonnegative("eps", eps)
        if isinstance(min_losses, Mapping):
            unknown = [t for t in min_losses if t not in self.task_names]
            if unknown:
                raise ConfigError(
                    f"balancer.options.min_losses: unknown task(s) {unknown}; tasks are "
                    f"{list(self.task_names)}."
                )
            bounds = [_finite(f"min_losses.{t}", min_losses.get(t, 0.0)) for t in self.task_names]
        else:
            bounds = [_finite("min_losses", min_losses)] * len(self.task_names)
        k = len(self.task_names)
        self._index = {t: i for i, t in enumerate(self.task_names)}
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("exp_avg", torch.zeros(k))
        self.register_buffer("exp_avg_sq", torch.zeros(k))
        self.register_buffer("adam_steps", torch.zeros(k, dtype=torch.int64))
        self.register_buffer("min_losses", torch.tensor(bounds, dtype=torch.float32))
        self._before: dict[str, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, lr={self.lr}, eps={self.eps}"

    def _ordered(self, names: Iterable[str]) -> list[str]:
        """``names`` in the order of ``tasks``, so that the order of a mapping cannot change
        a rounding."""
        names = list(names)
        unknown = [t for t in names if t not in self._index]
        if unknown:
            raise ValueError(
                f"FAMO: unknown task(s) {unknown}; the method was built for {list(self.task_names)}."
            )
        return sorted(names, key=self._index.__getitem__)

    def _shifted(self, losses: Mapping[str, Tensor], names: Sequence[str], detach: bool) -> Tensor:
        """``D_k = L_k - b_k + eps`` of ``names`` in that order, in the losses' dtype."""
        values = torch.stack([losses[t].detach() if detach else losses[t] for t in names])
        bounds = torch.stack([self.min_losses[self._index[t]] for t in names]).to(values.dtype)
        shifted = values - bounds + self.eps
        if bool((shifted <= 0).any()):  # see the class docstring: one synchronisation per step
            bad = [t for t, v in zip(names, shifted.tolist(), strict=True) if v <= 0]
            raise ConfigError(
                f"balancer.name=famo needs L - min_losses + eps > 0; it is not for task(s) "
                f"{bad}. Lower balancer.options.min_losses or use a non-negative loss."
            )
        return shifted

    def _softmax(self, names: Sequence[str], dtype: torch.dtype) -> Tensor:
        """``z``: the softmax of the logits of ``names``, in that order."""
        logits = torch.stack([self.logits[self._index[t]] for t in names])
        return torch.softmax(logits.to(dtype), dim=0)

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The effective multipliers ``c z_k / D_k`` (detached; they sum to 1)."""
        names = self._ordered(losses)
        if not names:
            return {}
        shifted = self._shifted(losses, names, detach=True)
        w = self._softmax(names, shifted.dtype) / shifted
        weights = dict(zip(names, w / w.sum(), strict=True))
        return {t: weights[t] for t in losses}

    def combine(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        names = self._ordered(losses)
        shifted = self._shifted(losses, names, detach=False)
        z = self._softmax(names, shifted.dtype)
        c = 1.0 / (z / shifted.detach()).sum()
        total = (c * z * torch.log(shifted)).sum()
        weights = dict(zip(names, (c * z / shifted.detach()).detach(), strict=True))
        return total, {t: weights[t] for t in losses}

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        weights = super().backward(losses, ctx)
        self._before = self.reduce_losses(losses)
        return weights

    @torch.no_grad()
    def after_optimizer_step(self, losses: Mapping[str, Tensor] | None = None) -> None:
        """Update the logits from the losses of the same batch after the optimizer step."""
        if losses is None:
            raise ValueError(
                "FAMO.after_optimizer_step needs the losses of the same batch after the "
                "optimizer step (needs_post_step_losses is true)."
            )
        if self._before is None:
            raise ValueError("FAMO.after_optimizer_step was called before FAMO.backward.")
        before, self._before = self._before, None
        losses = self.reduce_losses(losses)
        names = self._ordered(t for t in before if t in losses)
        if not names:
            return
        delta = torch.log(self._shifted(before, names, detach=True)) - torch.log(
            self._shifted(losses, names, detach=True)
        )
        delta = delta.to(self.logits.dtype)
        z = self._softmax(names, self.logits.dtype)
        positions = [self._index[t] for t in names]
        logits = torch.stack([self.logits[i] for i in positions])
        grad = z * (delta - (z * delta).sum()) + self.gamma * logits
        self._adam_step(positions, logits, grad)

    def _adam_step(self, positions: Sequence[int], param: Tensor, grad: Tensor) -> None:
        """One ``torch.optim.Adam`` step (L2 decay already in ``grad``) on some logits."""
        steps = torch.stack([self.adam_steps[i] for i in positions]) + 1
        m = torch.stack([self.exp_avg[i] for i in positions])
        v = torch.stack([self.exp_avg_sq[i] for i in positions])
        m = m.lerp(grad, 1 - _BETA1)
        v = v * _BETA2 + (1 - _BETA2) * grad * grad
        exponent = steps.to(param.dtype)
        bias1 = 1 - torch.pow(_BETA1, exponent)
        bias2_sqrt = torch.sqrt(1 - torch.pow(_BETA2, exponent))
        param = param - (self.lr / bias1) * m / (v.sqrt() / bias2_sqrt + _ADAM_EPS)
        for j, i in enumerate(positions):
            self.logits[i] = param[j]
            self.exp_avg[i] = m[j]
            self.exp_avg_sq[i] = v[j]
            self.adam_steps[i] = steps[j]
