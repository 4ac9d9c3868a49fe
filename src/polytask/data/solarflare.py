"""Solar Flare: three counts of solar flares from one description of a sunspot group.

The UCI Solar Flare data (second file, 1,066 active regions observed in 1978; G. Bradshaw,
https://archive.ics.uci.edu/dataset/89/solar+flare), as the river package ships it
(``river/datasets/solar-flare.csv.zip``, read here without importing river). It is ``sf2`` of
the multi-target regression benchmarks of Spyromitros-Xioufis, Tsoumakas, Groves and
Vlahavas ("Multi-target regression via input space expansion: treating targets as inputs",
Machine Learning 104, 2016, https://doi.org/10.1007/s10994-016-5546-z), which predict the
three counts directly (raw counts, no transform) and report their RMSE.

Inputs: ten categorical attributes of the sunspot group (modified Zurich class, size and
distribution of the largest spot, activity, evolution, flare activity in the previous 24 h,
whether it was and is historically complex, area, area of the largest spot). Each attribute
is one-hot encoded over the levels found in the file (:data:`LEVELS`, in that order); the
largest spot's area has one level in this file, so it is left out: 30 features of 0 / 1.

Tasks: ``c_class``, ``m_class`` and ``x_class``, the number of C-, M- and X-class flares the
region produced in the following 24 hours, as float targets of shape ``(1,)``: regression
with MSE on the counts themselves (as the benchmark above) and MAE / RMSE in flares. Most
regions produce none (884, 1,030 and 1,061 of 1,066).

Splits: seeded and stratified by the strongest flare class the region produced (none, C,
M or X), so that the few M- and X-class rows are spread over the three splits.
"""

from __future__ import annotations

import csv
import io
import zipfile
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..losses import MSELoss
from ..metrics.regression import RegressionMetric
from ..tasks import Task
from ._options import check_int
from ._tabular import (
    FloatArray,
    IntArray,
    check_fractions,
    one_hot,
    package_file,
    sha256_of_rows,
    split_indices,
)
from .base import DATASETS, SPLITS, DataBundle
from .tensor import TensorMTLDataset

__all__ = ["LEVELS", "TARGETS", "load_source", "solarflare"]

SOURCE = "river/datasets/solar-flare.csv.zip"
ROWS = 1066
LEVELS: dict[str, tuple[str, ...]] = {
    "zurich-class": ("B", "C", "D", "E", "F", "H"),
    "largest-spot-size": ("A", "H", "K", "R", "S", "X"),
    "spot-distribution": ("C", "I", "O", "X"),
    "activity": ("1", "2"),
    "evolution": ("1", "2", "3"),
    "previous-24h-flare-activity": ("1", "2", "3"),
    "hist-complex": ("1", "2"),
    "hist-complex-this-pass": ("1", "2"),
    "area": ("1", "2"),
}
"""The one-hot levels of every input attribute, in the order of the features."""
CONSTANT = {"largest-spot-area": "1"}
"""Attributes with a single level in this file, checked and left out."""
TARGETS: dict[str, str] = {
    "c_class": "c-class-flares",
    "m_class": "m-class-flares",
    "x_class": "x-class-flares",
}
"""Task name -> column of the file."""
COLUMNS = (*LEVELS, *CONSTANT, *TARGETS.values())
SOURCE_SHA256 = "7ae467f9d903b682389150c619417772e7a9b25a8810139a62236d68e736367b"
"""SHA-256 of the rows (header included), each joined by ',' and ended by a newline."""
FIX = "Reinstall river (`pip install --force-reinstall river`, or `pip install 'polytask[data]'`)."


def _read_rows() -> list[list[str]]:
    path = package_file("river", "datasets/solar-flare.csv.zip", "The solarflare data set")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if len(names) != 1:
                raise DataError(f"Expected one CSV file in {path}, found {names}. {FIX}")
            text = archive.read(names[0]).decode("utf-8")
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise DataError(f"Could not read {path}: {exc}. {FIX}") from exc
    return [row for row in csv.reader(io.StringIO(text)) if row]


def load_source() -> tuple[FloatArray, dict[str, FloatArray], IntArray]:
    """The verified data: features ``(1066, 30)``, ``{task: counts (1066,)}`` and the
    strongest flare class of every row (0 none, 1 C, 2 M, 3 X; the split strata).

    Raises:
        DataError: river is not installed, or its file does not have the expected columns,
            rows, levels or checksum.
    """
    rows = _read_rows()
    header, body = rows[0], rows[1:]
    if tuple(header) != COLUMNS:
        raise DataError(
            f"Expected {SOURCE} to have the columns {list(COLUMNS)}, found {header}. {FIX}"
        )
    if len(body) != ROWS or any(len(row) != len(COLUMNS) for row in body):
        raise DataError(
            f"Expected {SOURCE} to have {ROWS} rows of {len(COLUMNS)} values, found "
            f"{len(body)} rows of lengths {sorted({len(row) for row in body})}. {FIX}"
        )
    columns = {name: [row[i] for row in body] for i, name in enumerate(COLUMNS)}
    for name, levels in (*LEVELS.items(), *((n, (v,)) for n, v in CONSTANT.items())):
        found = sorted(set(columns[name]))
        if found != sorted(levels):
            raise DataError(
                f"Expected the levels {list(levels)} in column {name!r} of {SOURCE}, "
                f"found {found}. {FIX}"
            )
    if not all(v.isdigit() for column in TARGETS.values() for v in columns[column]):
        raise DataError(f"Expected non-negative integer flare counts in {SOURCE}. {FIX}")
    digest = sha256_of_rows(rows)
    if digest != SOURCE_SHA256:
        raise DataError(f"Expected {SOURCE} to have SHA-256 {SOURCE_SHA256}, found {digest}. {FIX}")
    features = np.concatenate([one_hot(columns[n], levels) for n, levels in LEVELS.items()], 1)
    counts = {
        task: np.asarray(columns[column], dtype=np.float32) for task, column in TARGETS.items()
    }
    strongest = np.zeros(ROWS, dtype=np.int64)
    for level, task in enumerate(TARGETS, start=1):
        strongest[counts[task] > 0] = level
    return features, counts, strongest


def _make_tasks() -> dict[str, Task]:
    return {
        task: Task(
            name=task,
            loss=MSELoss(),
            metrics={"regression": RegressionMetric},
            output_dim=1,
            kind="regression",
            description=f"{task[0].upper()}-class flares in the next 24 h (a count, shape (1,))",
        )
        for task in TARGETS
    }


@DATASETS.register("solarflare")
def solarflare(
    *, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> DataBundle:
    """Build Solar Flare (see the module docstring): 30 one-hot features, three count tasks.

    Args:
        seed: seeds the split, >= 0.
        val_fraction, test_fraction: the share of every stratum that goes to val and to
            test, each in (0, 1) and together below 1; the rest is train.

    Raises:
        ConfigError: an option is out of range.
        DataError: river is not installed or its bundled file is altered.

    Example:
        >>> bundle = solarflare(seed=0)
        >>> bundle.input_shape, {s: len(bundle.split(s)) for s in ("train", "val", "test")}
        ((30,), {'train': 638, 'val': 214, 'test': 214})
    """
    seed = check_int("seed", seed, 0)
    fractions = check_fractions(val_fraction, test_fraction)
    features, counts, strongest = load_source()
    indices = split_indices(strongest, fractions, seed, "solarflare")
    splits = {
        split: TensorMTLDataset(
            torch.from_numpy(features[rows]),
            {task: torch.from_numpy(values[rows][:, None]) for task, values in counts.items()},
        )
        for split, rows in indices.items()
    }
    info: dict[str, Any] = {
        "source": SOURCE,
        "source_size": ROWS,
        "features": [f"{name}={level}" for name, levels in LEVELS.items() for level in levels],
        "seed": seed,
        "fractions": fractions,
        "sizes": {split: len(indices[split]) for split in SPLITS},
        "indices": {split: indices[split].tolist() for split in SPLITS},
        "rows_with_flares": {task: int((values > 0).sum()) for task, values in counts.items()},
    }
    return DataBundle(
        tasks=_make_tasks(),
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        input_shape=(features.shape[1],),
        info=info,
    )
