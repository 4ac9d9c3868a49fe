"""SAMO: sharpness-aware per-task gradients, combined by any parameter-level gradient method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS, BackwardContext
from ..gradient import GradientBalancer, WrapsMethod, _fill_row
from ._common import check_number_option, load_generator_state

__all__ = ["SAMO"]


def _norm(tensors: Sequence[Tensor | None]) -> float:
    total = sum(float((t.double() ** 2).sum()) for t in tensors if t is not None)
    return float(total**0.5)


@BALANCERS.register("samo")
class SAMO(WrapsMethod, GradientBalancer):
    r"""SAMO (Ban, Subramani & Ji, "SAMO: A Lightweight Sharpness-Aware Approach for
    Multi-Task Optimization with Joint Global-Local Perturbation", ICCV 2025, arXiv
    2507.07883): each task's gradient of the shared parameters is taken at a point perturbed
    towards higher loss (as in sharpness-aware minimisation), and the K perturbed gradients
    are combined by the wrapped ``method`` (any parameter-level gradient method of polytask,
    with ``method_options``). A step, following the authors' NYUv2 trainer:

    1. the gradient ``g`` of the mean of the task losses (the *global* direction) and each
       task's gradient ``h_k`` of its own parameters (the heads), from the step's forward;
    2. per task, a forward-only estimate of its shared gradient from one Gaussian direction
       ``z_k`` and two forward passes in evaluation mode,
       ``g~_k = (L_k(theta + eps z_k) - L_k(theta - eps z_k)) / (2 eps) z_k``;
    3. per task, the shared parameters moved by ``rho u_k / ||u_k||`` with the joint
       perturbation ``u_k = (1 - beta) g + beta g~_k`` and the other parameters by
       ``rho h_k / ||h_k||``; one forward pass (training mode) and the gradient of ``L_k``
       there: the task's row, and its heads' gradient; the parameters restored exactly;
    4. the rows combined by ``method``; every other parameter gets the sum of the tasks'
       perturbed gradients (each head its own task's).

    Defaults: ``rho = 0.001`` and ``beta = 0.5`` (the authors' NYUv2 script), ``eps = 0.01``
    (their estimator's default), ``method = sum`` (the update of equal weighting from the
    perturbed gradients). Norms are over all shared parameters at once, as in that trainer
    (the paper's text speaks of layer-wise normalisation; see docs/balancing.md). The
    Gaussian directions come from a generator seeded by ``seed`` and saved in checkpoints.
    The ASAM-style ``adaptive`` variant is not implemented.

    Cost per step besides the wrapped method's: K + 1 backward passes of the step's graph
    (``g`` and the heads' ``h_k``), 2 K forward passes for the estimates, and K forward and
    backward passes at the perturbed points; the BatchNorm statistics are those of the
    step's own forward pass. With several processes each process perturbs along its own
    shard's directions (as data-parallel sharpness-aware training does), the rows are then
    made global as for any gradient method, and ``z_k`` is the same on every process.

    Args:
        tasks: task names.
        method: the gradient method that combines the perturbed rows (``level=parameter``).
        method_options: its options.
        rho: the perturbation radius, ``>= 0`` (0: the wrapped method on unperturbed rows,
            at SAMO's cost).
        beta: the weight of the task's own estimate in the perturbation, in ``[0, 1]``.
        eps: the finite-difference step of the estimate, ``> 0``.
        seed: the seed of the Gaussian directions.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        method: str = "sum",
        method_options: Mapping[str, Any] | None = None,
        rho: float = 0.001,
        beta: float = 0.5,
        eps: float = 0.01,
        seed: int = 0,
        level: str = "parameter",
    ) -> None:
        if level != "parameter":
            raise ConfigError(
                "balancer.options.level: SAMO perturbs parameters; only level=parameter is "
                f"possible, found {level!r}."
            )
        super().__init__(tasks, "parameter")
        if method == "samo" or method not in BALANCERS:
            raise ConfigError(
                f"balancer.options.method: expected a gradient method of polytask other than "
                f"samo, found {method!r}."
            )
        options = dict(method_options or {})
        if options.get("level", "parameter") != "parameter":
            raise ConfigError("balancer.options.method_options.level: SAMO needs parameter.")
        inner = BALANCERS.get(method)(tasks=list(tasks), **options)
        if not isinstance(inner, GradientBalancer) or inner.level != "parameter":
            raise ConfigError(
                f"balancer.options.method: {method!r} is not a parameter-level gradient method; "
                "SAMO combines per-task gradients (for equal weighting use `sum`, for a fixed "
                "weighting `constant`)."
            )
        if inner.batch_parts != 1 or inner.needs_post_step_losses:
            raise ConfigError(
                f"balancer.options.method: {method!r} cannot be wrapped by SAMO (it needs "
                "batches in parts or post-step losses)."
            )
        self.method = method
        self.inner = inner
        self.rho = check_number_option("rho", rho, low=0.0)
        self.beta = check_number_option("beta", beta, low=0.0, high=1.0)
        self.eps = check_number_option("eps", eps, low=0.0)
        if self.eps == 0.0:
            raise ConfigError(f"balancer.options.eps: expected a number > 0, found {eps!r}.")
        self.generator = torch.Generator().manual_seed(int(seed))
        inner.row_source = self._perturbed_rows

    def extra_repr(self) -> str:
        return f"method={self.method!r}, rho={self.rho}, beta={self.beta}, eps={self.eps}"

    def cost(self, name: str) -> str:
        k = len(self.task_names)
        return (
            f"{name} wrapping {self.method}: per step {k + 1} extra backward passes, {2 * k} "
            f"forward passes for the estimates and {k} forward and backward passes at "
            "perturbed parameters, then the wrapped method "
            "(docs/balancing.md#sharpness-aware-wrapping-samo)."
        )

    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.inner.aggregate(jacobian, tasks)

    def diagnostics(self) -> Mapping[str, Tensor]:
        return self.inner.diagnostics()

    @property
    def wrapped(self) -> GradientBalancer:
        return self.inner

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        if ctx.recompute is None:
            raise ConfigError(
                "SAMO needs to recompute the step's losses at perturbed parameters; this "
                "trainer step does not provide it."
            )
        self.inner.collective = self.collective
        self.inner.gramian_precision = self.gramian_precision
        self.inner.loss_reducer = self.loss_reducer
        return self.inner.backward(losses, ctx)

    def _perturbed_rows(
        self, losses: Mapping[str, Tensor], ctx: BackwardContext
    ) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
        assert ctx.recompute is not None
        names = list(losses)
        shared: list[Tensor] = list(ctx.shared_parameters)
        others: list[Tensor] = list(ctx.other_parameters)
        scale = ctx.grad_scaler.get_scale() if ctx.grad_scaler is not None else 1.0
        # 1. the global direction and each task's own (head) gradient, from the step's graph
        mean = torch.stack([losses[t] for t in names]).mean()
        global_grad = torch.autograd.grad(
            ctx.scale(mean), shared, retain_graph=True, allow_unused=True
        )
        g = [None if x is None else x / scale for x in global_grad]
        heads: dict[str, tuple[Tensor | None, ...]] = {}
        for i, t in enumerate(names):
            heads[t] = (
                torch.autograd.grad(
                    ctx.scale(losses[t]), others, retain_graph=i < len(names) - 1, allow_unused=True
                )
                if others
                else ()
            )
        device = shared[0].device if shared else losses[names[0]].device
        jacobian = self._jacobian_buffer((len(names), sum(p.numel() for p in shared)), device)
        other_grads: list[Tensor | None] = [None] * len(others)
        originals = [p.detach().clone() for p in shared]
        other_originals = [p.detach().clone() for p in others]
        try:
            for k, t in enumerate(names):
                # 2. the forward-only estimate of the task's shared gradient
                z = [
                    torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device)
                    for p in shared
                ]
                with torch.no_grad():
                    for p, zi in zip(shared, z, strict=True):
                        p.add_(zi, alpha=self.eps)
                    plus = float(ctx.recompute(evaluation=True)[t])
                    for p, zi, o in zip(shared, z, originals, strict=True):
                        p.copy_(o).sub_(zi, alpha=self.eps)
                    minus = float(ctx.recompute(evaluation=True)[t])
                    for p, o in zip(shared, originals, strict=True):
                        p.copy_(o)
                    slope = (plus - minus) / (2 * self.eps)
                    # 3. the joint global-local perturbation, and the head's own
                    u = [
                        (1 - self.beta) * (torch.zeros_like(p) if gi is None else gi)
                        + self.beta * slope * zi
                        for p, gi, zi in zip(shared, g, z, strict=True)
                    ]
                    u_norm, h_norm = _norm(u), _norm(heads[t])
                    for p, ui in zip(shared, u, strict=True):
                        p.add_(ui, alpha=self.rho / (u_norm + 1e-12))
                    for p, hi in zip(others, heads[t], strict=True):
                        if hi is not None:
                            p.add_(hi, alpha=self.rho / (h_norm + 1e-12))
                perturbed = ctx.recompute()[t]
                grads = torch.autograd.grad(
                    ctx.scale(perturbed), [*shared, *others], allow_unused=True
                )
                _fill_row(jacobian[k], grads[: len(shared)], shared)
                for i, gr in enumerate(grads[len(shared) :]):
                    if gr is not None:
                        previous = other_grads[i]
                        other_grads[i] = gr if previous is None else previous + gr
                with torch.no_grad():
                    for p, o in zip(shared, originals, strict=True):
                        p.copy_(o)
                    for p, o in zip(others, other_originals, strict=True):
                        p.copy_(o)
        finally:  # the parameters are restored whatever happens
            with torch.no_grad():
                for p, o in zip(shared, originals, strict=True):
                    p.copy_(o)
                for p, o in zip(others, other_originals, strict=True):
                    p.copy_(o)
        return jacobian, others, other_grads

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        load_generator_state(self.generator, state.get("generator"), "generator")
