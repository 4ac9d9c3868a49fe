r"""Delta_m: the multi-task performance of a method relative to single-task baselines.

Two conventions are in use and they can rank methods differently, so every Delta_m polytask
reports names its convention (see :data:`DELTA_M_CONVENTIONS`). With ``M_m`` a method's
value and ``B_m`` the baseline's for metric ``m``, and ``s_m = +1`` if higher is better for
``m``, else ``-1``:

* ``"metric_mean"`` (CAGrad, Nash-MTL, FAMO): the mean over all ``M`` metrics of every task,
  ``Delta_m = (1/M) sum_m (-1)^{h_m} (M_m - B_m) / B_m * 100 = -100 * mean_m s_m (M_m - B_m) / B_m``
  with ``h_m = 1`` if higher is better; in percent, **lower is better**.
* ``"task_mean"`` (LibMTL): for each task ``t`` the mean over its metrics of
  ``s_m (M_m - B_m) / B_m``, then the mean over the ``T`` tasks; a fraction, **higher is better**.

The first weighs a task by its number of metrics (three-metric normals count three times as
much as a one-metric task); the second weighs tasks equally.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError, DataError, did_you_mean

__all__ = ["DELTA_M_CONVENTIONS", "Baseline", "delta_m", "delta_m_higher_is_better"]

DELTA_M_CONVENTIONS: Mapping[str, str] = MappingProxyType(
    {
        "metric_mean": (
            "CAGrad / Nash-MTL / FAMO: (1/M) sum over all M metrics of "
            "(-1)^{h_m} (M_m - B_m) / B_m * 100, h_m = 1 if higher is better; "
            "percent, lower is better."
        ),
        "task_mean": (
            "LibMTL: per task the mean over its metrics of s_m (M_m - B_m) / B_m, "
            "s_m = +1 if higher is better else -1, then the mean over tasks; "
            "a fraction, higher is better."
        ),
    }
)
"""The Delta_m conventions by name, each with a short description."""

_HIGHER_IS_BETTER = {"metric_mean": False, "task_mean": True}
_KEYS = ("source", "values", "higher_is_better")


def _check_convention(convention: str) -> None:
    if convention not in DELTA_M_CONVENTIONS:
        allowed = ", ".join(repr(name) for name in DELTA_M_CONVENTIONS)
        raise ConfigError(
            f"unknown Delta_m convention {convention!r}."
            f"{did_you_mean(convention, DELTA_M_CONVENTIONS)} Known conventions: {allowed}."
        )


def delta_m_higher_is_better(convention: str) -> bool:
    """Whether a higher Delta_m is better in ``convention`` (``"task_mean"``: yes)."""
    _check_convention(convention)
    return _HIGHER_IS_BETTER[convention]


def _problem(values: object, higher_is_better: object, source: object) -> str | None:
    """What is wrong with a baseline's fields, in words, or ``None``."""
    if not isinstance(source, str) or not source.strip():
        return (
            "`source` must be a non-empty string naming where the numbers come from, "
            f"got {source!r}"
        )
    for field, content in (("values", values), ("higher_is_better", higher_is_better)):
        if not isinstance(content, Mapping) or not content:
            return f"`{field}` must be a non-empty mapping task -> metric -> value, got {content!r}"
        for task, metrics in content.items():
            if not isinstance(task, str) or not isinstance(metrics, Mapping) or not metrics:
                return f"`{field}[{task!r}]` must be a non-empty mapping metric -> value"
            for name, value in metrics.items():
                if field == "higher_is_better" and not isinstance(value, bool):
                    return f"`higher_is_better[{task!r}][{name!r}]` must be a bool, got {value!r}"
                if field == "values" and (
                    isinstance(value, bool) or not isinstance(value, (int, float))
                ):
                    return f"`values[{task!r}][{name!r}]` must be a number, got {value!r}"
    assert isinstance(values, Mapping) and isinstance(higher_is_better, Mapping)
    if values.keys() != higher_is_better.keys():
        return (
            f"`values` has tasks {sorted(values)} but `higher_is_better` has tasks "
            f"{sorted(higher_is_better)}"
        )
    for task, metrics in values.items():
        if metrics.keys() != higher_is_better[task].keys():
            return (
                f"`values[{task!r}]` has metrics {sorted(metrics)} but "
                f"`higher_is_better[{task!r}]` has {sorted(higher_is_better[task])}"
            )
        for name, value in metrics.items():
            if value == 0 or not math.isfinite(value):
                return (
                    f"the baseline value of {task}.{name} is {value}; Delta_m divides by it, "
                    "so it must be finite and non-zero"
                )
    return None


@dataclass(frozen=True)
class Baseline:
    """Single-task reference values that Delta_m is measured against.

    Attributes:
        values: task -> metric value name -> the baseline's value (finite, non-zero).
        higher_is_better: task -> metric value name -> whether higher is better; the same
            tasks and metric names as ``values``.
        source: where the numbers come from (a run directory and commit, a paper's table):
            required, so that every reported Delta_m can be traced to its baseline.

    The constructor validates the fields and raises :class:`~polytask.errors.ConfigError`;
    :meth:`load` raises :class:`~polytask.errors.DataError` naming the file instead.
    """

    values: dict[str, dict[str, float]]
    higher_is_better: dict[str, dict[str, bool]]
    source: str

    def __post_init__(self) -> None:
        problem = _problem(self.values, self.higher_is_better, self.source)
        if problem is not None:
            raise ConfigError(f"Invalid baseline: {problem}.")
        # Own plain copies, so that later changes to the caller's dicts cannot alter a baseline.
        values = {t: {m: float(v) for m, v in ms.items()} for t, ms in self.values.items()}
        higher = {t: dict(ms) for t, ms in self.higher_is_better.items()}
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "higher_is_better", higher)

    @classmethod
    def from_results(
        cls,
        results: Mapping[str, Mapping[str, float]],
        higher_is_better: Mapping[str, Mapping[str, bool]],
        source: str,
    ) -> Baseline:
        """The baseline holding, for every metric named in ``higher_is_better``, its result.

        ``results`` (task -> value name -> value, e.g. an evaluation's output) may hold more
        values than ``higher_is_better`` names (losses, say); those are left out. A task or
        metric of ``higher_is_better`` missing from ``results`` is a ConfigError.
        """
        values: dict[str, dict[str, float]] = {}
        for task, metrics in higher_is_better.items():
            if task not in results:
                raise ConfigError(
                    f"the baseline's results have no task {task!r}; found tasks {sorted(results)}."
                )
            values[task] = {}
            for name in metrics:
                if name not in results[task]:
                    raise ConfigError(
                        f"the baseline's results have no metric {task}.{name}; found "
                        f"{sorted(results[task])}."
                    )
                values[task][name] = results[task][name]
        higher = {task: dict(metrics) for task, metrics in higher_is_better.items()}
        return cls(values=values, higher_is_better=higher, source=source)

    def only(self, tasks: Collection[str]) -> Baseline:
        """This baseline restricted to ``tasks`` (the same object when it holds no other
        task): how auxiliary tasks are left out of Delta_m (see ``polytask.Task.auxiliary``).

        Raises:
            ConfigError: none of ``tasks`` is in the baseline.
        """
        kept = [t for t in self.values if t in tasks]
        if len(kept) == len(self.values):
            return self
        if not kept:
            raise ConfigError(
                f"the baseline ({self.source}) has results for {sorted(self.values)} only, "
                f"none of the tasks that count ({sorted(tasks)})."
            )
        return Baseline(
            values={t: self.values[t] for t in kept},
            higher_is_better={t: self.higher_is_better[t] for t in kept},
            source=self.source,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the baseline as JSON (``source``, ``values``, ``higher_is_better``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        content = {
            "source": self.source,
            "values": self.values,
            "higher_is_better": self.higher_is_better,
        }
        path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Baseline:
        """Read a baseline written by :meth:`save`.

        Raises:
            DataError: naming the file and what is wrong with it (missing, not JSON, missing
                or unknown keys, or invalid fields such as a zero baseline value).
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(f"Baseline file {path} does not exist.")
        try:
            content: Any = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"Baseline file {path} is not valid JSON: {exc}.") from None
        if not isinstance(content, dict):
            raise DataError(
                f"Baseline file {path} must hold a JSON object with the keys "
                f"{', '.join(_KEYS)}, found {type(content).__name__}."
            )
        missing = [key for key in _KEYS if key not in content]
        if missing:
            raise DataError(f"Baseline file {path} is missing the key(s) {', '.join(missing)}.")
        unknown = sorted(set(content) - set(_KEYS))
        if unknown:
            raise DataError(
                f"Baseline file {path} has unknown key(s) {', '.join(unknown)}; "
                f"expected {', '.join(_KEYS)}."
            )
        problem = _problem(content["values"], content["higher_is_better"], content["source"])
        if problem is not None:
            raise DataError(f"Baseline file {path}: {problem}.")
        return cls(
            values=content["values"],
            higher_is_better=content["higher_is_better"],
            source=content["source"],
        )


def delta_m(
    results: Mapping[str, Mapping[str, float]],
    baseline: Baseline,
    convention: str = "metric_mean",
) -> float:
    """Delta_m of ``results`` (task -> value name -> value) against ``baseline``.

    The sum runs over the baseline's tasks and metrics (``results`` may hold more); see the
    module docstring for the two conventions. ``"metric_mean"`` returns percent, lower is
    better; ``"task_mean"`` returns a fraction, higher is better.

    Raises:
        ConfigError: for an unknown convention, or a task or metric of the baseline that
            ``results`` lacks.
    """
    _check_convention(convention)
    # gains[t][m] = s_m (M_m - B_m) / B_m: positive when the method beats the baseline.
    gains: dict[str, list[float]] = {}
    for task, metrics in baseline.values.items():
        if task not in results:
            raise ConfigError(
                f"Delta_m needs results for the baseline's task {task!r}; found tasks "
                f"{sorted(results)}."
            )
        gains[task] = []
        for name, base in metrics.items():
            if name not in results[task]:
                raise ConfigError(
                    f"Delta_m needs the baseline's metric {task}.{name}; found "
                    f"{sorted(results[task])} for task {task!r}."
                )
            sign = 1.0 if baseline.higher_is_better[task][name] else -1.0
            gains[task].append(sign * (float(results[task][name]) - base) / base)
    if convention == "metric_mean":
        every = [gain for task_gains in gains.values() for gain in task_gains]
        return -100.0 * math.fsum(every) / len(every)
    return math.fsum(math.fsum(g) / len(g) for g in gains.values()) / len(gains)
