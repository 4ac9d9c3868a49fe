r"""The decathlon score: how well one model does on many classification tasks at once.

Rebuffi, Bilen and Vedaldi ("Learning multiple visual domains with residual adapters",
NeurIPS 2017, https://arxiv.org/abs/1705.08045, section 5) score a model on ``D`` tasks by
its test error ``E_d`` (in percent) on each:

.. math::

    S = \sum_{d=1}^{D} \alpha_d \max(0, E_d^{max} - E_d)^{\gamma},
    \qquad E_d^{max} = 2 E_d^{base}, \quad \gamma = 2, \quad \alpha_d = 1000 (E_d^{max})^{-\gamma}

where ``E_d^{base}`` is the error of a baseline on task ``d`` (theirs: a network fine-tuned
on that task alone; polytask's grids: the single-task cell). Each task contributes from 0
(an error at least twice the baseline's) to 1000 points (no error); the baseline itself
scores 250 per task. Unlike Delta_m, the score rewards doing well on *every* task: a task
whose error doubles contributes nothing, however good the others are, and the quadratic
rewards the last points of error more than the first.

``E_d^{base} = 0`` (a perfect baseline) makes ``alpha_d`` infinite; polytask uses the limit
of the formula as the baseline error tends to 0: 1000 points for a perfect result, 0 for
any error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..errors import ConfigError
from .delta_m import Baseline

__all__ = ["DECATHLON_GAMMA", "DECATHLON_POINTS", "decathlon_score", "task_points"]

DECATHLON_GAMMA = 2.0
DECATHLON_POINTS = 1000.0
"""The most points one task can contribute."""


def task_points(
    error: float,
    baseline_error: float,
    *,
    gamma: float = DECATHLON_GAMMA,
    points: float = DECATHLON_POINTS,
) -> float:
    """One task's term ``alpha max(0, E_max - E)^gamma`` with ``E_max = 2 * baseline_error``.

    Errors are in percent (any unit works: the term only depends on ``error / E_max``).
    """
    if not (math.isfinite(error) and math.isfinite(baseline_error)):
        raise ConfigError(
            f"Expected finite errors, found error {error} and baseline error {baseline_error}."
        )
    if error < 0 or baseline_error < 0:
        raise ConfigError(
            f"Expected errors >= 0, found error {error} and baseline error {baseline_error}."
        )
    e_max = 2.0 * baseline_error
    if e_max == 0.0:
        return points if error == 0.0 else 0.0
    return float(points * (max(0.0, e_max - error) / e_max) ** gamma)


def decathlon_score(
    metrics: Mapping[str, Mapping[str, float]],
    baseline: Baseline,
    *,
    metric: str = "accuracy",
    gamma: float = DECATHLON_GAMMA,
    points: float = DECATHLON_POINTS,
) -> float:
    """The decathlon score of ``metrics`` against ``baseline`` (higher is better).

    Args:
        metrics: task -> value name -> value, e.g. ``results["test"]["metrics"]`` of a run.
        baseline: the single-task results; the score sums over **its** tasks that have
            ``metric`` (so a baseline holding other metrics too can be passed as is).
        metric: the value that measures each task. If the baseline says higher is better it
            is an accuracy in percent and the error is ``100 - value`` (``accuracy``);
            otherwise it is the error itself, in percent.
        gamma, points: the exponent and the most points per task (2 and 1000 in the paper).

    Returns:
        ``S`` between 0 and ``points`` times the number of scored tasks; the baseline's own
        results score ``points / 2**gamma`` per task (250).

    Raises:
        ConfigError: no task of the baseline has ``metric``; ``metrics`` lacks a scored task
            or value; an accuracy is outside [0, 100] or an error negative.

    Example:
        >>> base = Baseline(
        ...     values={"a": {"accuracy": 90.0}, "b": {"accuracy": 80.0}},
        ...     higher_is_better={"a": {"accuracy": True}, "b": {"accuracy": True}},
        ...     source="example",
        ... )
        >>> # a: error 5 against E_max 20 -> 1000 * (15 / 20)^2 = 562.5
        >>> # b: error 30 against E_max 40 -> 1000 * (10 / 40)^2 = 62.5
        >>> decathlon_score({"a": {"accuracy": 95.0}, "b": {"accuracy": 70.0}}, base)
        625.0
    """
    scored = [task for task, values in baseline.values.items() if metric in values]
    if not scored:
        raise ConfigError(
            f"The decathlon score needs a baseline with the metric {metric!r}; the baseline "
            f"has {sorted({m for values in baseline.values.values() for m in values})}."
        )
    total = []
    for task in scored:
        if task not in metrics or metric not in metrics[task]:
            found = sorted(metrics[task]) if task in metrics else f"no task {task!r}"
            raise ConfigError(
                f"The decathlon score needs {task}.{metric} (a task of the baseline); found "
                f"{found}."
            )
        value, base = float(metrics[task][metric]), baseline.values[task][metric]
        if baseline.higher_is_better[task][metric]:
            for name, accuracy in ((f"{task}.{metric}", value), ("the baseline's", base)):
                if not 0.0 <= accuracy <= 100.0:
                    raise ConfigError(
                        f"Expected {name} accuracy in percent, in [0, 100], found {accuracy}."
                    )
            error, base_error = 100.0 - value, 100.0 - base
        else:
            error, base_error = value, base
        total.append(task_points(error, base_error, gamma=gamma, points=points))
    return math.fsum(total)
