"""MoCo: tracked task gradients and simplex weights moved by projected gradient steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS, BackwardContext
from ..gradient import GradientBalancer, Level
from ._common import check_number_option, task_indices

__all__ = ["MoCo", "project_to_simplex"]

MoCoNormalization = Literal["none", "loss"]


def project_to_simplex(v: Tensor, mass: float = 1.0) -> Tensor:
    """The Euclidean projection of ``v`` onto ``{w >= 0, sum(w) = mass}`` (``mass >= 0``).

    The sort-based algorithm (Held, Wolfe & Crowder 1974; Duchi et al. 2008): with ``u``
    sorted in decreasing order, ``r`` the largest index with
    ``u_r - (sum_{j <= r} u_j - mass) / r > 0`` and ``tau = (sum_{j <= r} u_j - mass) / r``,
    the projection is ``max(v - tau, 0)``. Exact up to the rounding of the sums.
    """
    if mass <= 0:
        return torch.zeros_like(v)
    u, _ = torch.sort(v, descending=True)
    cumulative = torch.cumsum(u, 0) - mass
    ranks = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    positive = (u - cumulative / ranks) > 0
    r = int(positive.nonzero().max()) + 1
    tau = cumulative[r - 1] / r
    return (v - tau).clamp_min(0)


@BALANCERS.register("moco")
class MoCo(GradientBalancer):
    r"""MoCo (Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning: A Provably
    Convergent Approach", ICLR 2023, Algorithm 1, https://openreview.net/forum?id=dLAYGdKTi2).

    The stochastic MGDA direction is biased: the min-norm weights of one batch's gradients
    are not those of the expected gradients. MoCo replaces the gradients in the weights'
    problem by a *tracking variable* ``Y`` (K x the shared parameters) that follows them, and
    moves the weights by one projected gradient step on the simplex per step instead of
    solving the QP. Per step ``t = 1, 2, ...`` with this batch's task gradients ``g_k``:

    .. math::
        y_k \leftarrow y_k - \beta_t (y_k - g_k), \qquad
        \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma_t (Y Y^\top + \rho I)\lambda\big),
        \qquad d = Y^\top \lambda,

    with ``beta_t = beta / t^beta_sigma``, ``gamma_t = gamma / t^gamma_sigma``, ``Y = 0`` and
    ``lambda = 1/K`` initially, ``Pi_Delta`` the Euclidean projection onto the simplex
    (computed exactly, :func:`project_to_simplex`) and ``rho >= 0`` the paper's
    regulariser. The weights returned are ``lambda`` (summing to 1).

    Defaults are the step sizes of LibMTL's implementation (from the authors' code):
    ``beta = 0.5``, ``beta_sigma = 0.5``, ``gamma = 0.1``, ``gamma_sigma = 0.5``, ``rho = 0``
    (the paper's theory takes ``rho > 0``; its experiments tune the step sizes).

    Deviations and conventions:

    - The paper projects each ``y_k`` onto a bounded set ``L_k`` (for its analysis); as in
      the authors' and LibMTL's code no such projection is made.
    - LibMTL replaces the projection by a softmax and rescales each gradient to
      ``L_k g_k / (||g_k|| + 1e-8)`` before tracking it; here the projection is the paper's,
      and ``normalization: loss`` gives that rescaling (exactly ``L_k g_k / ||g_k||``; a
      zero gradient stays zero). Default ``none`` (the paper).
    - **Missing tasks**: only the present tasks' ``y_k`` move; ``lambda`` is updated on the
      present tasks only, projected onto ``{lambda_P >= 0, sum = the mass they had}``
      (absent tasks keep their weight) and ``d = Y_P^T lambda_P``. ``t`` counts steps.
    - **Feature level** (``level=feature``; the authors' and LibMTL's code refuse it): rows
      over one batch's representation cannot be tracked across batches (other samples,
      another shape). There ``Y Y^T`` is replaced by a tracked Gramian
      ``H <- H - beta_t (H - J J^T)`` (on the present tasks' block), ``lambda`` moves by the
      same projected step with ``H``, and ``d = lambda @ J`` combines this batch's rows.
      At ``level=parameter`` (default) the update is the paper's.

    State (saved in checkpoints, identical on every process since it follows the complete
    Jacobian): ``Y`` (float32 like the rows: one more copy of the Jacobian's memory; K x K
    float64 at the feature level), ``lambda`` (float64) and the step count.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
        beta: the tracking step size, in ``(0, 1]``.
        beta_sigma: decay exponent of ``beta_t``, ``>= 0``.
        gamma: the weights' step size, ``>= 0``.
        gamma_sigma: decay exponent of ``gamma_t``, ``>= 0``.
        rho: the regulariser ``rho I`` added to ``Y Y^T``, ``>= 0``.
        normalization: ``"none"`` (the paper) or ``"loss"`` (LibMTL's rescaling).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalization: MoCoNormalization = "none",
    ) -> None:
        super().__init__(tasks, level)
        self.beta = check_number_option("beta", beta, low=0.0, high=1.0)
        if self.beta == 0.0:
            raise ConfigError(
                f"balancer.options.beta: expected a number in (0, 1], found {beta!r}."
            )
        self.beta_sigma = check_number_option("beta_sigma", beta_sigma, low=0.0)
        self.gamma = check_number_option("gamma", gamma, low=0.0)
        self.gamma_sigma = check_number_option("gamma_sigma", gamma_sigma, low=0.0)
        self.rho = check_number_option("rho", rho, low=0.0)
        if normalization not in get_args(MoCoNormalization):
            raise ConfigError(
                "balancer.options.normalization: expected one of "
                f"{', '.join(get_args(MoCoNormalization))}, found {normalization!r}."
            )
        self.normalization: MoCoNormalization = normalization
        k = len(self.task_names)
        #: the tracked gradients (K x N, parameter level) or Gramian (K x K, feature level)
        self.tracked: Tensor | None = None
        #: the weights lambda (float64, on the simplex)
        self.lambdas = torch.full((k,), 1.0 / k, dtype=torch.float64)
        #: the number of steps taken
        self.step_count = 0
        self._losses: Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"level={self.level!r}, beta={self.beta}, beta_sigma={self.beta_sigma}, "
            f"gamma={self.gamma}, gamma_sigma={self.gamma_sigma}, rho={self.rho}, "
            f"normalization={self.normalization!r}"
        )

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        if self.normalization == "loss":
            self._losses = torch.stack([v.detach().double() for v in losses.values()])
        try:
            return super().backward(losses, ctx)
        finally:
            self._losses = None

    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        index = task_indices(self.task_names, tasks)
        k = len(self.task_names)
        t = self.step_count + 1
        beta_t = self.beta / t**self.beta_sigma
        gamma_t = self.gamma / t**self.gamma_sigma
        rows = jacobian
        if self.normalization == "loss":
            if self._losses is None:
                raise ValueError("MoCo with normalization='loss' needs the losses: call backward()")
            norms = torch.linalg.vector_norm(jacobian, dim=1, dtype=torch.float64)
            factors = torch.where(
                norms > 0, self._losses.to(norms) / torch.where(norms > 0, norms, 1.0), 0.0
            )
            rows = jacobian * factors.to(jacobian.dtype)[:, None]
        shape = (k, k) if self.level == "feature" else (k, jacobian.shape[1])
        dtype = torch.float64 if self.level == "feature" else jacobian.dtype
        tracked = self.tracked
        if tracked is None:
            tracked = torch.zeros(shape, dtype=dtype, device=jacobian.device)
        elif tuple(tracked.shape) != shape:
            raise ValueError(
                f"MoCo: the tracked variable has shape {tuple(tracked.shape)}, this step needs "
                f"{shape}; the shared parameters changed since the state was saved."
            )
        else:
            tracked = tracked.to(device=jacobian.device, dtype=dtype)
        present = torch.tensor(index, device=jacobian.device)
        if self.level == "feature":
            gramian = self.gramian(rows)
            block = tracked[present][:, present]
            block = block - beta_t * (block - gramian)
            tracked[present[:, None], present[None, :]] = block
            h = block
        else:
            sub = tracked[present]
            sub = sub - beta_t * (sub - rows)
            tracked[present] = sub
            h = self.gramian(sub)
        lambdas = self.lambdas.to(jacobian.device)
        current = lambdas[present]
        mass = float(current.sum())
        step = h @ current + self.rho * current
        current = project_to_simplex(current - gamma_t * step, mass)
        lambdas[present] = current
        self.tracked, self.lambdas, self.step_count = tracked, lambdas, t
        weights = current.to(jacobian.dtype)
        combined = weights @ (rows if self.level == "feature" else tracked[present])
        return combined, weights

    def on_structure_changed(self) -> None:
        """The tracked gradients (sized to the shared parameters) start again from zero, as
        at the first step; the weights carry on."""
        self.tracked = None

    def get_extra_state(self) -> dict[str, Any]:
        tracked = None if self.tracked is None else self.tracked.detach().cpu().clone()
        return {
            "tracked": tracked,
            "lambdas": self.lambdas.detach().cpu().clone(),
            "step_count": self.step_count,
        }

    def set_extra_state(self, state: Any) -> None:
        k = len(self.task_names)
        tracked, lambdas, count = (
            state.get("tracked"),
            state.get("lambdas"),
            state.get("step_count"),
        )
        if not isinstance(lambdas, Tensor) or lambdas.shape != (k,):
            raise ValueError(f"balancer state 'lambdas': expected {k} weights, found {lambdas!r}")
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"balancer state 'step_count': expected a count, found {count!r}")
        if tracked is not None and (
            not isinstance(tracked, Tensor)
            or tracked.dim() != 2
            or tracked.shape[0] != k
            or (self.level == "feature" and tracked.shape[1] != k)
        ):
            raise ValueError(
                f"balancer state 'tracked': expected the tracked variable of {k} tasks at level "
                f"{self.level!r}, found {tracked!r}"
            )
        self.lambdas = lambdas.double().clone()
        self.step_count = count
        self.tracked = None if tracked is None else tracked.detach().clone()
