"""Private helpers of the projection-style gradient methods (PCGrad, GradVac, CAGrad, IMTL-G,
GradDrop, GradNorm): option checks, task bookkeeping, owned random generators."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from ..gradient import GramianWeighting

__all__ = [
    "TaskGramianWeighting",
    "check_int_option",
    "check_number_option",
    "load_generator_state",
    "normalized_gramian",
    "task_indices",
]


def check_number_option(
    key: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
) -> float:
    """``value`` as a float if it is a finite number in ``[low, high]``.

    Otherwise a :class:`ConfigError` naming ``balancer.options.<key>``. Strings such as
    ``"1e-4"`` (which YAML reads as text) are accepted when they parse as a float.
    """
    number: float | None = None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    where = f"balancer.options.{key}"
    if number is None or not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, found {value!r}.")
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = (
            f"in [{low:g}, {high:g}]"
            if low is not None and high is not None
            else (f">= {low:g}" if low is not None else f"<= {high:g}")
        )
        raise ConfigError(f"{where}: expected a number {bounds}, found {value!r}.")
    return number


def check_int_option(key: str, value: object, *, low: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) ``>= low``, else a :class:`ConfigError`."""
    where = f"balancer.options.{key}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, found {value!r}.")
    if low is not None and value < low:
        raise ConfigError(f"{where}: expected an integer >= {low}, found {value!r}.")
    return value


def task_indices(all_tasks: Sequence[str], tasks: Sequence[str]) -> list[int]:
    """The position of each of ``tasks`` in ``all_tasks`` (the balancer's fixed task order)."""
    index = {name: i for i, name in enumerate(all_tasks)}
    unknown = [t for t in tasks if t not in index]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the balancer was built for {list(all_tasks)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks listed twice: {list(tasks)}")
    return [index[t] for t in tasks]


def normalized_gramian(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """``G / s`` with ``s`` the mean squared gradient norm (1 where every gradient is zero).

    Weights computed from the normalised Gramian are invariant to the scale of the gradients:
    the normalisation is exact up to rounding, with no threshold that depends on the scale.
    Returns the normalised Gramian and ``s``.
    """
    k = gramian.shape[0]
    scale = gramian.diagonal().sum() / max(k, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return gramian / scale, scale


def load_generator_state(generator: torch.Generator, state: object, key: str) -> None:
    """Restore a CPU generator from the uint8 tensor that ``get_state()`` returned."""
    if not isinstance(state, Tensor) or state.dtype != torch.uint8:
        raise ValueError(f"balancer state {key!r}: expected a uint8 tensor, found {state!r}")
    generator.set_state(state.cpu())


class TaskGramianWeighting(GramianWeighting):
    """A Gramian weighting that also knows which tasks the rows belong to.

    Methods with per-task state (random orders keyed by task, EMA targets per pair of tasks)
    implement :meth:`weights_for`; the rows may be any subset of :attr:`task_names` in any
    order. :meth:`weights_from_gramian` is the same for a Gramian of all tasks in order.
    """

    @abstractmethod
    def weights_for(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        """The weights for the Gramian of ``tasks``' gradients (float64, K x K)."""

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        return self.weights_for(gramian, self.task_names[: gramian.shape[0]])

    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        with self.rows_precision(jacobian):
            weights = self.weights_for(self.gramian(jacobian), tasks).to(jacobian.dtype)
        return weights @ jacobian, weights

    def get_extra_state(self) -> dict[str, Any]:
        return {}
