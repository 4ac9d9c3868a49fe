"""NTKMTL: each task's gradient weighted by the inverse of its NTK eigenvalue, share of the
trace, to a power (``w_k = (tr G / G_kk)^exponent``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS, BackwardContext
from ..gradient import GramianWeighting, Level, one_blas_thread
from ._common import check_int_option, check_number_option
from .double_sampling import row_dots

__all__ = ["NTKMTL", "ntk_weights"]


def _from_eigenvalues(eigenvalues: Tensor, exponent: float) -> Tensor:
    """``(sum_j lambda_j / lambda_k)^exponent``; 0 where ``lambda_k`` is 0."""
    values = eigenvalues.clamp_min(0.0)
    live = values > 0
    weights = torch.zeros_like(values)
    weights[live] = (values.sum() / values[live]) ** exponent
    return weights


def ntk_weights(gramian: Tensor, exponent: float) -> Tensor:
    """``w_k = (sum_j G_jj / G_kk)^exponent`` (float64); 0 for a task whose gradient is 0.

    With one sample per task the task's NTK is the 1 x 1 matrix ``||g_k||^2 = G_kk``, its
    largest eigenvalue ``lambda_k = G_kk``, and ``sum_j lambda_j = tr G``.
    """
    return _from_eigenvalues(gramian.detach().to(dtype=torch.float64).diagonal(), exponent)


@BALANCERS.register("ntkmtl")
class NTKMTL(GramianWeighting):
    r"""NTKMTL (Qin, Wang, Liao and Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task
    Learning from Neural Tangent Kernel Perspective", NeurIPS 2025,
    https://arxiv.org/abs/2510.18258; official code https://github.com/jianke0604/NTKMTL,
    ``methods/weight_methods.py``, class ``NTKMTL``).

    Under gradient flow, task ``k``'s residual on ``n`` samples decays along the eigen-directions
    of its NTK ``J_k J_k^T`` (``J_k``: the ``n`` per-sample gradients of the shared
    parameters), fastest along the largest eigenvalue ``lambda_k``. NTKMTL scales each task
    so that these rates match: with ``n = 1`` sample (the mean loss of the batch, the setting
    of all the paper's comparisons and of the official code) ``lambda_k = ||g_k||^2 = G_kk``
    and the update is

    .. math::
        d = \sum_k w_k g_k, \qquad
        w_k = \left(\frac{\sum_j \lambda_j}{\lambda_k}\right)^{e}
            = \left(\frac{\operatorname{tr} G}{G_{kk}}\right)^{e},
        \qquad G = J J^T.

    The paper takes the square root, ``e = 0.5`` (the official ``--ntk_exp``, default 0.5;
    its README suggests trying up to 0.75): then every ``w_k g_k`` has the same norm
    ``sqrt(tr G)``. The weights are invariant to a common scale of the gradients, so ``d`` is
    scale-equivariant (``d(cJ) = c d(J)``) and equivariant to the order of the tasks. A task
    whose gradient is exactly zero gets weight 0 (the formula's ``1 / 0``; its row adds
    nothing); if every gradient is zero the update is zero.

    With ``samples = n > 1`` (parameter level only) the trainer cuts every batch into ``n``
    disjoint parts (:attr:`~polytask.balancing.base.Balancer.batch_parts`), each task's
    kernel is the ``n x n`` matrix ``J_k J_k^T`` of its ``n`` part gradients, ``lambda_k``
    its largest eigenvalue, and ``d = sum_k w_k mean_p g_kp``; every other parameter gets the
    mean over the parts of the gradient of ``sum_k L_k`` (the official code's form, commented
    out there: per-sample gradients averaged without weights; for parts of unequal size, the
    last short batch of an epoch, that differs from the whole batch's gradient). Cost: ``K``
    backward passes per part, each through ``1/n`` of the batch, and ``n`` Jacobians in
    memory.

    Levels: ``"parameter"`` (default) is the paper's NTKMTL (``n = 1``). ``"feature"`` uses
    the gradients of the shared representation, the rows NTKMTL-SR reads; with ``n = 1`` it
    is that approximation's weights applied to the representation's gradient.

    Deviations from the official code:

    - It multiplies the combined gradient by ``K`` ("to match the sum loss") and its trainer
      clips the shared parameters' gradient to norm ``max_norm = 1`` afterwards. Here the
      update is the paper's ``d``; ``max_norm > 0`` scales the weights down so that
      ``||d|| <= max_norm`` (as ``nash_mtl``'s option), and ``optim.grad_clip`` clips the
      whole gradient. With Adam, the optimizer of every official experiment, a constant
      factor such as ``K`` only changes the effect of Adam's epsilon.
    - Not implemented: NTKMTL-SR's ``n = 4``
      (per-part representation gradients, eigenvalues of ``n x n`` kernels, the weights
      applied to the losses, so that the task heads are weighted too). NTKMTL-SR needs the
      representation of each part of a batch, which the balancing contract does not give:
      the trainer refuses a balancer that both cuts batches into parts
      (``batch_parts > 1``) and reads the representation. Here every other parameter, a
      task's head included, gets the unweighted gradient of ``sum_k L_k``, as in the
      official ``NTKMTL`` class.

    Args:
        tasks: task names.
        level: ``"parameter"`` (the paper) or ``"feature"``.
        exponent: ``e``, the power of the eigenvalue ratio, in [0, 10] (0: the sum of the
            gradients; 0.5: the paper).
        max_norm: if positive, the weights are scaled down so that ``||d|| <= max_norm``;
            0 (default) keeps the paper's update.
        samples: ``n``, the parts of each batch whose gradients form each task's kernel
            (1: the official default; more: parameter level only).

    State: none (the weights are a function of the step's Gramian).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        exponent: float = 0.5,
        max_norm: float = 0.0,
        samples: int = 1,
    ) -> None:
        super().__init__(tasks, level)
        self.exponent = check_number_option("exponent", exponent, low=0.0, high=10.0)
        self.max_norm = check_number_option("max_norm", max_norm, low=0.0)
        self.samples = check_int_option("samples", samples, low=1)
        if self.samples > 1 and level != "parameter":
            raise ConfigError(
                "balancer.options.samples: more than one sample per task needs the parameter "
                f"gradients of each part of the batch; use level=parameter, found {level!r}."
            )
        self.batch_parts = self.samples

    def extra_repr(self) -> str:
        return (
            f"exponent={self.exponent:g}, max_norm={self.max_norm:g}, samples={self.samples}, "
            f"level={self.level!r}"
        )

    def cost(self, name: str) -> str:
        if self.samples == 1:
            return super().cost(name)
        k = len(self.task_names)
        return (
            f"{name}: each batch cut into {self.samples} parts; {k} backward passes per part "
            f"through the shared parameters (about {k} full-batch ones) and {self.samples} "
            f"Jacobians of {k} rows (docs/balancing.md#gradient-level-methods)."
        )

    def _capped(self, weights: Tensor, gramian: Tensor) -> Tensor:
        if self.max_norm > 0:
            norm = math.sqrt(max(float(weights @ gramian @ weights), 0.0))
            if norm > self.max_norm:
                weights = weights * (self.max_norm / norm)
        return weights

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        """``(tr G / G_kk)^exponent`` per task, scaled down to ``max_norm`` if set."""
        g = gramian.detach().to(dtype=torch.float64)
        return self._capped(ntk_weights(g, self.exponent), g).to(gramian.device)

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        parts = list(ctx.parts)
        if len(parts) <= 1:
            return super().backward(losses, ctx)
        names = list(losses)
        rows, others, other_grads = self._part_rows(
            parts, names, ctx, [1.0 / len(parts)] * len(parts)
        )
        mean = rows[0].clone()  # the mean row, without a stacked copy of every part's
        for r in rows[1:]:
            mean += r
        mean /= len(rows)
        if all(bool(torch.isfinite(r).all()) for r in rows):
            n = len(rows)
            kernels = torch.empty((len(names), n, n), dtype=torch.float64)
            for p in range(n):
                for q in range(p, n):  # g_kp . g_kq in float64 column blocks, all k at once
                    entries = row_dots(rows[p], rows[q]).cpu()
                    kernels[:, p, q] = kernels[:, q, p] = entries
            self._gramian = self._gramian_of = None
            with one_blas_thread():
                largest = torch.linalg.eigvalsh(kernels.cpu())[:, -1]
                gramian = self.gramian(mean).cpu()
                weights = self._capped(_from_eigenvalues(largest, self.exponent), gramian)
            weights = weights.to(device=mean.device, dtype=mean.dtype)
            combined = weights @ mean
            self._diagnostics = {"gramian": gramian.float()}
        else:
            combined, weights = self._not_finite(mean, names, ctx)
        self._deliver(combined, others, other_grads, ctx)
        return {t: weights[i].detach() for i, t in enumerate(names)}
