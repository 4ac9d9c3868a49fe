"""Yeast: 14 gene-function labels of 2,417 yeast genes from 103 expression features.

The multi-label Yeast data of Elisseeff and Weston ("A kernel method for multi-labelled
classification", NeurIPS 2001, https://papers.nips.cc/paper/2001/hash/39dcaf7a053dc372fbc391d4e6b5d693-Abstract.html),
in the version of the MULAN library (OpenML data set 40597), as the river package ships it
(``river/datasets/yeast.csv.gz``, read here without importing river).

Inputs: 103 numeric features of a gene (micro-array expression levels and phylogenetic
profile), standardised with the mean and standard deviation (population, ``ddof=0``) of the
training split.

Labels: ``class1`` ... ``class14``, whether the gene belongs to each of 14 functional
categories (the file's ``Class1`` ... ``Class14``); every gene has 1 to 11 of them, 4.24 on
average, and their frequency ranges from 75 % (``class12``) to 1.4 % (``class14``, 34
genes), which is what makes the set a test of imbalanced metrics. The labels become tasks
through :func:`polytask.tasks.label_tasks`: by default one binary task per label (14
tasks), or one 14-output multi-label task (``label_groups: all``), or any named groups of
labels; trained with binary cross-entropy (optionally with balanced positive weights) and
evaluated with :class:`~polytask.metrics.MultiLabelMetric` (macro F1 and ROC-AUC by default).

Splits: seeded and stratified by each gene's rarest label (the label of lowest frequency
among its own), so that the few genes of the rare labels are spread over the three splits.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..metrics.multilabel import MultiLabelMetric
from ..tasks import label_targets, label_tasks
from ._options import check_int
from ._tabular import (
    FloatArray,
    IntArray,
    check_fractions,
    package_file,
    sha256_of_rows,
    split_indices,
)
from .base import DATASETS, SPLITS, DataBundle
from .tensor import TensorMTLDataset

__all__ = ["FEATURES", "LABELS", "load_source", "yeast"]

SOURCE = "river/datasets/yeast.csv.gz"
ROWS = 2417
FEATURES = tuple(f"Att{i}" for i in range(1, 104))
"""The feature columns of the file."""
COLUMNS = tuple(f"Class{i}" for i in range(1, 15))
"""The label columns of the file."""
LABELS = tuple(f"class{i}" for i in range(1, 15))
"""The labels' names (task names with ``label_groups: each``)."""
SOURCE_SHA256 = "fd17cb9b53acaaf5e82a9e0795e2667167775915c0e32c1f6fe0fadb0d3bd703"
"""SHA-256 of the decompressed rows (header included), each joined by ',' and ended by a newline."""
FIX = "Reinstall river (`pip install --force-reinstall river`, or `pip install 'polytask[data]'`)."


def _read_rows() -> list[list[str]]:
    path = package_file("river", "datasets/yeast.csv.gz", "The yeast data set")
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise DataError(f"Could not read {path}: {exc}. {FIX}") from exc
    return [row for row in csv.reader(io.StringIO(text)) if row]


def load_source() -> tuple[FloatArray, IntArray]:
    """The verified data: features ``(2417, 103)`` float32 and labels ``(2417, 14)`` in {0, 1}.

    Raises:
        DataError: river is not installed, or its file does not have the expected columns,
            rows, values or checksum.
    """
    rows = _read_rows()
    header, body = rows[0], rows[1:]
    if tuple(header) != (*FEATURES, *COLUMNS):
        raise DataError(
            f"Expected {SOURCE} to have the columns Att1..Att103, Class1..Class14, found "
            f"{header[:3]}...{header[-3:]} ({len(header)} columns). {FIX}"
        )
    width = len(header)
    if len(body) != ROWS or any(len(row) != width for row in body):
        raise DataError(
            f"Expected {SOURCE} to have {ROWS} rows of {width} values, found {len(body)} rows "
            f"of lengths {sorted({len(row) for row in body})}. {FIX}"
        )
    flags = np.asarray([row[len(FEATURES) :] for row in body])
    if not np.isin(flags, ("0", "1")).all():
        raise DataError(
            f"Expected labels 0 or 1 in {SOURCE}, found {sorted(set(flags.flat))}. {FIX}"
        )
    digest = sha256_of_rows(rows)
    if digest != SOURCE_SHA256:
        raise DataError(f"Expected {SOURCE} to have SHA-256 {SOURCE_SHA256}, found {digest}. {FIX}")
    features = np.asarray([row[: len(FEATURES)] for row in body], dtype=np.float32)
    labels = (flags == "1").astype(np.int64)
    return features, labels


def _strata(labels: IntArray) -> IntArray:
    """Each row's rarest label (lowest frequency over the file), or L for a row with none."""
    frequency = labels.sum(axis=0)
    order = np.argsort(frequency, kind="stable")  # rarest first
    rank = np.where(labels[:, order] == 1, np.arange(len(order)), len(order)).min(axis=1)
    return np.where(rank < len(order), order[np.minimum(rank, len(order) - 1)], len(order))


def _check_values(values: object) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(
            f"Expected option `metrics` to be a list of value names, found {values!r}."
        )
    try:
        MultiLabelMetric(values=tuple(values))
    except ValueError as exc:
        raise ConfigError(f"option `metrics`: {exc}") from None
    return tuple(str(v) for v in values)


@DATASETS.register("yeast")
def yeast(
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    label_groups: str | Mapping[str, Sequence[str]] = "each",
    pos_weight: str = "balanced",
    metrics: Sequence[str] = ("f1", "roc_auc"),
) -> DataBundle:
    """Build Yeast (see the module docstring): 103 features, 14 labels as tasks.

    Args:
        seed: seeds the split, >= 0.
        val_fraction, test_fraction: the share of every stratum that goes to val and to
            test, each in (0, 1) and together below 1; the rest is train.
        label_groups: ``each`` (one binary task per label, named ``class1`` ...), ``all``
            (one task ``labels`` with 14 outputs), or a mapping task name -> list of labels.
        pos_weight: ``balanced`` (each label's positive term weighted by its training
            negatives / positives) or ``none``.
        metrics: the values of :class:`~polytask.metrics.MultiLabelMetric` every task
            reports (and Delta_m averages).

    Raises:
        ConfigError: an option is out of range.
        DataError: river is not installed or its bundled file is altered.

    Example:
        >>> bundle = yeast(seed=0)
        >>> len(bundle.tasks), bundle.input_shape
        (14, (103,))
        >>> {s: len(bundle.split(s)) for s in ("train", "val", "test")}
        {'train': 1449, 'val': 484, 'test': 484}
    """
    seed = check_int("seed", seed, 0)
    fractions = check_fractions(val_fraction, test_fraction)
    values = _check_values(metrics)
    features, labels = load_source()
    indices = split_indices(_strata(labels), fractions, seed, "yeast")
    train = indices["train"]
    mean = features[train].astype(np.float64).mean(axis=0)
    std = features[train].astype(np.float64).std(axis=0)
    if not (std > 0).all():
        raise DataError(f"a feature of {SOURCE} is constant on the training split. {FIX}")
    standard = ((features - mean) / std).astype(np.float32)
    targets = torch.from_numpy(labels)
    tasks = label_tasks(
        LABELS,
        label_groups,
        train_targets=targets[torch.from_numpy(train)],
        pos_weight=pos_weight,
        values=values,
    )
    splits = {
        split: TensorMTLDataset(
            torch.from_numpy(standard[rows]), label_targets(targets[torch.from_numpy(rows)], tasks)
        )
        for split, rows in indices.items()
    }
    info: dict[str, Any] = {
        "source": SOURCE,
        "source_size": ROWS,
        "features": list(FEATURES),
        "labels": list(LABELS),
        "label_groups": {name: list(task.extra["labels"]) for name, task in tasks.items()},  # type: ignore[call-overload]
        "pos_weight": pos_weight,
        "seed": seed,
        "fractions": fractions,
        "sizes": {split: len(indices[split]) for split in SPLITS},
        "indices": {split: indices[split].tolist() for split in SPLITS},
        "positives": {
            split: dict(zip(LABELS, labels[rows].sum(axis=0).tolist(), strict=True))
            for split, rows in indices.items()
        },
    }
    return DataBundle(
        tasks=tasks,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        input_shape=(features.shape[1],),
        info=info,
    )
