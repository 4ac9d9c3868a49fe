"""Palmer penguins: species, sex and body mass of 344 penguins from three measurements and
the island.

The data of Gorman, Williams and Fraser (2014, https://doi.org/10.1371/journal.pone.0090081),
as the palmerpenguins package ships it (``palmerpenguins/data/penguins.csv``, read here
without importing the package, which would import pandas). A small mixed multi-task set:
two classification tasks and one regression task on the same rows.

Rows: 344 penguins (152 Adelie, 68 Chinstrap, 124 Gentoo). Two have no measurement at all
and nine more have no sex: these 11 rows are dropped, leaving 333 (146 Adelie, 68
Chinstrap, 119 Gentoo; 165 female, 168 male).

Inputs (6 features): bill length, bill depth and flipper length, each standardised with the
mean and standard deviation (population, ``ddof=0``) of the training split, then the island
(Biscoe, Dream, Torgersen) one-hot. The study year is not used; body mass and sex are targets.

Tasks:

- ``species``: 3 classes (0 Adelie, 1 Chinstrap, 2 Gentoo), cross-entropy, accuracy;
- ``sex``: 2 classes (0 female, 1 male), cross-entropy, accuracy;
- ``body_mass``: the body mass in grams, a float target of shape ``(1,)``. The network
  predicts it in standard units of the training split (the loss is MSE on
  ``(grams - mean) / std``, :class:`~polytask.data._tabular.StandardizedLoss`) and the
  evaluation turns the prediction back into grams
  (:class:`~polytask.data._tabular.Unstandardize`), so MAE and RMSE are in grams against the
  targets exactly as the file gives them.

Splits: seeded, stratified by species and sex (6 strata).
"""

from __future__ import annotations

import csv
from functools import partial
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..losses import CrossEntropyLoss, MSELoss
from ..metrics.classification import Accuracy
from ..metrics.regression import RegressionMetric
from ..tasks import Task
from ._options import check_int
from ._tabular import (
    FloatArray,
    StandardizedLoss,
    Unstandardize,
    check_fractions,
    one_hot,
    package_file,
    sha256_of_rows,
    split_indices,
)
from .base import DATASETS, SPLITS, DataBundle
from .tensor import TensorMTLDataset

__all__ = ["ISLANDS", "MEASUREMENTS", "SEXES", "SPECIES", "load_source", "penguins"]

SOURCE = "palmerpenguins/data/penguins.csv"
COLUMNS = (
    "species",
    "island",
    "bill_length_mm",
    "bill_depth_mm",
    "flipper_length_mm",
    "body_mass_g",
    "sex",
    "year",
)
ROWS = 344
SPECIES = ("Adelie", "Chinstrap", "Gentoo")
SEXES = ("female", "male")
ISLANDS = ("Biscoe", "Dream", "Torgersen")
MEASUREMENTS = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm")
"""The numeric inputs, standardised on the training split."""
SPECIES_COUNTS = (152, 68, 124)
"""Penguins per species in the file, before rows with missing values are dropped."""
KEPT_SPECIES_COUNTS = (146, 68, 119)
KEPT_SEX_COUNTS = (165, 168)
DROPPED = 11
SOURCE_SHA256 = "f204db2c753b0937caac3cb35258562c14f073e4bbc76be24b4c51ce22767a93"
"""SHA-256 of the rows (header included), each joined by ',' and ended by a newline."""
MISSING = "NA"
FIX = (
    "Reinstall palmerpenguins (`pip install --force-reinstall palmerpenguins`, or "
    "`pip install 'polytask[data]'`)."
)


def _read_rows() -> list[list[str]]:
    path = package_file("palmerpenguins", "data/penguins.csv", "The penguins data set")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return [row for row in csv.reader(handle) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"Could not read {path}: {exc}. {FIX}") from exc


def load_source() -> dict[str, Any]:
    """The verified rows without missing values, as arrays by column.

    Returns ``{"species": int64 (333,), "sex": int64, "island": list of str,
    "body_mass_g": float32, and one float64 array per measurement}``.

    Raises:
        DataError: palmerpenguins is not installed, or its file does not have the expected
            columns, rows, class counts or checksum.
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
    species = [row[0] for row in body]
    counts = tuple(species.count(name) for name in SPECIES)
    if counts != SPECIES_COUNTS or len(set(species) - set(SPECIES)) > 0:
        raise DataError(
            f"Expected {SOURCE} to have {list(SPECIES_COUNTS)} penguins of the species "
            f"{list(SPECIES)}, found {counts} and the names {sorted(set(species))}. {FIX}"
        )
    digest = sha256_of_rows(rows)
    if digest != SOURCE_SHA256:
        raise DataError(f"Expected {SOURCE} to have SHA-256 {SOURCE_SHA256}, found {digest}. {FIX}")
    kept = [row for row in body if MISSING not in row]
    kept_species = tuple(sum(row[0] == name for row in kept) for name in SPECIES)
    kept_sexes = tuple(sum(row[6] == name for row in kept) for name in SEXES)
    if (
        len(body) - len(kept) != DROPPED
        or kept_species != KEPT_SPECIES_COUNTS
        or kept_sexes != KEPT_SEX_COUNTS
    ):
        raise DataError(
            f"Expected {SOURCE} to have {DROPPED} rows with missing values and, without them, "
            f"{list(KEPT_SPECIES_COUNTS)} penguins per species and {list(KEPT_SEX_COUNTS)} per "
            f"sex; found {len(body) - len(kept)}, {list(kept_species)} and {list(kept_sexes)}. {FIX}"
        )
    columns = {name: [row[i] for row in kept] for i, name in enumerate(COLUMNS)}
    result: dict[str, Any] = {
        "species": np.array([SPECIES.index(v) for v in columns["species"]], dtype=np.int64),
        "sex": np.array([SEXES.index(v) for v in columns["sex"]], dtype=np.int64),
        "island": columns["island"],
        "body_mass_g": np.array(columns["body_mass_g"], dtype=np.float32),
    }
    for name in MEASUREMENTS:
        result[name] = np.array(columns[name], dtype=np.float64)
    return result


def _features(source: dict[str, Any], train: np.ndarray) -> tuple[FloatArray, dict[str, Any]]:
    """Standardised measurements (train statistics) and the one-hot island, ``(N, 6)``."""
    stats: dict[str, Any] = {}
    parts = []
    for name in MEASUREMENTS:
        values = source[name]
        mean, std = float(values[train].mean()), float(values[train].std())
        stats[name] = {"mean": mean, "std": std}
        parts.append(((values - mean) / std)[:, None])
    parts.append(one_hot(source["island"], ISLANDS))
    return np.concatenate(parts, axis=1).astype(np.float32), stats


def _make_tasks(mass_mean: float, mass_std: float) -> dict[str, Task]:
    return {
        "species": Task(
            name="species",
            loss=CrossEntropyLoss(),
            metrics={"accuracy": partial(Accuracy, len(SPECIES))},
            output_dim=len(SPECIES),
            kind="classification",
            description="species: 0 Adelie, 1 Chinstrap, 2 Gentoo",
        ),
        "sex": Task(
            name="sex",
            loss=CrossEntropyLoss(),
            metrics={"accuracy": partial(Accuracy, len(SEXES))},
            output_dim=len(SEXES),
            kind="classification",
            description="sex: 0 female, 1 male",
        ),
        "body_mass": Task(
            name="body_mass",
            loss=StandardizedLoss(MSELoss(), mass_mean, mass_std),
            metrics={"regression": RegressionMetric},
            output_dim=1,
            postprocess=Unstandardize(mass_mean, mass_std),
            kind="regression",
            description=(
                "body mass in grams, shape (1,); predicted in standard units of the "
                "training split, evaluated in grams"
            ),
            extra={"unit": "g", "mean": mass_mean, "std": mass_std},
        ),
    }


@DATASETS.register("penguins")
def penguins(*, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> DataBundle:
    """Build Palmer penguins (see the module docstring): 6 features, tasks ``species``,
    ``sex`` and ``body_mass``.

    Args:
        seed: seeds the split, >= 0.
        val_fraction, test_fraction: the share of every species-and-sex stratum that goes
            to val and to test, each in (0, 1) and together below 1; the rest is train.

    Raises:
        ConfigError: an option is out of range.
        DataError: palmerpenguins is not installed or its file is altered.

    Example:
        >>> bundle = penguins(seed=0)
        >>> bundle.input_shape, {s: len(bundle.split(s)) for s in ("train", "val", "test")}
        ((6,), {'train': 197, 'val': 68, 'test': 68})
    """
    seed = check_int("seed", seed, 0)
    fractions = check_fractions(val_fraction, test_fraction)
    source = load_source()
    strata = source["species"] * len(SEXES) + source["sex"]
    indices = split_indices(strata, fractions, seed, "penguins")
    features, stats = _features(source, indices["train"])
    mass = source["body_mass_g"]
    mass_mean = float(mass[indices["train"]].astype(np.float64).mean())
    mass_std = float(mass[indices["train"]].astype(np.float64).std())
    splits = {
        split: TensorMTLDataset(
            torch.from_numpy(features[rows]),
            {
                "species": torch.from_numpy(source["species"][rows]),
                "sex": torch.from_numpy(source["sex"][rows]),
                "body_mass": torch.from_numpy(mass[rows][:, None]),
            },
        )
        for split, rows in indices.items()
    }
    stats["body_mass_g"] = {"mean": mass_mean, "std": mass_std}
    info: dict[str, Any] = {
        "source": SOURCE,
        "source_size": ROWS,
        "dropped_rows": DROPPED,
        "features": [*MEASUREMENTS, *(f"island={name}" for name in ISLANDS)],
        "train_statistics": stats,
        "seed": seed,
        "fractions": fractions,
        "sizes": {split: len(indices[split]) for split in SPLITS},
        "indices": {split: indices[split].tolist() for split in SPLITS},
        "class_names": {"species": list(SPECIES), "sex": list(SEXES)},
    }
    return DataBundle(
        tasks=_make_tasks(mass_mean, mass_std),
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        input_shape=(features.shape[1],),
        info=info,
    )
