"""Linear scalarisation with fixed weights from the options (tuned, e.g., on a validation split)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ...errors import ConfigError, did_you_mean
from ..base import BALANCERS, LossWeighting

__all__ = ["FixedWeights"]


@BALANCERS.register("fixed")
class FixedWeights(LossWeighting):
    r"""Linear scalarisation with fixed weights: ``L = sum_k w_k L_k``.

    The weights ``w_k`` are constants given by ``balancer.options.weights`` (a mapping from
    every task name to a finite number ``>= 0``, not all zero). This is the baseline that
    recent comparisons of multi-task optimisers find hard to beat once its weights are tuned
    (Xin et al., "Do Current Multi-Task Optimization Methods in Deep Learning Even Help?",
    NeurIPS 2022; Kurin et al., "In Defense of the Unitary Scalarization for Deep Multi-Task
    Learning", NeurIPS 2022): a grid of weight vectors, each trained and scored on the
    validation split. ``configs/tabular/solarflare-weights-grid.yaml`` is such a search
    (``docs/benchmarks.md``).

    Without ``weights`` every task has weight 1 (equal weighting). When ``weights`` is given it
    must name every task exactly once: a task left out, or a name that is not a task, is a
    :class:`~polytask.errors.ConfigError` (a forgotten task silently weighted 1 would make
    the grid cells differ from what their names say).

    Args:
        tasks: task names.
        weights: ``{task: weight}`` for every task (default: all 1).
    """

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__(tasks)
        if weights is None:
            values = {t: 1.0 for t in self.task_names}
        else:
            if not isinstance(weights, Mapping):
                raise ConfigError(
                    "balancer.options.weights: expected a mapping from task name to weight, "
                    f"found {weights!r}."
                )
            for name in weights:
                if name not in self.task_names:
                    raise ConfigError(
                        f"balancer.options.weights: unknown task {name!r}."
                        f"{did_you_mean(str(name), self.task_names)} The tasks are "
                        f"{', '.join(self.task_names)}."
                    )
            missing = [t for t in self.task_names if t not in weights]
            if missing:
                raise ConfigError(
                    f"balancer.options.weights: no weight for task(s) {', '.join(missing)}; "
                    "give one for every task."
                )
            values = {}
            for t in self.task_names:
                value = weights[t]
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not math.isfinite(value)
                    or value < 0
                ):
                    raise ConfigError(
                        f"balancer.options.weights.{t}: expected a finite number >= 0, "
                        f"found {value!r}."
                    )
                values[t] = float(value)
            if not any(v > 0 for v in values.values()):
                raise ConfigError(
                    "balancer.options.weights: every weight is 0, so nothing would be trained; "
                    "give at least one task a positive weight."
                )
        self.fixed: dict[str, float] = values

    def extra_repr(self) -> str:
        return f"weights={self.fixed}"

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        unknown = [t for t in losses if t not in self.fixed]
        if unknown:
            raise ValueError(
                f"FixedWeights: unknown task(s) {unknown}; the method was built for "
                f"{list(self.task_names)}."
            )
        return {
            t: torch.tensor(self.fixed[t], dtype=loss.dtype, device=loss.device)
            for t, loss in losses.items()
        }
