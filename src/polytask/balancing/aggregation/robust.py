"""Byzantine-robust aggregators from distributed learning: the trimmed mean and (Multi-)Krum."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import BALANCERS
from ..gradient import GradientBalancer, Level
from ._common import TaskGramianWeighting, check_int_option, task_indices

__all__ = ["Krum", "TrimmedMean", "krum_weights", "trimmed_mean"]


def trimmed_mean(jacobian: Tensor, trim: int) -> tuple[Tensor, Tensor]:
    """The coordinate-wise trimmed mean of the rows and each row's mean coefficient.

    In every column the ``trim`` largest and ``trim`` smallest entries are removed and the
    other ``K - 2 trim`` averaged. Returns the vector and, per row, the fraction of columns
    in which it was kept divided by ``K - 2 trim`` (the weights sum to 1; a row kept in every
    column has the mean's weight ``1 / (K - 2 trim)``).
    """
    k, n = jacobian.shape
    kept = k - 2 * trim
    if trim == 0:
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64, device=jacobian.device)
        return jacobian.mean(dim=0), weights
    order = jacobian.argsort(dim=0, stable=True)
    middle = order[trim : k - trim]
    combined = jacobian.gather(0, middle).mean(dim=0)
    counts = torch.bincount(middle.reshape(-1), minlength=k).to(torch.float64)
    weights = counts / (max(n, 1) * kept)
    return combined, weights.to(jacobian.device)


@BALANCERS.register("trimmed_mean")
class TrimmedMean(GradientBalancer):
    """The coordinate-wise trimmed mean (Yin, Chen, Ramchandran & Bartlett, ICML 2018,
    "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
    https://proceedings.mlr.press/v80/yin18a/yin18a.pdf; TorchJD's ``TrimmedMean``)::

        d_j = mean of the K - 2 b middle values of {g_1j, ..., g_Kj}      (every coordinate j)

    with ``b = trim_number``. Not a combination of whole rows: each coordinate keeps its own
    rows. The effective weight logged per task is the fraction of coordinates in which its
    row was kept, divided by ``K - 2 b`` (:func:`trimmed_mean`). Equivariant to the scale of
    the gradients and invariant to the order of the tasks (ties between equal values give
    the same mean whichever is kept).

    It needs ``K >= 2 b + 1`` rows; a step with fewer (few tasks, or missing labels) trims
    ``min(b, (K - 1) // 2)`` values at each end, and building the method for fewer tasks
    than ``2 b + 1`` warns.

    Args:
        tasks: task names.
        trim_number: ``b``, the number of values removed at each end of every coordinate.
        level: ``"parameter"`` or ``"feature"``.
    """

    def __init__(self, tasks: Sequence[str], trim_number: int = 1, level: Level = "parameter"):
        super().__init__(tasks, level)
        self.trim_number = check_int_option("trim_number", trim_number, low=0)
        if len(self.task_names) < 2 * self.trim_number + 1:
            warnings.warn(
                f"trimmed_mean: balancer.options.trim_number={trim_number} removes "
                f"{2 * trim_number} values per coordinate, which needs at least "
                f"{2 * trim_number + 1} tasks; with {len(self.task_names)} every step trims "
                f"{(len(self.task_names) - 1) // 2}.",
                UserWarning,
                stacklevel=2,
            )

    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        task_indices(self.task_names, tasks)
        trim = min(self.trim_number, (jacobian.shape[0] - 1) // 2)
        combined, weights = trimmed_mean(jacobian, trim)
        return combined, weights.to(jacobian.dtype)


def krum_weights(gramian: Tensor, n_byzantine: int, n_selected: int) -> Tensor:
    """(Multi-)Krum's weights: ``1 / m`` on the ``m = n_selected`` rows of lowest score.

    The score of row ``i`` is the sum of its distances to its ``K - f - 2`` nearest other
    rows (``f = n_byzantine``), with ``|g_i - g_j| = sqrt(G_ii + G_jj - 2 G_ij)``. Ties are
    broken by the smaller index (so the selection follows the order of the tasks only on
    exact ties). Float64 on the Gramian's device.
    """
    g = gramian.detach().to(device="cpu", dtype=torch.float64)
    g = (g + g.T) / 2
    k = g.shape[0]
    diag = g.diagonal()
    distances = (diag[:, None] + diag[None, :] - 2 * g).clamp_min(0).sqrt()
    distances.fill_diagonal_(float("inf"))
    nearest = k - n_byzantine - 2
    scores = distances.sort(dim=1).values[:, :nearest].sum(dim=1)
    order = sorted(range(k), key=lambda i: (float(scores[i]), i))
    weights = torch.zeros(k, dtype=torch.float64)
    weights[order[:n_selected]] = 1.0 / n_selected
    return weights.to(gramian.device)


@BALANCERS.register("krum")
class Krum(TaskGramianWeighting):
    """Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, NeurIPS 2017,
    "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent"; TorchJD's
    ``Krum``).

    Each task gradient is scored by the sum of its distances to its ``K - f - 2`` nearest
    other gradients (``f = n_byzantine``, the number of rows assumed adversarial); the
    update is the mean of the ``m = n_selected`` gradients of lowest score (``m = 1``: Krum,
    the single most central gradient). Distances come from the Gramian
    (:func:`krum_weights`); the selection is invariant to the scale of the gradients, so the
    update is equivariant to it. Exact ties are broken by the task order.

    It needs ``K >= f + 3`` and ``K >= m`` rows; building it for fewer tasks warns, and a
    step with fewer rows (few tasks, or missing labels) uses ``f' = min(f, K - 3)`` (at least 0) and
    ``m' = min(m, K)``; with fewer than 3 tasks the step takes the mean.

    Args:
        tasks: task names.
        n_byzantine: ``f``.
        n_selected: ``m``.
        level: ``"parameter"`` or ``"feature"``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        n_byzantine: int = 0,
        n_selected: int = 1,
        level: Level = "parameter",
    ) -> None:
        super().__init__(tasks, level)
        self.n_byzantine = check_int_option("n_byzantine", n_byzantine, low=0)
        self.n_selected = check_int_option("n_selected", n_selected, low=1)
        k = len(self.task_names)
        if k < self.n_byzantine + 3 or k < self.n_selected:
            warnings.warn(
                f"krum: n_byzantine={n_byzantine} and n_selected={n_selected} need at least "
                f"{max(self.n_byzantine + 3, self.n_selected)} tasks; with {k} every step uses "
                "n_byzantine = min(n_byzantine, K - 3) and n_selected = min(n_selected, K) "
                "(the mean below 3 tasks).",
                UserWarning,
                stacklevel=2,
            )

    def weights_for(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        task_indices(self.task_names, tasks)
        k = gramian.shape[0]
        if k < 3:
            return torch.full((k,), 1.0 / k, dtype=torch.float64, device=gramian.device)
        return krum_weights(gramian, min(self.n_byzantine, k - 3), min(self.n_selected, k))
