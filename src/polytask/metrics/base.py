"""The metric contract: exact accumulation over a whole split, mergeable across processes.

A :class:`Metric` keeps *sufficient statistics* (sums, counts, confusion matrices, or the
raw values where an exact median needs them) in named state tensors. ``update`` adds a
batch, ``compute`` turns the state into values, ``reset`` clears it, and ``merge`` adds
another metric's state, which is all a multi-process evaluation needs: every state is
either summed (``"sum"``) or concatenated (``"cat"``).

Every metric produces one or more named values and declares, for each, whether higher is
better; this is what Delta_m needs to know.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Metric", "Reduction", "select_labelled"]

Reduction = Literal["sum", "cat"]


def select_labelled(pred: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Keep the samples (first dimension) whose per-sample label mask is true."""
    if mask is None:
        return pred, target
    if mask.dim() != 1 or mask.shape[0] != target.shape[0]:
        raise ValueError(
            f"Expected a per-sample mask of shape ({target.shape[0]},), found {tuple(mask.shape)}."
        )
    mask = mask.to(device=target.device, dtype=torch.bool)
    return pred[mask], target[mask]


class Metric(ABC):
    """Base class: subclasses declare states in ``__init__``, implement ``_update`` and ``compute``.

    Attributes:
        higher_is_better: for every value name that ``compute`` returns, whether a higher
            value is better.
    """

    higher_is_better: Mapping[str, bool]

    def __init__(self) -> None:
        self._defaults: dict[str, tuple[Tensor, Reduction]] = {}
        self._state: dict[str, Tensor | list[Tensor]] = {}

    # -- state management -------------------------------------------------------------
    def add_state(self, name: str, default: Tensor, reduction: Reduction) -> None:
        """Declare a state tensor; ``"sum"`` states start at ``default``, ``"cat"`` states empty."""
        self._defaults[name] = (default.clone(), reduction)
        self._state[name] = default.clone() if reduction == "sum" else []

    def reset(self) -> None:
        """Forget every update."""
        for name, (default, reduction) in self._defaults.items():
            self._state[name] = default.clone() if reduction == "sum" else []

    def sum_state(self, name: str) -> Tensor:
        state = self._state[name]
        assert isinstance(state, Tensor)
        return state

    def cat_state(self, name: str) -> Tensor:
        """A ``"cat"`` state as one tensor (empty, of the default's dtype, if nothing was added)."""
        state = self._state[name]
        assert isinstance(state, list)
        if not state:
            return self._defaults[name][0].new_empty((0,))
        return torch.cat(state)

    def accumulate(self, name: str, value: Tensor) -> None:
        """Add ``value`` to a ``"sum"`` state or append it to a ``"cat"`` state (kept on CPU)."""
        default, reduction = self._defaults[name]
        value = value.detach().to("cpu", default.dtype)
        if reduction == "sum":
            self._state[name] = self.sum_state(name) + value
        else:
            state = self._state[name]
            assert isinstance(state, list)
            state.append(value.reshape(-1))

    def merge(self, other: Metric) -> None:
        """Add the state of ``other`` (same class and settings) to this metric."""
        if type(other) is not type(self) or other._defaults.keys() != self._defaults.keys():
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for name, (_, reduction) in self._defaults.items():
            if reduction == "sum":
                self._state[name] = self.sum_state(name) + other.sum_state(name)
            else:
                mine = self._state[name]
                assert isinstance(mine, list)
                mine.append(other.cat_state(name))

    def state_dict(self) -> dict[str, Tensor]:
        """The accumulated state, ``"cat"`` states concatenated (for saving or gathering)."""
        return {
            name: self.sum_state(name) if reduction == "sum" else self.cat_state(name)
            for name, (_, reduction) in self._defaults.items()
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for name, (_, reduction) in self._defaults.items():
            value = state[name].detach().cpu()
            self._state[name] = value.clone() if reduction == "sum" else [value.clone()]

    def sync(self, group: object | None = None) -> None:
        """Make the state global across the processes of ``torch.distributed`` (no-op alone)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for name, (_, reduction) in self._defaults.items():
            if reduction == "sum":
                value = self.sum_state(name).clone()
                dist.all_reduce(value, group=group)  # type: ignore[arg-type]
                self._state[name] = value
            else:
                local = self.cat_state(name)
                gathered: list[Tensor | None] = [None] * dist.get_world_size(group)  # type: ignore[arg-type]
                dist.all_gather_object(gathered, local, group=group)  # type: ignore[arg-type]
                self._state[name] = [t for t in gathered if t is not None]

    # -- the metric itself ------------------------------------------------------------
    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add one batch; samples whose ``mask`` entry is false are ignored."""
        pred, target = select_labelled(pred, target, mask)
        if target.shape[0] == 0:
            return
        with torch.no_grad():
            self._update(pred.detach(), target.detach())

    @abstractmethod
    def _update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of labelled samples to the state."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric values over everything added since the last reset (NaN if nothing was)."""

    def details(self) -> dict[str, list[float | None]]:
        """Per-class (or other per-item) breakdowns of the values, for analysis and reports.

        Never part of Delta_m or model selection. Each entry is a list of floats, ``None``
        where undefined; lists of the same metric are aligned (item ``i`` is the same class in
        every list). The default has none.
        """
        return {}
