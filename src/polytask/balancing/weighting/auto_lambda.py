"""Auto-Lambda: task weights learned by a one-step look-ahead on another batch (bilevel)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from ..aggregation._common import check_number_option, task_indices
from ..base import BALANCERS, BackwardContext, Balancer

__all__ = ["AutoLambda"]


@BALANCERS.register("auto_lambda")
class AutoLambda(Balancer):
    r"""Auto-Lambda (Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task
    Relationships", TMLR 2022; official code ``lorenmt/auto-lambda``). The loss is
    ``sum_k lambda_k L_k`` with weights ``lambda`` learned so that one training step with them
    lowers the *primary* tasks' loss on other data:

    .. math::
        \min_\lambda \sum_{k \in P} L_k(\theta - \alpha \nabla_\theta \textstyle\sum_j
        \lambda_j L_j(\theta; x_{tr}); x_{val}).

    Per step, as the official trainer (``trainer_dense.py``, ``auto_lambda.py``):

    1. the look-ahead ``theta' = theta - alpha (g + wd theta)`` with ``g`` the gradient of
       ``sum_j lambda_j L_j`` on the first batch (every trained parameter; ``alpha`` and ``wd``
       the current learning rate and weight decay of each parameter's optimizer group);
    2. ``d``, the gradient at ``theta'`` of the primary tasks' summed loss on the second batch;
    3. the meta-gradient by the finite-difference approximation of DARTS:
       ``dlambda_k = -alpha (L_k(theta + e d) - L_k(theta - e d)) / (2 e)`` on the first batch,
       ``e = 0.01 / ||d||``;
    4. one Adam step on ``lambda`` (learning rate ``meta_lr``), then the network's backward of
       ``sum_k lambda_k L_k`` on the whole step with the *updated* weights (the official order:
       the meta step comes first).

    The batches: the official code draws the second ("validation") batch from another
    shuffled pass over the *training* set. Here the method asks for two parts of each step
    (``batch_parts = 2``; see :attr:`polytask.balancing.base.BackwardContext.parts`): the
    look-ahead and the finite differences use the first half, the primary loss the second,
    and the network is updated on the whole step. So each meta batch is half the size of the
    official one, and the two halves never share a sample.

    Defaults are the official ones: ``init = 0.1`` for every weight, ``meta_lr = 1e-4``
    (Adam, torch's betas and epsilon), all tasks primary (the multi-task setting; ``primary``
    names the tasks whose validation loss counts, the auxiliary-learning setting).

    Deviations: the official look-ahead adds SGD's momentum buffer; here the balancer does not
    see optimizer state, so the look-ahead is plain SGD with weight decay (the same when the
    run's optimizer has no momentum); ``alpha`` in step 3 is the learning rate of the first
    shared parameter's group; the losses at ``theta'`` and ``theta +- e d`` are evaluated at
    those values without changing the parameters (the official code copies the model, and
    adds and subtracts ``e d`` in place, which leaves rounding errors). Weights of tasks absent from a step
    (missing labels) and their Adam moments do not move. One process only: the look-ahead's
    directions are not synchronised across processes.

    Cost per step: 3 forward passes of half a batch (the look-ahead loss, the perturbed losses
    twice: forward only) besides the step's own, and 2 extra backward passes (the
    look-ahead's gradient of every parameter, the primary loss at ``theta'``), so about three
    times equal weighting.

    Args:
        tasks: task names.
        init: the initial weight of every task.
        meta_lr: Adam's learning rate for the weights, ``> 0``.
        primary: the tasks whose loss on the second batch is minimised (None: all).
    """

    batch_parts = 2

    def __init__(
        self,
        tasks: Sequence[str],
        init: float = 0.1,
        meta_lr: float = 1e-4,
        primary: Sequence[str] | None = None,
    ) -> None:
        super().__init__(tasks)
        self.init = check_number_option("init", init)
        self.meta_lr = check_number_option("meta_lr", meta_lr, low=0.0)
        if self.meta_lr == 0.0:
            raise ConfigError(
                f"balancer.options.meta_lr: expected a number > 0, found {meta_lr!r}."
            )
        if primary is not None:
            unknown = sorted(set(primary) - set(self.task_names))
            if unknown or not primary:
                raise ConfigError(
                    f"balancer.options.primary: expected task names of {list(self.task_names)}, "
                    f"found {list(primary)!r}."
                )
        self.primary: tuple[str, ...] = tuple(primary) if primary is not None else self.task_names
        k = len(self.task_names)
        #: the weights lambda and Adam's moments (float32, as the official code)
        self.lambdas = torch.full((k,), self.init)
        self._m = torch.zeros(k)
        self._v = torch.zeros(k)
        #: Adam's step count per task
        self._t = torch.zeros(k, dtype=torch.long)

    def extra_repr(self) -> str:
        return f"init={self.init}, meta_lr={self.meta_lr}, primary={list(self.primary)}"

    def meta_gradient(self, ctx: BackwardContext, names: Sequence[str]) -> Tensor | None:
        """The meta-gradient of the present tasks' weights (steps 1-3), or None when the step
        has a single part (a batch of one sample), no primary task is present or a value on
        the way is not finite (an overflow under a loss scaler, which then skips the step:
        the weights and Adam's moments are left as they were, not made NaN for good)."""
        parts = list(ctx.parts)
        primary = [t for t in names if t in self.primary]
        if len(parts) < 2 or not primary:
            return None
        if ctx.recompute is None or ctx.learning_rate is None:
            raise ConfigError("auto_lambda needs a trainer step that can recompute its losses.")
        params = [p for p in (*ctx.shared_parameters, *ctx.other_parameters) if p.requires_grad]
        scale = ctx.grad_scaler.get_scale() if ctx.grad_scaler is not None else 1.0
        index = task_indices(self.task_names, names)
        lam = self.lambdas[index]
        first = parts[0]
        weighted = torch.stack(
            [lam[i].to(first[t].device, first[t].dtype) * first[t] for i, t in enumerate(names)]
        ).sum()
        # the first part's graph is kept: the network's backward below goes through it too
        grads = torch.autograd.grad(
            ctx.scale(weighted), params, retain_graph=True, allow_unused=True
        )
        rates = [ctx.learning_rate(p) for p in params]
        alpha = rates[0][0]
        with torch.no_grad():  # 1. the look-ahead theta' (the parameters are not touched)
            ahead = [
                p - lr * (p * wd if g is None else g / scale + p * wd)
                for p, g, (lr, wd) in zip(params, grads, rates, strict=True)
            ]
        ahead = [a.requires_grad_(True) for a in ahead]
        # 2. the primary loss at theta', on the second part
        second = ctx.recompute(part=1, values=dict(zip(params, ahead, strict=True)))
        meta = torch.stack([second[t] for t in primary]).sum()
        d = torch.autograd.grad(ctx.scale(meta), ahead, allow_unused=True)
        d = tuple(None if x is None else x / scale for x in d)
        present = [x for x in d if x is not None]
        norm = (
            float(torch.stack([(x.double() ** 2).sum() for x in present]).sum().sqrt())
            if present
            else 0.0
        )
        if not math.isfinite(norm):
            return None
        if norm == 0.0:
            return torch.zeros(len(names))
        e = 0.01 / norm
        values = []
        with torch.no_grad():  # 3. the losses at theta +- e d, for the finite difference
            for sign in (1.0, -1.0):
                moved = {
                    p: p if x is None else p + sign * e * x for p, x in zip(params, d, strict=True)
                }
                values.append(ctx.recompute(part=0, values=moved))
        plus, minus = values
        hessian = torch.stack([(plus[t] - minus[t]).float().cpu() / (2 * e) for t in names])
        return -alpha * hessian if bool(torch.isfinite(hessian).all()) else None

    def _adam(self, index: Sequence[int], grad: Tensor) -> None:
        """One Adam step (torch's betas 0.9, 0.999 and epsilon 1e-8) on the given weights."""
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        i = torch.tensor(list(index))
        self._t[i] += 1
        t = self._t[i].double()
        self._m[i] = beta1 * self._m[i] + (1 - beta1) * grad
        self._v[i] = beta2 * self._v[i] + (1 - beta2) * grad * grad
        bias1 = (1 - beta1**t).float()
        bias2 = (1 - beta2**t).float()
        denom = self._v[i].sqrt() / bias2.sqrt() + eps
        self.lambdas[i] = self.lambdas[i] - (self.meta_lr / bias1) * self._m[i] / denom

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        if self.loss_reducer is not None:
            raise ConfigError(
                "auto_lambda trains on one process only: its look-ahead directions are not "
                "synchronised across processes."
            )
        names = list(losses)
        index = task_indices(self.task_names, names)
        grad = self.meta_gradient(ctx, names)
        if grad is not None:
            self._adam(index, grad)
        lam = self.lambdas[index]
        total = torch.stack(
            [lam[i].to(losses[t].device, losses[t].dtype) * losses[t] for i, t in enumerate(names)]
        ).sum()
        ctx.scale(total).backward()  # type: ignore[no-untyped-call]
        return {t: lam[i].detach().clone() for i, t in enumerate(names)}

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "lambdas": self.lambdas.clone(),
            "m": self._m.clone(),
            "v": self._v.clone(),
            "t": self._t.clone(),
        }

    def set_extra_state(self, state: Any) -> None:
        k = len(self.task_names)
        for key in ("lambdas", "m", "v", "t"):
            value = state.get(key)
            if not isinstance(value, Tensor) or value.shape != (k,):
                raise ValueError(f"balancer state {key!r}: expected {k} values, found {value!r}")
        self.lambdas = state["lambdas"].float().clone()
        self._m = state["m"].float().clone()
        self._v = state["v"].float().clone()
        self._t = state["t"].long().clone()
