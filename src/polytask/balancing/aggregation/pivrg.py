"""PIVRG: FairGrad's equation (alpha = 2) with performance-informed priorities on its
right-hand side, ``(G w)_k = (p_k / w_k)^(1/2)``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ...errors import CheckpointError, ConfigError
from ..base import BALANCERS
from ..gradient import Level
from ._common import check_number_option
from .fairgrad import FairGrad, OnFailure

__all__ = ["PIVRG", "pivrg_priorities"]


def pivrg_priorities(scores: Tensor, bound: float, min_temperature: float) -> Tensor:
    """``p = K softmax(s / T)`` with ``T = max((max s - min s) / ln(bound), min_temperature)``.

    ``scores`` are the tasks' performance deficits (larger: further behind); the temperature
    keeps ``max p / min p = exp((max s - min s) / T) <= bound``.
    """
    spread = float(scores.max() - scores.min())
    temperature = max(spread / math.log(bound), min_temperature)
    return scores.shape[0] * torch.softmax(scores / temperature, dim=0)


@BALANCERS.register("pivrg")
class PIVRG(FairGrad):
    r"""PIVRG (Qin, Wang and Yan, "Revisiting Fairness in Multitask Learning: A
    Performance-Driven Approach for Variance Reduction", CVPR 2025, pp. 20492-20501;
    official code ``jianke0604/MTLlib``, also carried by ``jianke0604/NTKMTL``).

    FairGrad's optimality condition with ``alpha = 2`` and a priority ``p_k`` for every task
    on its right-hand side, as the official ``PIVRG.get_weighted_loss`` solves it::

        (G w)_k = (p_k / w_k)^(1/2),   w > 0,   G = J J^T,   d = w @ J

        p = K softmax(s / T),   T = max((max_k s_k - min_k s_k) / ln(bound), min_temperature)

    so that ``g_k . d = (p_k / w_k)^(1/2)``: the stationarity condition of maximising
    ``sum_k p_k u_k^(1 - alpha) / (1 - alpha)`` over the rates ``u_k = g_k . d`` (a
    priority-weighted alpha-fair utility, alpha = 2). ``s_k`` is task ``k``'s performance
    *deficit*, in percent, relative to a single-task reference (positive: worse than the
    reference); the temperature bounds the ratio of the largest to the smallest priority by
    ``bound``, and ``min_temperature`` keeps small differences of scores from mattering.
    Lagging tasks get the larger priorities, which is how the method narrows the spread of
    the tasks' performances (the paper's "variance reduction"). With equal scores ``p = 1``
    and the method is FairGrad with ``alpha = 2``. Defaults from the official code:
    ``bound = 2``, ``min_temperature = 10`` (``--bound``, ``--mintemp``).

    Solver: the substitution ``w = v / p`` turns the condition into FairGrad's,
    ``(G' v)_k = v_k^(-1/2)`` with ``G' = diag(1/p) G diag(1/p)``, which
    :class:`~polytask.balancing.aggregation.FairGrad`'s exact solver (same ``max_iter``,
    ``tol``, ``on_failure``) solves; the official code hands the equation to
    ``scipy.optimize.least_squares`` without checking the residual. Scaling the gradients by
    ``c`` scales ``w`` by ``c^(-4/3)`` and ``d`` by ``c^(-1/3)`` (FairGrad's laws at
    ``alpha = 2``).

    The scores: the official trainers compute, once per epoch, each task's relative
    difference to the single-task results of the benchmark's Delta_m (``delta_fn_arr``, sign
    flipped so that worse is positive) from evaluation metrics: QM9 from the validation
    split's MAE, NYUv2 from the epoch's *training* metrics (averaged over each task's
    metrics); the first epoch uses zeros. A balancer never sees metrics, so here, as a
    deviation, the score is the same relative difference computed from the epoch's mean
    training loss (:meth:`on_epoch_end`, the same on every process)::

        s_k = 100 (Lbar_k - b_k) / b_k

    with ``b_k`` the ``baseline`` option (the task's single-task training loss, for instance)
    or, without it, the task's mean training loss of the first epoch (then the score is the
    relative progress since then: a task that has improved less gets more priority). From
    Python, :meth:`set_scores` replaces the scores with the paper's metric-based ones. The
    official code also multiplies the update by ``K`` and clips the shared gradient's norm to
    1 (``max_norm``); neither here, as for ``fairgrad`` (clipping is ``optim.grad_clip``).

    Args:
        tasks: task names.
        level: ``"parameter"`` (the paper) or ``"feature"``.
        bound: the largest ratio of two priorities, ``> 1``.
        min_temperature: the smallest softmax temperature, ``> 0`` (score units: percent).
        baseline: a reference loss ``> 0`` for every task (see above); None: the first
            epoch's mean training losses.
        max_iter, tol, on_failure: FairGrad's solver options.

    State (saved in checkpoints): the scores, the first epoch's losses where they are the
    reference, and the solver's last ``v = p w`` of each task (its warm start).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        bound: float = 2.0,
        min_temperature: float = 10.0,
        baseline: Mapping[str, float] | None = None,
        max_iter: int = 200,
        tol: float = 1e-10,
        on_failure: OnFailure = "warn",
    ) -> None:
        super().__init__(
            tasks, level=level, alpha=2.0, max_iter=max_iter, tol=tol, on_failure=on_failure
        )
        self.bound = check_number_option("bound", bound, low=1.0)
        if self.bound <= 1.0:
            raise ConfigError(f"balancer.options.bound: expected a number > 1, found {bound!r}.")
        self.min_temperature = check_number_option("min_temperature", min_temperature, low=0.0)
        if self.min_temperature <= 0.0:
            raise ConfigError(
                f"balancer.options.min_temperature: expected a number > 0, found "
                f"{min_temperature!r}."
            )
        self.baseline: dict[str, float] | None = None
        if baseline is not None:
            if not isinstance(baseline, Mapping):
                raise ConfigError(
                    "balancer.options.baseline: expected a mapping from task name to a "
                    f"reference loss, found {baseline!r}."
                )
            unknown = sorted(set(baseline) - set(self.task_names))
            missing = [t for t in self.task_names if t not in baseline]
            if unknown or missing:
                raise ConfigError(
                    f"balancer.options.baseline: expected one reference loss for each of the "
                    f"tasks {list(self.task_names)}; unknown {unknown}, missing {missing}."
                )
            self.baseline = {
                t: check_number_option(f"baseline.{t}", baseline[t], low=0.0)
                for t in self.task_names
            }
            zero = [t for t, v in self.baseline.items() if v <= 0.0]
            if zero:
                raise ConfigError(
                    f"balancer.options.baseline: expected reference losses > 0, found 0 for {zero}."
                )
        self._scores: dict[str, float] = {t: 0.0 for t in self.task_names}
        self._reference: dict[str, float] = {}

    def extra_repr(self) -> str:
        return (
            f"bound={self.bound:g}, min_temperature={self.min_temperature:g}, level={self.level!r}"
        )

    @property
    def scores(self) -> dict[str, float]:
        """The current performance deficit of each task, in percent."""
        return dict(self._scores)

    def set_scores(self, scores: Mapping[str, float]) -> None:
        """Replace the scores of the tasks in ``scores`` (e.g. metric-based deficits to a
        single-task baseline, the paper's form; positive: worse than the baseline)."""
        for task, value in scores.items():
            if task not in self.task_names:
                raise ValueError(f"pivrg: unknown task {task!r}; the tasks are {self.task_names}")
            if not math.isfinite(float(value)):
                raise ValueError(f"pivrg: the score of {task!r} is not finite: {value!r}")
        self._scores.update({t: float(v) for t, v in scores.items()})

    def priorities(self, tasks: Sequence[str]) -> Tensor:
        """``p`` for ``tasks`` (float64, on the CPU), from their current scores."""
        scores = torch.tensor([self._scores[t] for t in tasks], dtype=torch.float64)
        return pivrg_priorities(scores, self.bound, self.min_temperature)

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        """``w = v / p``, ``v`` FairGrad's root (alpha = 2) for ``diag(1/p) G diag(1/p)``."""
        tasks = self._tasks if self._tasks is not None else self.task_names
        if len(tasks) != gramian.shape[0]:
            raise ValueError(
                f"a {gramian.shape[0]} x {gramian.shape[0]} Gramian for {len(tasks)} tasks; "
                "call backward() or pass the Gramian of all tasks"
            )
        p = self.priorities(tasks).to(gramian.device)
        scaled = gramian.to(torch.float64) / (p[:, None] * p[None, :])
        v = super().weights_from_gramian(scaled)
        return v / p

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float]) -> None:
        for task, value in train_losses.items():
            loss = float(value)
            if task not in self._scores or not math.isfinite(loss):
                continue
            if self.baseline is not None:
                reference = self.baseline[task]
            else:
                reference = self._reference.setdefault(task, loss)
            if reference > 0:
                self._scores[task] = 100.0 * (loss - reference) / reference

    def get_extra_state(self) -> dict[str, object]:
        state = super().get_extra_state()
        state["scores"] = dict(self._scores)
        state["reference"] = dict(self._reference)
        return state

    def set_extra_state(self, state: object) -> None:
        super().set_extra_state(state)
        assert isinstance(state, dict)
        scores, reference = state.get("scores", {}), state.get("reference", {})
        if not isinstance(scores, dict) or not isinstance(reference, dict):
            raise CheckpointError(
                "the pivrg balancer state should hold 'scores' and 'reference' dicts, found "
                f"{type(scores).__name__} and {type(reference).__name__}"
            )
        self._scores = {t: 0.0 for t in self.task_names}
        self._scores.update({str(t): float(v) for t, v in scores.items()})
        self._reference = {str(t): float(v) for t, v in reference.items()}
