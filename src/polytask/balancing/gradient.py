"""The gradient engine: per-task gradients of the shared part, combined by a method.

Two levels, chosen per method by its ``level`` option:

**parameter** (default): for every task ``k`` the gradient ``g_k`` of its loss with respect
to the *manipulated* parameters ``S`` (the architecture's shared parameters, or the user's
override ``balancer.shared``). The rows ``g_k`` form the Jacobian ``J`` (K x |S|); the method
turns ``J`` into one gradient for ``S``. Every other trainable parameter gets its ordinary
gradient, that of ``sum_k L_k`` (for a task's own head: its own loss's gradient). Cost: one
backward pass per task through the shared part (the floor for exact per-task gradients).

**feature**: the rows are the gradients with respect to the *shared representation*, the
tensors that task-specific modules read (the architecture marks them; see
:meth:`~polytask.models.MultiTaskModel.shared_representation`). The method combines those
rows into one gradient per representation point, and a single backward pass carries it into
the shared trunk. Where the architecture gives each task its own copy of every point
(``shared_representation(z, name, task=...)``, as all built-in architectures do), one
backward pass of ``sum_k L_k`` through the task-specific parts yields all K rows, since the
gradient at task k's copy is exactly ``dL_k/dz``; otherwise those parts are traversed once per
task. Either way the cost stays close to that of equal weighting whatever K is.

The two levels coincide when the combined gradient is a fixed linear combination of the
rows (such as equal weighting): then ``sum_k w_k dL_k/dtheta`` is the same whether the
weights are applied before or after the trunk's backward pass. Methods whose weights depend
on the rows (MGDA, PCGrad, ...) generally give different updates at the two levels, since
the Gramian of feature gradients is not that of parameter gradients.

Mixed precision: the rows are computed from scaled losses and unscaled before the method
sees them; if any row holds an inf or NaN the combined gradient is made non-finite too, so
that the loss scaler skips the step for every task and lowers its scale.

Multi-process training plugs in at one point: :meth:`GradientBalancer.synchronize`, called
once per step with the complete Jacobian, before the method combines it.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from threadpoolctl import ThreadpoolController
from torch import Tensor

from ..errors import ConfigError, TrainingDiverged
from .base import BackwardContext, Balancer

__all__ = ["GradientBalancer", "GramianPrecision", "GramianWeighting", "Level"]

Level = Literal["parameter", "feature"]


def _fill_row(row: Tensor, grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> None:
    """Copy per-tensor gradients into one row of the Jacobian (zeros where unused)."""
    offset = 0
    for g, t in zip(grads, like, strict=True):
        n = t.numel()
        if g is None:
            row[offset : offset + n].zero_()
        else:
            row[offset : offset + n].copy_(g.reshape(-1))
        offset += n


def _unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[offset : offset + n].view_as(t).to(t.dtype))
        offset += n
    return out


_BLAS: ThreadpoolController | None = None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the enclosed NumPy/SciPy work with one BLAS thread (PyTorch's own threads are
    untouched).

    The methods' K x K solves run in NumPy and SciPy, whose OpenBLAS builds start their own
    worker threads; those keep spinning after a call and compete with PyTorch's threads for
    the same cores: on 2 CPU threads that made a K = 40 MGDA step 2.6 times slower (94 ms
    instead of 36). At K x K sizes one thread is also the fastest.
    """
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    with _BLAS.limit(limits=1, user_api="blas"):
        yield


def _accumulate(param: Tensor, grad: Tensor) -> None:
    param.grad = grad if param.grad is None else param.grad + grad


GramianPrecision = Literal["float64", "float32"]

# elements of the float64 scratch block used for the exact Gramian (4 MiB)
_SCRATCH_ELEMENTS = 1 << 19


class WrapsMethod:
    """Mixin of a gradient method that wraps another (:attr:`wrapped`; SAMO, CR-MOGM): the
    trainer's hooks (epochs, optimizer steps, structure changes) reach the wrapped method,
    whose state they update."""

    @property
    @abstractmethod
    def wrapped(self) -> Balancer:
        """The wrapped method."""

    def on_epoch_start(self, epoch: int) -> None:
        self.wrapped.on_epoch_start(epoch)

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float]) -> None:
        self.wrapped.on_epoch_end(epoch, train_losses)

    def after_optimizer_step(self, losses: Mapping[str, Tensor] | None = None) -> None:
        self.wrapped.after_optimizer_step(losses)

    def on_structure_changed(self) -> None:
        self.wrapped.on_structure_changed()


class GradientBalancer(Balancer):
    """Base class of methods that combine per-task gradients.

    Subclasses implement :meth:`aggregate` (``J`` -> one gradient), or derive from
    :class:`GramianWeighting` when the result is ``w @ J`` with ``w`` a function of the
    Gramian ``J J^T``.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"`` (see the module documentation).
    """

    def __init__(self, tasks: Sequence[str], level: Level = "parameter") -> None:
        super().__init__(tasks)
        if level not in ("parameter", "feature"):
            raise ConfigError(
                f"balancer.options.level: expected parameter or feature, found {level!r}."
            )
        self.level: Level = level
        self.needs_representation = level == "feature"
        self._diagnostics: dict[str, Tensor] = {}
        # the Gramian of the last Jacobian (see :meth:`gramian`)
        self._gramian: Tensor | None = None
        self._gramian_of: Tensor | None = None
        self._buffer: Tensor | None = None
        self._scratch: Tensor | None = None  # float64 column block of J (see gramian)
        #: precision of the Gramian product (``balancer.gramian_precision``; see :meth:`gramian`)
        self.gramian_precision: GramianPrecision = "float64"
        #: at feature level, take every row from one backward pass where the architecture
        #: gives each task its own copy of every point; False forces one pass per task
        #: (the same rows, K times the work; for checking a new architecture)
        self.feature_single_pass = True

    def cost(self, name: str) -> str:
        """What one step of this method costs, in words, for a run's log (``name``: how
        the configuration names the method)."""
        k = len(self.task_names)
        if self.level == "feature":
            return (
                f"{name} at the feature level: the {k} task gradients of the shared "
                "representation from one backward pass, then one pass through the shared "
                "trunk: about the cost of equal weighting (docs/balancing.md#cost)."
            )
        return (
            f"{name} at the parameter level: {k} backward passes through the shared "
            f"parameters per step (equal weighting: 1) and the {k} x {k} Gramian of their "
            f"gradients. `balancer.options.level: feature` takes the {k} task gradients of the "
            "shared representation from one backward pass instead, at about the cost of equal "
            "weighting (docs/balancing.md#cost)."
        )

    @abstractmethod
    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Combine the rows of ``jacobian`` (one per task of ``tasks``, float32, unscaled).

        Returns the combined gradient (a vector) and the effective weight of each task
        (a K-vector, for diagnostics; the coefficient of the task's row where the result is
        a combination of rows).
        """

    def _jacobian_buffer(self, shape: tuple[int, int], device: torch.device) -> Tensor:
        """A K x N matrix reused from step to step.

        Each task's gradients are copied in once; reusing the memory avoids the cost of
        fresh pages every step (large on the CPU). Methods must not keep a reference to it.
        """
        buffer = self._buffer
        if buffer is None or buffer.shape != shape or buffer.device != device:
            buffer = self._buffer = torch.empty(shape, device=device)
        return buffer

    def gramian(self, jacobian: Tensor) -> Tensor:
        """``J J^T`` as float64, cached for this ``J``.

        With :attr:`gramian_precision` ``"float64"`` (default) the product is exact for the
        given rows (computed in float64, by column blocks so that no float64 copy of J is
        ever whole); ``"float32"`` multiplies in float32, about three times cheaper on the
        CPU (and far cheaper on GPUs with slow float64), with a relative error of float32
        rounding in the entries. Methods receive float64 either way.
        :class:`GramianWeighting` and the diagnostics share one computation per step.
        """
        if self._gramian is not None and self._gramian_of is jacobian:
            return self._gramian  # within one step (backward resets it before each step)
        if self.gramian_precision == "float32" or jacobian.dtype == torch.float64:
            gramian = (jacobian @ jacobian.T).double()
        else:
            k, n = jacobian.shape
            # float64 column blocks of at most ~4 MiB, in one scratch matrix reused from
            # step to step: fresh large blocks would cost page faults every step (and raise
            # the peak memory by their size)
            width = min(n, max(1024, _SCRATCH_ELEMENTS // max(k, 1)))
            scratch = self._scratch
            if scratch is None or scratch.shape != (k, width) or scratch.device != jacobian.device:
                scratch = self._scratch = torch.empty(
                    (k, width), dtype=torch.float64, device=jacobian.device
                )
            gramian = torch.zeros((k, k), dtype=torch.float64, device=jacobian.device)
            for start in range(0, n, width):
                block = jacobian[:, start : start + width]
                block64 = scratch[:, : block.shape[1]]
                block64.copy_(block)
                gramian.addmm_(block64, block64.T)
        self._gramian, self._gramian_of = gramian, jacobian
        return gramian

    #: where the rows come from at the parameter level, when not from one backward pass
    #: per task of the step's losses: ``row_source(losses, ctx) -> (J, others, other_grads)``
    #: with the rows and the other parameters' gradients of the *scaled* losses, as
    #: :meth:`_parameter_rows` returns them (a wrapper such as SAMO computes them at perturbed
    #: parameters); None: the default
    row_source: (
        Callable[
            [Mapping[str, Tensor], BackwardContext],
            tuple[Tensor, list[Tensor], list[Tensor | None]],
        ]
        | None
    ) = None

    #: set by a multi-process trainer: makes the Jacobian global (an object with
    #: ``gather(jacobian, level)`` and ``local_part(combined)``; see
    #: :class:`polytask.training.distributed.JacobianSync`); None in a single process
    collective: Any = None

    def synchronize(self, jacobian: Tensor) -> Tensor:
        """The single point where per-task gradients are complete (multi-process hook):
        the global Jacobian, in one collective, when :attr:`collective` is set."""
        if self.collective is None:
            return jacobian
        gathered: Tensor = self.collective.gather(jacobian, self.level)
        return gathered

    def diagnostics(self) -> Mapping[str, Tensor]:
        return self._diagnostics

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        names = list(losses)
        scale = ctx.grad_scaler.get_scale() if ctx.grad_scaler is not None else 1.0
        if self.level == "feature":
            jacobian, others, other_grads, originals = self._feature_rows(losses, ctx)
        elif self.row_source is not None:
            jacobian, others, other_grads = self.row_source(losses, ctx)
            originals = []
        else:
            jacobian, others, other_grads = self._parameter_rows(losses, ctx)
            originals = []
        if scale != 1.0:
            jacobian.div_(scale)
        jacobian = self.synchronize(jacobian)
        # the buffer is the same tensor every step: drop the previous step's Gramian
        self._gramian = self._gramian_of = None
        gramian = self.gramian(jacobian)
        # an inf or NaN anywhere in J shows in its Gramian: a K x K check instead of K x N
        if bool(torch.isfinite(gramian).all()) or bool(torch.isfinite(jacobian).all()):
            with one_blas_thread():
                combined, weights = self.aggregate(jacobian, names)
            self._diagnostics = {"gramian": gramian.detach().float()}
        else:
            combined, weights = self._not_finite(jacobian, names, ctx)
        self._deliver(combined, others, other_grads, ctx, originals)
        return {t: weights[i].detach() for i, t in enumerate(names)}

    def _not_finite(
        self, jacobian: Tensor, names: Sequence[str], ctx: BackwardContext
    ) -> tuple[Tensor, Tensor]:
        """A step whose task gradients are not all finite: without a loss scaler, stop with
        the tasks named; with one, ``(sum of the rows, unit weights)``, whose non-finite
        values the scaler sees, so that it skips the step for every task."""
        if ctx.grad_scaler is None:
            bad = [
                n for n, r in zip(names, jacobian, strict=True) if not bool(torch.isfinite(r).all())
            ]
            raise TrainingDiverged(
                f"the gradient of task(s) {', '.join(map(repr, bad))} is not finite at "
                f"step {ctx.step + 1}; try a lower optim.lr or optim.grad_clip."
            )
        self._diagnostics = {}
        return jacobian.sum(dim=0), torch.ones(len(names), device=jacobian.device)

    def _deliver(
        self,
        combined: Tensor,
        others: Sequence[Tensor],
        other_grads: Sequence[Tensor | None],
        ctx: BackwardContext,
        originals: Sequence[Tensor] = (),
    ) -> None:
        """Hand an unscaled combined gradient to the parameters: scaled back by the loss
        scaler's factor; the other parameters' own gradients added; at the feature level
        (``originals``: the shared representation) this process's part of it back-propagated
        through the trunk, at the parameter level added to the shared parameters."""
        if ctx.grad_scaler is not None:
            scale = ctx.grad_scaler.get_scale()
            if scale != 1.0:
                combined = combined * scale
        for param, own in zip(others, other_grads, strict=True):
            if own is not None:
                _accumulate(param, own)
        if originals:
            if self.collective is not None:  # this process's columns of the global result
                combined = self.collective.local_part(combined)
            torch.autograd.backward(list(originals), grad_tensors=_unflatten(combined, originals))
        else:
            targets = list(ctx.shared_parameters)
            for target, piece in zip(targets, _unflatten(combined, targets), strict=True):
                _accumulate(target, piece)

    def _part_rows(
        self,
        parts: Sequence[Mapping[str, Tensor]],
        names: Sequence[str],
        ctx: BackwardContext,
        shares: Sequence[float],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
        """The parameter-level rows of each part of the batch (unscaled, global, each its
        own tensor) and the other parameters' gradients: part ``p``'s weighted by
        ``shares[p]`` (0: the part's passes do not reach them)."""
        scale = ctx.grad_scaler.get_scale() if ctx.grad_scaler is not None else 1.0
        others: list[Tensor] = list(ctx.other_parameters)
        other_grads: list[Tensor | None] = [None] * len(others)
        rows: list[Tensor] = []
        for part, share in zip(parts, shares, strict=True):
            part_ctx = ctx if share else dataclasses.replace(ctx, other_parameters=())
            jacobian, _, grads = self._parameter_rows({t: part[t] for t in names}, part_ctx)
            jacobian = jacobian.clone()  # the engine's buffer is reused by the next part
            if scale != 1.0:
                jacobian.div_(scale)
            rows.append(self.synchronize(jacobian))
            if share:
                _add_into(other_grads, [None if g is None else g * share for g in grads])
        return rows, others, other_grads

    def _parameter_rows(
        self, losses: Mapping[str, Tensor], ctx: BackwardContext
    ) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
        """One backward pass per task: rows over the manipulated parameters, plus the
        summed gradients of every other parameter."""
        names = list(losses)
        targets = list(ctx.shared_parameters)
        others: list[Tensor] = list(ctx.other_parameters)
        device = targets[0].device if targets else losses[names[0]].device
        jacobian = self._jacobian_buffer((len(names), sum(t.numel() for t in targets)), device)
        other_grads: list[Tensor | None] = [None] * len(others)
        for k, name in enumerate(names):
            grads = torch.autograd.grad(
                ctx.scale(losses[name]),
                [*targets, *others],
                retain_graph=k < len(names) - 1,
                allow_unused=True,
                materialize_grads=False,
            )
            _fill_row(jacobian[k], grads[: len(targets)], targets)
            _add_into(other_grads, grads[len(targets) :])
        return jacobian, others, other_grads

    def _feature_rows(
        self, losses: Mapping[str, Tensor], ctx: BackwardContext
    ) -> tuple[Tensor, list[Tensor], list[Tensor | None], list[Tensor]]:
        """Rows over the shared representation, plus the summed gradients of every parameter
        the task-specific modules reach, and the originals of the points.

        Where every point gives each task its own copy, one backward pass of ``sum_k L_k``
        yields every row at once (task ``k``'s row is the gradient at its own copies);
        otherwise one pass per task.
        """
        names = list(losses)
        if ctx.representation is None or not ctx.representation.points:
            raise ConfigError(
                f"balancer.options.level=feature: the architecture marks no shared "
                f"representation; use level=parameter with {type(self).__name__}."
            )
        points = ctx.representation.points
        originals = [p.original for p in points]
        others: list[Tensor] = [*ctx.other_parameters, *ctx.shared_parameters]
        sizes = [o.numel() for o in originals]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        jacobian = self._jacobian_buffer((len(names), sum(sizes)), originals[0].device)
        other_grads: list[Tensor | None] = [None] * len(others)
        if self.feature_single_pass and all(p.per_task for p in points):
            # (row, column block, leaf) for every copy read by a task of this step
            row_of = {name: k for k, name in enumerate(names)}
            cells = [
                (row_of[task], i, leaf)
                for i, p in enumerate(points)
                for task, leaf in p.leaves.items()
                if task in row_of
            ]
            total = ctx.scale(losses[names[0]])
            for name in names[1:]:
                total = total + ctx.scale(losses[name])
            grads = torch.autograd.grad(
                total,
                [leaf for _, _, leaf in cells] + others,
                allow_unused=True,
                materialize_grads=False,
            )
            filled: set[tuple[int, int]] = set()
            for (k, i, _), g in zip(cells, grads[: len(cells)], strict=True):
                if g is not None:
                    jacobian[k, offsets[i] : offsets[i] + sizes[i]].copy_(g.reshape(-1))
                    filled.add((k, i))
            for k in range(len(names)):
                for i in range(len(points)):
                    if (k, i) not in filled:
                        jacobian[k, offsets[i] : offsets[i] + sizes[i]].zero_()
            _add_into(other_grads, grads[len(cells) :])
            return jacobian, others, other_grads, originals
        for k, name in enumerate(names):
            reads = [p.leaves.get(None, p.leaves.get(name)) for p in points]
            present = [leaf for leaf in reads if leaf is not None]
            grads = torch.autograd.grad(
                ctx.scale(losses[name]),
                [*present, *others],
                allow_unused=True,
                materialize_grads=False,
            )
            it = iter(grads[: len(present)])
            _fill_row(
                jacobian[k],
                [None if leaf is None else next(it) for leaf in reads],
                originals,
            )
            _add_into(other_grads, grads[len(present) :])
        return jacobian, others, other_grads, originals


def _add_into(total: list[Tensor | None], grads: Sequence[Tensor | None]) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            previous = total[i]
            total[i] = g if previous is None else previous + g


class GramianWeighting(GradientBalancer):
    """A method whose combined gradient is ``w @ J`` with ``w = weights(J J^T)``.

    Only the K x K Gramian reaches the method; the combination itself is one
    matrix-vector product.
    """

    #: the relative precision of the rows behind the Gramian that :meth:`weights_from_gramian`
    #: receives: the machine epsilon of the Jacobian's dtype (float32's as well when
    #: :attr:`gramian_precision` is ``"float32"``), set by :meth:`aggregate`; float64's for a
    #: Gramian given directly. Methods size their rank and boundedness thresholds by it: a
    #: float64 Gramian of float32 rows knows them to float32 precision only.
    input_eps: float = float(torch.finfo(torch.float64).eps)

    @abstractmethod
    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        """The K weights for the Gramian ``G = J J^T`` (float64 on the Jacobian's device)."""

    @contextmanager
    def rows_precision(self, jacobian: Tensor) -> Iterator[None]:
        """Within the block, :attr:`input_eps` is the precision of ``jacobian``'s rows (every
        ``aggregate`` of a Gramian method computes its weights inside it)."""
        eps = float(torch.finfo(jacobian.dtype).eps)
        if self.gramian_precision == "float32":
            eps = max(eps, float(torch.finfo(torch.float32).eps))
        self.input_eps = eps
        try:
            yield
        finally:
            self.input_eps = GramianWeighting.input_eps

    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        with self.rows_precision(jacobian):
            weights = self.weights_from_gramian(self.gramian(jacobian)).to(jacobian.dtype)
        return weights @ jacobian, weights

    def get_extra_state(self) -> dict[str, Any]:
        return {}
