"""MoDo and SDMGrad: simplex weights moved with gradients of independent samples.

Both methods move the task weights ``lambda`` along an unbiased estimate of the gradient of
``1/2 ||sum_k lambda_k g_k||^2``, which is ``J^T J lambda`` for the expected Jacobian ``J``:
the product ``J(z1) J(z2)^T`` of the Jacobians of two *independent* samples has that
expectation, where one sample's ``J(z) J(z)^T`` does not (*double sampling*). The model then
moves along ``J(z3)^T lambda`` with a third sample, so that the update is independent of the
weights.

How a step provides the samples: the method sets ``batch_parts`` (option ``samples``, 3 by
default; 2 to reuse the weights' samples for the update), and the trainer cuts each step's
batch into that many disjoint contiguous parts, forwarding each on its own
(:attr:`polytask.balancing.base.BackwardContext.parts`). The samples per step, and so the
epoch, stay those of one batch; each part is a third (a half) of it.

Cost per step, at the parameter level (the only level: double sampling needs parameter
gradients of separate batches): the forward work of one batch, and K backward passes per
part, each through a part of the batch, so about the K backward passes of one full-batch
gradient method plus the fixed cost of 3 K passes instead of K; memory: three K x |S|
Jacobians instead of one. With several processes each part's Jacobian is made global by
its own collective (3 per step instead of 1).

A step with fewer samples than parts (the last, short batch of an epoch) gets fewer parts:
with 2 the update uses both (the mean of their rows), with 1 the weights' estimate is the
biased ``J J^T`` of that part.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS, BackwardContext
from ..gradient import GradientBalancer, one_blas_thread
from ._common import check_int_option, check_number_option, task_indices
from .moco import project_to_simplex

__all__ = ["MoDo", "SDMGrad", "cross_product", "row_dots"]

Samples = Literal[2, 3]

# float64 column block of the cross product (4 MiB per factor)
_BLOCK_ELEMENTS = 1 << 19


def cross_product(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right.T`` accumulated in float64, by column blocks (no whole float64 copy)."""
    k, n = left.shape
    out = torch.zeros((k, right.shape[0]), dtype=torch.float64, device=left.device)
    width = min(max(n, 1), max(1024, _BLOCK_ELEMENTS // max(k, 1)))
    for start in range(0, n, width):
        out.addmm_(
            left[:, start : start + width].double(), right[:, start : start + width].double().T
        )
    return out


def row_dots(left: Tensor, right: Tensor) -> Tensor:
    """``(left * right).sum(1)``, row by row, accumulated in float64 by column blocks: the
    diagonal of :func:`cross_product` at ``K N`` instead of ``K^2 N`` work."""
    k, n = left.shape
    out = torch.zeros(k, dtype=torch.float64, device=left.device)
    width = min(max(n, 1), max(1024, _BLOCK_ELEMENTS // max(k, 1)))
    for start in range(0, n, width):
        block = left[:, start : start + width].double()
        out += (block * right[:, start : start + width].double()).sum(dim=1)
    return out


class DoubleSampling(GradientBalancer):
    """Base of the double-sampling methods: the Jacobians of the step's parts, the weights
    from the first two (:meth:`update_weights`), the update from the third.

    Args:
        tasks: task names.
        samples: 3 (the weights from parts 1 and 2, the update from part 3) or 2 (the update
            from the mean of both parts' rows).
        level: ``"parameter"`` only.
    """

    def __init__(self, tasks: Sequence[str], samples: Samples = 3, level: str = "parameter"):
        if level != "parameter":
            raise ConfigError(
                f"balancer.options.level: {type(self).__name__} needs the parameter gradients of "
                f"independent samples; only level=parameter is possible, found {level!r}."
            )
        super().__init__(tasks, "parameter")
        if samples not in (2, 3) or isinstance(samples, bool):
            raise ConfigError(f"balancer.options.samples: expected 2 or 3, found {samples!r}.")
        self.samples: int = int(samples)
        self.batch_parts = self.samples
        #: the weights' state (float64, on the simplex, one per task)
        k = len(self.task_names)
        self.lambdas = torch.full((k,), 1.0 / k, dtype=torch.float64)
        #: the number of steps taken
        self.step_count = 0

    def cost(self, name: str) -> str:
        k = len(self.task_names)
        return (
            f"{name}: each batch cut into {self.samples} independent parts; {k} backward passes "
            f"per part through the shared parameters (about {k} full-batch ones) and "
            f"{self.samples} Jacobians of {k} rows (docs/balancing.md#stochastic-multi-objective"
            "-methods)."
        )

    @abstractmethod
    def update_weights(self, cross: Tensor, current: Tensor) -> tuple[Tensor, Tensor]:
        """From ``A = J(z1) J(z2)^T`` (float64, the present tasks) and their current state
        (summing to 1): ``(new state, weights of the update)``."""

    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        """One sample for everything (the biased single-sample form; used when a step has
        one part, and for direct calls)."""
        return self._combine(jacobian, jacobian, jacobian, tasks)

    def _combine(
        self, first: Tensor, second: Tensor, update: Tensor, tasks: Sequence[str]
    ) -> tuple[Tensor, Tensor]:
        index = task_indices(self.task_names, tasks)
        present = torch.tensor(index)
        lambdas = self.lambdas.clone()
        mass = float(lambdas[present].sum())
        current = lambdas[present] / mass if mass > 0 else torch.full((len(index),), 1 / len(index))
        state, weights = self.update_weights(cross_product(first, second).cpu(), current.double())
        lambdas[present] = state * (mass if mass > 0 else 1.0)
        self.lambdas = lambdas
        self.step_count += 1
        w = weights.to(device=update.device, dtype=update.dtype)
        return w @ update, w

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        names = list(losses)
        parts = list(ctx.parts) or [losses]
        update_part = len(parts) - 1 if len(parts) >= 3 else None
        # the update's sample gives the other parameters their gradient (with 2 parts, the
        # mean of both; with 1, that part)
        shares = (
            [0.0] * update_part + [1.0]
            if update_part is not None
            else [1.0 / len(parts[:2])] * len(parts[:2])
        )
        rows, others, other_grads = self._part_rows(parts[: len(shares)], names, ctx, shares)
        first = rows[0]
        second = rows[1] if len(rows) > 1 else rows[0]
        if update_part is not None:
            update = rows[2]
        elif len(rows) == 2:
            update = (rows[0] + rows[1]) / 2
        else:
            update = rows[0]
        if all(bool(torch.isfinite(r).all()) for r in rows):
            with one_blas_thread():
                combined, weights = self._combine(first, second, update, names)
            self._diagnostics = {"gramian": cross_product(update, update).float()}
        else:
            combined, weights = self._not_finite(update, names, ctx)
        self._deliver(combined, others, other_grads, ctx)
        return {t: weights[i].detach() for i, t in enumerate(names)}

    def get_extra_state(self) -> dict[str, Any]:
        return {"lambdas": self.lambdas.clone(), "step_count": self.step_count}

    def set_extra_state(self, state: Any) -> None:
        k = len(self.task_names)
        lambdas, count = state.get("lambdas"), state.get("step_count")
        if not isinstance(lambdas, Tensor) or lambdas.shape != (k,):
            raise ValueError(f"balancer state 'lambdas': expected {k} weights, found {lambdas!r}")
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"balancer state 'step_count': expected a count, found {count!r}")
        self.lambdas = lambdas.double().clone()
        self.step_count = count


@BALANCERS.register("modo")
class MoDo(DoubleSampling):
    r"""MoDo, multi-objective gradient with double sampling (Chen, Fernando, Ying & Chen,
    "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
    Conflict-Avoidance", NeurIPS 2023 / JMLR 2024, Algorithm 1). Per step, with the
    Jacobians of three independent samples (see the module documentation):

    .. math::
        \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma (J_1 J_2^\top \lambda
        + \rho \lambda)\big), \qquad d = J_3^\top \lambda,

    ``lambda = 1/K`` initially, ``Pi_Delta`` the exact Euclidean projection onto the simplex.
    Defaults ``gamma = 0.1``, ``rho = 0.1`` (TorchJD's ``MoDoWeighting``, from the authors'
    code); the paper tunes them per experiment.

    Conventions: with ``samples: 2`` the update is ``(J_1 + J_2)^T lambda / 2`` (the paper's
    two-sample form, eq. 2.9b); missing tasks (labels absent from a batch) keep their weight
    and the present ones move on the simplex of the mass they had (as ``moco``); the task
    heads get the gradient of the sum of the update sample's losses, as with every gradient
    method here. The logged weights are the new ``lambda``.

    Args:
        tasks: task names.
        samples: 3 or 2 (see above).
        gamma: the weights' step size, ``> 0``.
        rho: the regulariser ``rho lambda``, ``>= 0``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        samples: Samples = 3,
        gamma: float = 0.1,
        rho: float = 0.1,
        level: str = "parameter",
    ) -> None:
        super().__init__(tasks, samples, level)
        self.gamma = check_number_option("gamma", gamma, low=0.0)
        if self.gamma == 0.0:
            raise ConfigError(f"balancer.options.gamma: expected a number > 0, found {gamma!r}.")
        self.rho = check_number_option("rho", rho, low=0.0)

    def extra_repr(self) -> str:
        return f"samples={self.samples}, gamma={self.gamma}, rho={self.rho}"

    def update_weights(self, cross: Tensor, current: Tensor) -> tuple[Tensor, Tensor]:
        step = cross @ current + self.rho * current
        new = project_to_simplex(current - self.gamma * step)
        return new, new


@BALANCERS.register("sdmgrad")
class SDMGrad(DoubleSampling):
    r"""SDMGrad, stochastic direction-oriented multi-objective gradient descent (Xiao, Ban &
    Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms", NeurIPS 2023, Algorithm 1). The direction is pulled towards a preferred
    one, ``J^T w~`` (the mean gradient by default): the weights ``w`` minimise
    ``1/2 ||J^T (w + lambda w~)||^2`` over the simplex by ``n_iter`` projected SGD steps with
    momentum, each with the double-sampled ``A = J_1 J_2^T``, and the update is

    .. math::
        d = J_3^\top \frac{w + \lambda \tilde w}{1 + \lambda}.

    As in TorchJD's ``SDMGradWeighting`` (the oracle of the tests), ``A`` is divided by
    ``s^2 + 1e-8`` with ``s`` the mean of ``sqrt(max(A_kk, 0))`` before the inner steps (the
    paper's section 6.1: the inner step size then does not depend on the gradients' scale);
    the authors' multi-task code takes ``s`` as the mean of ``sqrt(A_kk + 1e-4)`` without the
    ``1e-8``, which differs only for gradients of squared norm near ``1e-4`` or below. The
    inner gradient is ``A (w + lambda w~)``, that of the authors' NYUv2 / CityScapes code
    (``1/2 w^T A w + lambda w^T A w~``; their toy example drops the 1/2, which doubles the
    step). ``w`` is kept from step to step (warm start). Defaults: ``lr = 10``,
    ``momentum = 0.5``, ``n_iter = 20``, ``lambda = 0.3`` (the authors' experiments),
    ``pref_vector`` uniform. The objective-sampling variant (SDMGrad-OS, a random subset of
    the tasks differentiated per step) is not implemented.

    Conventions as :class:`MoDo` (``samples``, missing tasks, heads); with tasks missing the
    preference is uniform over the present ones (or ``pref_vector``'s entries for them,
    renormalised). The logged weights are ``(w + lambda w~) / (1 + lambda)``.

    Args:
        tasks: task names.
        samples: 3 or 2.
        lr: the inner step size, ``> 0``.
        momentum: the inner momentum, in ``[0, 1)``.
        n_iter: inner steps per step, ``>= 1``.
        lambda_: the pull towards the preferred direction, ``>= 0``.
        pref_vector: ``w~``: K non-negative numbers with a positive sum, or ``{task: w}``
            (normalised to sum 1); None: uniform.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        samples: Samples = 3,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Sequence[float] | Mapping[str, float] | None = None,
        level: str = "parameter",
    ) -> None:
        super().__init__(tasks, samples, level)
        # not ``self.lr``: that is the learning rate of a balancer's own parameters
        self.inner_lr = check_number_option("lr", lr, low=0.0)
        if self.inner_lr == 0.0:
            raise ConfigError(f"balancer.options.lr: expected a number > 0, found {lr!r}.")
        self.momentum = check_number_option("momentum", momentum, low=0.0, high=1.0)
        if self.momentum == 1.0:
            raise ConfigError(
                f"balancer.options.momentum: expected a number in [0, 1), found {momentum!r}."
            )
        self.n_iter = check_int_option("n_iter", n_iter, low=1)
        self.lambda_ = check_number_option("lambda_", lambda_, low=0.0)
        self.preference = self._preference(pref_vector)
        self._present: Tensor | None = None

    def _preference(self, pref: Sequence[float] | Mapping[str, float] | None) -> Tensor:
        k = len(self.task_names)
        if pref is None:
            return torch.full((k,), 1.0 / k, dtype=torch.float64)
        if isinstance(pref, Mapping):
            unknown = sorted(set(pref) - set(self.task_names))
            if unknown:
                raise ConfigError(f"balancer.options.pref_vector: unknown task(s) {unknown}.")
            values = [pref.get(t, 0.0) for t in self.task_names]
        else:
            values = list(pref)
            if len(values) != k:
                raise ConfigError(
                    f"balancer.options.pref_vector: expected {k} numbers (one per task), "
                    f"found {len(values)}."
                )
        numbers = [check_number_option("pref_vector", v, low=0.0) for v in values]
        if sum(numbers) <= 0:
            raise ConfigError("balancer.options.pref_vector: expected a positive sum.")
        vector = torch.tensor(numbers, dtype=torch.float64)
        return vector / vector.sum()

    def extra_repr(self) -> str:
        return (
            f"samples={self.samples}, lr={self.inner_lr}, momentum={self.momentum}, "
            f"n_iter={self.n_iter}, lambda_={self.lambda_}"
        )

    def _combine(
        self, first: Tensor, second: Tensor, update: Tensor, tasks: Sequence[str]
    ) -> tuple[Tensor, Tensor]:
        self._present = torch.tensor(task_indices(self.task_names, tasks))
        try:
            return super()._combine(first, second, update, tasks)
        finally:
            self._present = None

    def update_weights(self, cross: Tensor, current: Tensor) -> tuple[Tensor, Tensor]:
        present = self._present if self._present is not None else torch.arange(len(current))
        pref = self.preference[present]
        pref = pref / pref.sum() if float(pref.sum()) > 0 else torch.full_like(pref, 1 / len(pref))
        scale = cross.diagonal().clamp_min(0.0).sqrt().mean()
        a = cross / (scale**2 + 1e-8)
        w = current
        velocity: Tensor | None = None
        for _ in range(self.n_iter):
            grad = a @ (w + self.lambda_ * pref)
            velocity = grad if velocity is None else self.momentum * velocity + grad
            w = project_to_simplex(w - self.inner_lr * velocity)
        return w, (w + self.lambda_ * pref) / (1.0 + self.lambda_)
