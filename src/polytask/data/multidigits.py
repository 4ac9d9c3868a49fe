"""MultiDigits: two real handwritten digits side by side on one canvas, one task per digit.

A small, offline analogue of MultiMNIST (Sabour et al., 2017, "Dynamic Routing Between
Capsules", https://arxiv.org/abs/1710.09829; used as a multi-task benchmark by Sener and
Koltun, 2018, https://arxiv.org/abs/1810.04650), built from the 1,797 real 8x8 digits that
scikit-learn ships (:func:`sklearn.datasets.load_digits`), so that it builds in milliseconds
on any machine and needs no download.

How a bundle is built:

1. The source digits (values 0..16, scaled to [0, 1]) are verified (shape, class counts and a
   SHA-256 checksum), then split, stratified by class and seeded, into disjoint train / val /
   test *pools* (60 / 20 / 20 %), so no source digit is seen in two splits.
2. Each split has ``n`` canvases of shape ``(1, canvas, canvas)``: a "left" digit at a random
   row in ``[0, canvas - 8]`` and column in ``[0, 2]``, a "right" digit at a random row and a
   column in ``[canvas - 10, canvas - 8]``, both drawn uniformly from the split's pool and
   combined by an elementwise maximum (for ``canvas=16`` they may overlap by up to 4 columns).
3. Every random draw comes from :func:`numpy.random.default_rng` seeded from ``seed`` and the
   split (and the task, for multi-input draws and label masks), so a split does not depend on
   the sizes of the others and adding the "sum" task changes no canvas.

Each split keeps its provenance (:attr:`MultiDigitsDataset.provenance`): the source index and
the position of both digits of every canvas.
"""

from __future__ import annotations

import hashlib
import importlib.util
import numbers
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ..errors import ConfigError, DataError, did_you_mean
from ..losses import CrossEntropyLoss, MSELoss
from ..metrics.classification import Accuracy
from ..metrics.regression import RegressionMetric
from ..options import SAMPLES, Limit, values_budget
from ..tasks import Task
from ._options import check_int
from .base import DATASETS, SPLITS, DataBundle
from .tensor import TensorMTLDataset

__all__ = ["MISSING_LABEL", "MultiDigitsDataset", "load_source", "multidigits"]

SOURCE = "sklearn.datasets.load_digits"
SOURCE_SHAPE = (1797, 8, 8)
CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
"""Digits per class 0..9 in scikit-learn's bundled set (counted with scikit-learn 1.9.1)."""
SOURCE_SHA256 = "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"
"""SHA-256 of the images as uint8 (C order) followed by the labels as uint8."""
MAX_VALUE = 16

MISSING_LABEL = -1
"""The target of a sample whose label is masked out (class tasks: -1, the sum task: -1.0)."""

DIGIT = 8
MIN_CANVAS = 12
POOL_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
NUM_CLASSES = len(CLASS_COUNTS)
DIGIT_TASKS = ("left", "right")
SUM_TASK = "sum"

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


class MultiDigitsDataset(TensorMTLDataset):
    """One split of MultiDigits: a :class:`TensorMTLDataset` that remembers how it was made.

    Attributes:
        split: ``"train"``, ``"val"`` or ``"test"``.
        pool: the sorted source indices (into :func:`load_source`) this split draws from.
        provenance: for every canvas, ``left_index`` / ``right_index`` (source indices) and
            ``left_row``, ``left_col``, ``right_row``, ``right_col`` (top-left corner of each
            8x8 digit on the canvas), as int64 arrays of length ``len(self)``.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        mask: Mapping[str, torch.Tensor] | None,
        *,
        split: str,
        pool: IntArray,
        provenance: dict[str, IntArray],
    ) -> None:
        super().__init__(inputs, targets, mask)
        self.split = split
        self.pool = pool
        self.provenance = provenance


def _bundled_digits_file() -> Path | None:
    """scikit-learn's digits file, found without importing scikit-learn (over a second)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    path = path / "digits.csv.gz"
    return path if path.is_file() else None


def _read_digits() -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """The raw images and labels: the file ``load_digits`` reads, or ``load_digits`` itself."""
    path = _bundled_digits_file()
    if path is not None:
        try:
            table = np.loadtxt(path, delimiter=",", ndmin=2)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(
                f"Could not read the digits of {SOURCE} from {path}: {exc}. Reinstall "
                "scikit-learn (`pip install --force-reinstall scikit-learn`)."
            ) from exc
        pixels = table[:, :-1]
        if pixels.shape[1] == DIGIT * DIGIT:
            pixels = pixels.reshape(-1, DIGIT, DIGIT)
        return pixels, table[:, -1]
    try:
        from sklearn import datasets
    except ImportError as exc:
        raise DataError(
            "MultiDigits needs the digits that scikit-learn ships, but scikit-learn is not "
            "installed. Install it with `pip install scikit-learn`."
        ) from exc
    digits = datasets.load_digits()
    return np.asarray(digits.images), np.asarray(digits.target)


def load_source() -> tuple[FloatArray, IntArray]:
    """The verified source digits: images ``(1797, 8, 8)`` in [0, 1] and labels ``(1797,)``.

    Raises:
        DataError: the digits do not have the expected shape, values, class counts or
            checksum (a damaged or modified scikit-learn installation).
    """
    images, labels = _read_digits()
    fix = f"Reinstall scikit-learn (`pip install --force-reinstall scikit-learn`) for {SOURCE}."
    if images.shape != SOURCE_SHAPE or labels.shape != SOURCE_SHAPE[:1]:
        raise DataError(
            f"Expected {SOURCE} to give images of shape {SOURCE_SHAPE} and labels of shape "
            f"{SOURCE_SHAPE[:1]}, found {images.shape} and {labels.shape}. {fix}"
        )
    if not (
        np.array_equal(images, np.round(images))
        and images.min() >= 0
        and images.max() <= MAX_VALUE
        and np.array_equal(labels, np.round(labels))
        and labels.min() >= 0
        and labels.max() < NUM_CLASSES
    ):
        raise DataError(
            f"Expected {SOURCE} to give integer pixel values in [0, {MAX_VALUE}] and labels in "
            f"[0, {NUM_CLASSES - 1}], found pixels in [{images.min()}, {images.max()}] and "
            f"labels in [{labels.min()}, {labels.max()}]. {fix}"
        )
    int_labels = labels.astype(np.int64)
    counts = tuple(int(c) for c in np.bincount(int_labels, minlength=NUM_CLASSES))
    if counts != CLASS_COUNTS:
        raise DataError(
            f"Expected {SOURCE} to have {list(CLASS_COUNTS)} digits of classes 0..9, "
            f"found {list(counts)}. {fix}"
        )
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    if digest.hexdigest() != SOURCE_SHA256:
        raise DataError(
            f"Expected {SOURCE} to have SHA-256 {SOURCE_SHA256}, found {digest.hexdigest()}. {fix}"
        )
    scaled: FloatArray = (images / MAX_VALUE).astype(np.float32)
    return scaled, int_labels


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """An independent generator for ``seed`` and a stream name (split, task, purpose)."""
    stream = hashlib.sha256("/".join(keys).encode()).digest()[:16]
    return np.random.default_rng([seed, int.from_bytes(stream, "big")])


def _split_pools(labels: IntArray, seed: int) -> dict[str, IntArray]:
    """Disjoint, class-stratified pools of source indices for every split."""
    rng = _rng(seed, "pools")
    parts: dict[str, list[IntArray]] = {split: [] for split in SPLITS}
    for digit in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        n_val = round(POOL_FRACTIONS["val"] * len(members))
        n_test = round(POOL_FRACTIONS["test"] * len(members))
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    return {split: np.sort(np.concatenate(parts[split])) for split in SPLITS}


def _draw_canvases(
    rng: np.random.Generator, images: FloatArray, pool: IntArray, n: int, canvas: int
) -> tuple[FloatArray, dict[str, IntArray]]:
    """``n`` canvases ``(n, 1, canvas, canvas)`` of two digits from ``pool``; their provenance."""
    provenance = {
        "left_index": pool[rng.integers(len(pool), size=n)],
        "right_index": pool[rng.integers(len(pool), size=n)],
        "left_row": rng.integers(0, canvas - DIGIT + 1, size=n),
        "left_col": rng.integers(0, 3, size=n),
        "right_row": rng.integers(0, canvas - DIGIT + 1, size=n),
        "right_col": rng.integers(canvas - DIGIT - 2, canvas - DIGIT + 1, size=n),
    }
    offsets = np.arange(DIGIT)
    sample = np.arange(n)[:, None, None]
    layers = np.zeros((len(DIGIT_TASKS), n, canvas, canvas), dtype=np.float32)
    for layer, side in zip(layers, DIGIT_TASKS, strict=True):
        rows = provenance[f"{side}_row"][:, None, None] + offsets[None, :, None]
        cols = provenance[f"{side}_col"][:, None, None] + offsets[None, None, :]
        layer[sample, rows, cols] = images[provenance[f"{side}_index"]]
    return layers.max(axis=0)[:, None], provenance


def _targets(
    labels: IntArray, provenance: Mapping[str, IntArray], tasks: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    left = labels[provenance["left_index"]]
    right = labels[provenance["right_index"]]
    every = {
        "left": torch.from_numpy(left),
        "right": torch.from_numpy(right),
        SUM_TASK: torch.from_numpy((left + right).astype(np.float32)[:, None]),
    }
    return {task: every[task] for task in tasks}


def _masks(
    seed: int, split: str, n: int, fractions: Mapping[str, float], tasks: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Per task, which samples keep their label (each with probability ``fractions[task]``)."""
    return {
        task: torch.from_numpy(_rng(seed, split, "mask", task).random(n) < fractions[task])
        for task in tasks
    }


def _apply_masks(
    targets: dict[str, torch.Tensor], mask: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Replace the masked-out labels by :data:`MISSING_LABEL`, so they cannot leak."""
    result = {}
    for task, target in targets.items():
        missing = ~mask[task].reshape(-1, *([1] * (target.dim() - 1)))
        result[task] = target.masked_fill(missing, MISSING_LABEL)
    return result


def _build_split(
    *,
    split: str,
    n: int,
    seed: int,
    stream: tuple[str, ...],
    tasks: tuple[str, ...],
    images: FloatArray,
    labels: IntArray,
    pool: IntArray,
    canvas: int,
    fractions: Mapping[str, float] | None,
) -> MultiDigitsDataset:
    inputs, provenance = _draw_canvases(_rng(seed, split, *stream), images, pool, n, canvas)
    targets = _targets(labels, provenance, tasks)
    mask = None
    if fractions is not None:
        mask = _masks(seed, split, n, fractions, tasks)
        targets = _apply_masks(targets, mask)
    return MultiDigitsDataset(
        torch.from_numpy(inputs),
        targets,
        mask,
        split=split,
        pool=pool,
        provenance=provenance,
    )


def _make_tasks(with_sum: bool) -> dict[str, Task]:
    tasks = {
        side: Task(
            name=side,
            loss=CrossEntropyLoss(),
            metrics={"accuracy": partial(Accuracy, NUM_CLASSES)},
            output_dim=NUM_CLASSES,
            kind="classification",
            description=f"class (0-9) of the {side} digit",
        )
        for side in DIGIT_TASKS
    }
    if with_sum:
        tasks[SUM_TASK] = Task(
            name=SUM_TASK,
            loss=MSELoss(),
            metrics={"regression": RegressionMetric},
            output_dim=1,
            kind="regression",
            description="left + right digit, as a float of shape (1,)",
        )
    return tasks


def _check_fraction(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 < float(value) <= 1.0
    ):
        raise ConfigError(f"Expected option `{name}` to be a number in (0, 1], found {value!r}.")
    return float(value)


def _check_fractions(
    label_fraction: float | Mapping[str, float], tasks: tuple[str, ...]
) -> dict[str, float]:
    """The label fraction of every task (1.0 for tasks a mapping does not name)."""
    if isinstance(label_fraction, Mapping):
        fractions = dict.fromkeys(tasks, 1.0)
        for task, value in label_fraction.items():
            if task not in tasks:
                hint = "" if SUM_TASK in tasks else f" ({SUM_TASK!r} needs with_sum=True)"
                raise ConfigError(
                    f"option `label_fraction` names unknown task {task!r}."
                    f"{did_you_mean(str(task), tasks)} Tasks: {', '.join(tasks)}{hint}."
                )
            fractions[task] = _check_fraction(f"label_fraction[{task!r}]", value)
        return fractions
    fraction = _check_fraction("label_fraction", label_fraction)
    return dict.fromkeys(tasks, fraction)


@DATASETS.register(
    "multidigits",
    limits={
        "n_train": SAMPLES,
        "n_val": SAMPLES,
        "n_test": SAMPLES,
        "canvas": Limit(ge=MIN_CANVAS, le=512),
        "label_fraction": Limit(gt=0, le=1),
    },
    # with multi_input every task has its own canvases
    budgets=[
        values_budget(
            lambda o: o["canvas"] ** 2 * ((3 if o["with_sum"] else 2) if o["multi_input"] else 1),
            "canvas",
        )
    ],
)
def multidigits(
    *,
    n_train: int = 4000,
    n_val: int = 1000,
    n_test: int = 1000,
    seed: int = 0,
    canvas: int = 16,
    label_fraction: float | Mapping[str, float] = 1.0,
    with_sum: bool = False,
    multi_input: bool = False,
) -> DataBundle:
    """Build the MultiDigits benchmark (see the module docstring for how it is made).

    Tasks: ``"left"`` and ``"right"``, the class (0-9) of each digit (cross-entropy,
    accuracy); with ``with_sum=True`` also ``"sum"``, left + right as a float target of shape
    ``(1,)`` (MSE; MAE and RMSE).

    Args:
        n_train, n_val, n_test: canvases per split (per task with ``multi_input``), >= 1.
        seed: seeds every random draw, >= 0.
        canvas: side of the square canvas in pixels, >= 12.
        label_fraction: the probability that a *train* sample keeps its label, in (0, 1]:
            one number for every task or ``{task: fraction}`` for some (others: 1.0). When
            any fraction is below 1, every train sample carries a ``"mask"`` for every task
            and masked-out targets hold :data:`MISSING_LABEL`. Val and test are always fully
            labelled.
        with_sum: add the ``"sum"`` regression task.
        multi_input: give every task its own canvases (``n_*`` each, drawn independently),
            carrying only that task's target; every split is then ``{task: data set}``.

    Raises:
        ConfigError: an option is out of range.
        DataError: the digits shipped with scikit-learn are missing or altered.

    Example:
        >>> bundle = multidigits(n_train=64, n_val=16, n_test=16, with_sum=True)
        >>> sample = bundle.train[0]
        >>> sample["input"].shape, sorted(sample["targets"])
        (torch.Size([1, 16, 16]), ['left', 'right', 'sum'])
    """
    sizes = {
        "train": check_int("n_train", n_train, 1),
        "val": check_int("n_val", n_val, 1),
        "test": check_int("n_test", n_test, 1),
    }
    seed = check_int("seed", seed, 0)
    canvas = check_int("canvas", canvas, MIN_CANVAS)
    for name, flag in (("with_sum", with_sum), ("multi_input", multi_input)):
        if not isinstance(flag, bool):
            raise ConfigError(f"Expected option `{name}` to be true or false, found {flag!r}.")
    tasks = _make_tasks(with_sum)
    names = tuple(tasks)
    fractions = _check_fractions(label_fraction, names)
    partial = any(fraction < 1.0 for fraction in fractions.values())

    images, labels = load_source()
    pools = _split_pools(labels, seed)
    splits: dict[str, TensorMTLDataset | dict[str, TensorMTLDataset]] = {}
    for split in SPLITS:
        common: dict[str, Any] = {
            "split": split,
            "n": sizes[split],
            "seed": seed,
            "images": images,
            "labels": labels,
            "pool": pools[split],
            "canvas": canvas,
            "fractions": fractions if partial and split == "train" else None,
        }
        if multi_input:
            splits[split] = {
                task: _build_split(stream=("task", task), tasks=(task,), **common) for task in names
            }
        else:
            splits[split] = _build_split(stream=(), tasks=names, **common)

    return DataBundle(
        tasks=tasks,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        input_shape=(1, canvas, canvas),
        multi_input=multi_input,
        info={
            "source": SOURCE,
            "source_size": SOURCE_SHAPE[0],
            "class_counts": list(CLASS_COUNTS),
            "seed": seed,
            "canvas": canvas,
            "sizes": sizes,
            "pool_sizes": {split: len(pool) for split, pool in pools.items()},
            "label_fraction": fractions,
            "with_sum": with_sum,
            "multi_input": multi_input,
            "missing_label": MISSING_LABEL,
        },
    )
