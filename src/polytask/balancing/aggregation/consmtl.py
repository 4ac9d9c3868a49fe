"""ConsMTL: FairGrad's aggregation (alpha = 2) of the shared gradients, and an extra loss on
each task's own parameters that aligns its representation gradient with the joint one."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS, BackwardContext
from ..gradient import _accumulate, _add_into, _fill_row
from ._common import check_number_option
from .fairgrad import FairGrad, OnFailure

__all__ = ["ConsMTL"]

Pending = dict[str, list[Tensor | None]]
RowSource = Callable[
    [Mapping[str, Tensor], BackwardContext], tuple[Tensor, list[Tensor], list[Tensor | None]]
]


@BALANCERS.register("consmtl")
class ConsMTL(FairGrad):
    r"""ConsMTL (Qin, Wang and Yan, "Towards Consistent Multi-Task Learning: Unlocking the
    Potential of Task-Specific Parameters", CVPR 2025, pp. 10067-10076; official code
    ``jianke0604/MTLlib``, also carried by ``jianke0604/NTKMTL``).

    A bilevel step. Upper level (shared parameters): the task gradients are aggregated into
    one update; the official ``ConsMTL.get_weighted_loss`` solves FairGrad's equation with
    ``alpha = 2``, ``(G w)_k = w_k^(-1/2)``, ``d = w @ J`` (here by FairGrad's exact solver,
    :class:`~polytask.balancing.aggregation.FairGrad`). Lower level (each task's own
    parameters ``theta_k``): with ``z_k`` the shared representation task ``k`` reads and
    ``delta_k = dL_k/dz_k`` (a function of ``theta_k``), the extra loss::

        L_extra_k = -lambda <delta_k, delta>,   delta = sum_j w_j delta_j   (held constant)

        theta_k.grad = dL_k/dtheta_k + clip(dL_extra_k/dtheta_k, clip * ||dL_k/dtheta_k||)

    pulls task ``k``'s gradient at the representation, and so its shared gradient
    ``J_z^T delta_k``, towards the joint direction; ``clip(g, c)`` rescales ``g`` to norm
    ``c`` when it is longer (``torch.nn.utils.clip_grad_norm_``'s rule, ``c / (|g| + 1e-6)``).
    ``dL_extra_k/dtheta_k`` is a second-order term (a Hessian-vector product through the
    task's modules).

    Defaults from the official code: ``lambda_ = 1`` (its README: NYUv2 1, Cityscapes and
    CelebA 50, QM9 1e-3), ``clip = 0.1``. Deviations and choices:

    - ``z_k``: the points the architecture marks as the shared representation
      (:meth:`~polytask.models.MultiTaskModel.shared_representation`), task ``k``'s own copy
      of each (the sum of the inner products over the points). The official trainers pass
      the per-task features of their MTAN models on NYUv2 and Cityscapes and the one shared
      representation on QM9 and CelebA (one line to comment in and out).
    - ``theta_k``: every parameter outside the shared ones that task ``k``'s loss reaches
      (its norm for the clip is over those); the official code cuts its list of
      task-specific parameters into K equal slices.
    - The official code multiplies the shared update by ``K`` and clips its norm to 1
      (``max_norm``); neither here, as for ``fairgrad`` (clipping is ``optim.grad_clip``).
      On Cityscapes its authors changed the clip by hand to 0.05 for segmentation and 0 for
      depth; one ``clip`` for every task here.
    - The paper's text was not read (its abstract describes the same two levels); the
      upper level's aggregation and the extra loss are the official code's.

    Parameter level only (the paper's). The rows are the engine's parameter-level rows,
    computed from the ``delta_k`` the lower level needs anyway: ``(dz/dtheta_S)^T delta_k``
    through the shared trunk, plus the gradient along any path from the loss to a shared
    parameter that bypasses the marked points (tested equal to ``fairgrad``'s rows on five
    architectures). The feature level is not offered: the lower level differentiates
    through the heads' graph after the upper level, which the engine's single
    feature-level pass frees. Cost: FairGrad's at the parameter level (one
    backward pass per task through the shared parameters, graph kept), plus per task one
    backward pass through its own modules with a graph (``delta_k`` and ``dL_k/dtheta_k``)
    and one through that graph (the second-order term). The architecture must mark its
    shared representation (every built-in one does).

    Args:
        tasks: task names.
        lambda_: the weight of the extra loss, ``>= 0`` (0: FairGrad with alpha = 2).
        clip: the extra gradient's largest norm, as a fraction of the task loss's gradient
            norm on the same parameters, ``>= 0``.
        max_iter, tol, on_failure: FairGrad's solver options.

    State (saved in checkpoints): FairGrad's last weights.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        lambda_: float = 1.0,
        clip: float = 0.1,
        max_iter: int = 200,
        tol: float = 1e-10,
        on_failure: OnFailure = "warn",
    ) -> None:
        super().__init__(
            tasks, level="parameter", alpha=2.0, max_iter=max_iter, tol=tol, on_failure=on_failure
        )
        self.lambda_ = check_number_option("lambda_", lambda_, low=0.0)
        self.clip = check_number_option("clip", clip, low=0.0)
        self.needs_representation = True
        #: the step's delta_k, own-parameter gradients and direct shared gradients (backward)
        self._pending: tuple[Pending, Pending, Pending] | None = None

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_:g}, clip={self.clip:g}"

    @property  # type: ignore[override]
    def row_source(self) -> RowSource:
        """The rows come from the step's ``delta_k`` (:meth:`_rows`); no wrapper replaces it."""
        return self._rows

    @row_source.setter
    def row_source(self, value: RowSource) -> None:
        raise ConfigError(
            "balancer.options.method: consmtl computes its own rows for its lower level and "
            "cannot be wrapped (by samo)."
        )

    def _rows(
        self, losses: Mapping[str, Tensor], ctx: BackwardContext
    ) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
        """The parameter-level rows from the step's ``delta_k`` (the gradient of each loss at
        the representation it reads), one backward pass per task through the shared trunk:
        ``g_k = (dz/dtheta)^T delta_k``. The heads' own gradients were taken with them."""
        assert self._pending is not None and ctx.representation is not None
        deltas, own, direct = self._pending
        points = ctx.representation.points
        targets = list(ctx.shared_parameters)
        others: list[Tensor] = list(ctx.other_parameters)
        names = list(losses)
        device = targets[0].device if targets else losses[names[0]].device
        jacobian = self._jacobian_buffer((len(names), sum(t.numel() for t in targets)), device)
        other_grads: list[Tensor | None] = [None] * len(others)
        for k, name in enumerate(names):
            pairs: list[tuple[Tensor, Tensor]] = [
                (p.original, d) for p, d in zip(points, deltas[name], strict=True) if d is not None
            ]
            grads: tuple[Tensor | None, ...] = (None,) * (len(targets) + len(others))
            if pairs:
                grads = torch.autograd.grad(
                    [o for o, _ in pairs],
                    [*targets, *others],
                    grad_outputs=[d.detach() for _, d in pairs],
                    retain_graph=k < len(names) - 1,
                    allow_unused=True,
                    materialize_grads=False,
                )
            # a path from the loss to a shared parameter that bypasses the marked points
            row: list[Tensor | None] = list(grads[: len(targets)])
            _add_into(row, direct[name])
            _fill_row(jacobian[k], row, targets)
            _add_into(other_grads, grads[len(targets) :])
            _add_into(other_grads, own[name])
        return jacobian, others, other_grads

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        if ctx.representation is None or not ctx.representation.points:
            raise ConfigError(
                "balancer.name=consmtl: the architecture marks no shared representation "
                "(the lower level needs the gradient of each task's loss at the "
                "representation it reads)."
            )
        points = ctx.representation.points
        others = list(ctx.other_parameters)
        targets = list(ctx.shared_parameters)
        # delta_k at each point task k reads (with a graph through the task's own modules),
        # and the gradient of L_k on the parameters past the representation (detached); all
        # of the scaled loss, so that a loss scaler keeps small gradients from flushing to
        # zero in half precision (the rows are unscaled by the engine, joint below)
        deltas: dict[str, list[Tensor | None]] = {}
        own: dict[str, list[Tensor | None]] = {}
        direct: dict[str, list[Tensor | None]] = {}
        for name, loss in losses.items():
            reads = [p.leaves.get(name, p.leaves.get(None)) for p in points]
            present = [leaf for leaf in reads if leaf is not None]
            grads = torch.autograd.grad(
                ctx.scale(loss),
                [*present, *others, *targets],
                create_graph=True,
                retain_graph=True,
                allow_unused=True,
            )
            it = iter(grads[: len(present)])
            deltas[name] = [None if leaf is None else next(it) for leaf in reads]
            rest: list[Tensor | None] = [
                None if g is None else g.detach() for g in grads[len(present) :]
            ]
            own[name], direct[name] = rest[: len(others)], rest[len(others) :]
        self._pending = (deltas, own, direct)
        try:
            weights = super().backward(losses, ctx)
        finally:
            self._pending = None
        if self.lambda_ == 0.0 or not others:
            return weights
        scale = ctx.grad_scaler.get_scale() if ctx.grad_scaler is not None else 1.0
        joint: list[Tensor | None] = []  # sum_j w_j delta_j, unscaled
        for i in range(len(points)):
            parts = [
                weights[n] * di.detach() for n, d in deltas.items() if (di := d[i]) is not None
            ]
            joint.append(torch.stack(parts).sum(dim=0) / scale if parts else None)
        names = list(deltas)
        for k, name in enumerate(names):
            terms = [
                (d * v).sum()
                for d, v in zip(deltas[name], joint, strict=True)
                if d is not None and v is not None and d.requires_grad
            ]
            if not terms:
                continue
            extra = -self.lambda_ * torch.stack(terms).sum()
            grads = torch.autograd.grad(
                extra, others, allow_unused=True, retain_graph=k < len(names) - 1
            )
            reached = [(p, g) for p, g in zip(others, grads, strict=True) if g is not None]
            base = [g for g in own[name] if g is not None]
            if not reached or not base:
                continue
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in base])
            )
            total = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for _, g in reached])
            )
            # the gradients here are scaled (by the scaled deltas): the clip on unscaled norms
            factor = torch.clamp(self.clip * (norm / scale) / (total / scale + 1e-6), max=1.0)
            for param, g in reached:
                _accumulate(param, g.detach() * factor)
        return weights
