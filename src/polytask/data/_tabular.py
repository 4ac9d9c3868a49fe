"""What the tabular data sets share: files shipped inside a package, seeded stratified splits,
one-hot and standardised features, and regression targets learnt in standard units.

A regression target of large scale (a body mass in grams) is learnt in standard units but
evaluated in its own unit, without a round trip through floating point for the targets:

- the data set keeps the target in its own unit (grams);
- the task's loss is :class:`StandardizedLoss`: it compares the prediction with
  ``(target - mean) / std`` (the mean and the standard deviation of the *training* split),
  so the network's output is in standard units;
- the task's ``postprocess`` is :class:`Unstandardize`, ``pred * std + mean``, which the
  evaluation applies to predictions (never before the loss), so the metrics compare
  predictions in the target's unit with the untouched targets.
"""

from __future__ import annotations

import hashlib
import importlib.util
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..losses import Loss
from .base import SPLITS

__all__ = [
    "StandardizedLoss",
    "Unstandardize",
    "check_fractions",
    "one_hot",
    "package_file",
    "split_indices",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]
INSTALL = "pip install 'polytask[data]'"


def package_file(package: str, relative: str, what: str) -> Path:
    """The file ``relative`` inside the installed ``package``, found without importing it.

    Raises:
        DataError: the package is not installed, or it has no such file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"{what} needs the Python package {package!r}, which is not installed. "
            f"Install it with `{INSTALL}`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(
            f"{what}: the package {package!r} has no file {path}. Reinstall it with "
            f"`pip install --force-reinstall {package}` (or `{INSTALL}`)."
        )
    return path


def sha256_of_rows(rows: Sequence[Sequence[str]]) -> str:
    """SHA-256 of the rows, each joined by ',' and ended by a newline (a canonical CSV)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update((",".join(row) + "\n").encode())
    return digest.hexdigest()


def _check_fraction(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 < float(value) < 1.0
    ):
        raise ConfigError(f"Expected option `{name}` to be a number in (0, 1), found {value!r}.")
    return float(value)


def check_fractions(val_fraction: object, test_fraction: object) -> dict[str, float]:
    """``{"val": v, "test": t}``, both in (0, 1) with ``v + t < 1``, or a ConfigError."""
    val = _check_fraction("val_fraction", val_fraction)
    test = _check_fraction("test_fraction", test_fraction)
    if val + test >= 1.0:
        raise ConfigError(
            f"Expected options `val_fraction` + `test_fraction` to be below 1 (the rest is the "
            f"train split), found {val} + {test} = {val + test}."
        )
    return {"val": val, "test": test}


def split_indices(
    strata: IntArray, fractions: dict[str, float], seed: int, salt: str
) -> dict[str, IntArray]:
    """Disjoint, sorted row indices of every split, stratified by ``strata`` and seeded.

    Within each stratum (rows of equal ``strata`` value) the rows are permuted, then
    ``round(fraction * n)`` go to val, as many to test, the rest to train.
    """
    stream = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "big")
    rng = np.random.default_rng([seed, stream])
    parts: dict[str, list[IntArray]] = {split: [] for split in SPLITS}
    for value in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == value))
        n_val = round(fractions["val"] * len(members))
        n_test = round(fractions["test"] * len(members))
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    return {split: np.sort(np.concatenate(parts[split])).astype(np.int64) for split in SPLITS}


def one_hot(values: Sequence[str], levels: Sequence[str]) -> FloatArray:
    """``(len(values), len(levels))`` float32 indicators; every value must be a level."""
    index = {level: i for i, level in enumerate(levels)}
    out = np.zeros((len(values), len(levels)), dtype=np.float32)
    out[np.arange(len(values)), [index[v] for v in values]] = 1.0
    return out


class StandardizedLoss:
    """A loss applied in standard units: ``base(pred, (target - mean) / std, mask)``.

    ``pred`` is in standard units; ``target`` in the target's own unit. See the module
    docstring for how the metrics see the target's unit.
    """

    def __init__(self, base: Loss, mean: float, std: float) -> None:
        if not std > 0.0:
            raise ValueError(f"Expected a positive standard deviation, found {std}.")
        self.base = base
        self.mean = float(mean)
        self.std = float(std)

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        standard = (target.to(pred.dtype) - self.mean) / self.std
        return self.base(pred, standard, mask)

    def __repr__(self) -> str:
        return f"StandardizedLoss({self.base!r}, mean={self.mean}, std={self.std})"


class Unstandardize:
    """A prediction in standard units back in the target's unit: ``pred * std + mean``."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean = float(mean)
        self.std = float(std)

    def __call__(self, pred: Tensor) -> Tensor:
        return pred.to(torch.float64) * self.std + self.mean

    def __repr__(self) -> str:
        return f"Unstandardize(mean={self.mean}, std={self.std})"
