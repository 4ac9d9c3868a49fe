"""Reader of the preprocessed dense-prediction layout of NYUv2 and CityScapes, with validation.

The layout (the preprocessed copies linked from the README of the MTAN repository)::

    ROOT/{train,val}/{modality}/{i}.npy        i = 0 .. N-1, N = number of files in image/

with one folder per modality: ``image`` (H x W x 3 floats in [0, 1]), a label folder (H x W
class indices, -1 = void), ``depth`` (H x W x 1, 0 = invalid) and, for NYUv2, ``normal``
(H x W x 3, all-zero = invalid). The dtype on disk is not documented: any float dtype is
accepted (and any integer dtype for labels) and converted to float32 / int64.

:func:`scan_split` checks every file of a split from its ``.npy`` header alone (name, format,
dtype, shape, size on disk), so a damaged copy fails before training, in well under a second
for the full data sets. The values (labels in ``[-1, C)`` and whole, images in [0, 1]) are
checked when a sample is loaded, and :func:`dense_bundle` checks the training labels at build
time, while counting the training pixels of every class.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from numpy.lib import format as npy_format
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..tasks import Task
from ._options import check_bool, check_int
from .augment import DenseMaps, DepthScaling, RandomScaleCropFlip
from .base import DataBundle

__all__ = [
    "DenseFolderDataset",
    "DenseLayout",
    "Modality",
    "SplitFiles",
    "count_class_pixels",
    "dense_bundle",
    "scan_split",
]

PUBLISHED_SPLITS = ("train", "val")
"""The two folders of the published layout; its ``val`` is the papers' test split."""

ModalityKind = Literal["image", "label", "depth", "normal"]

_CHANNELS: dict[ModalityKind, int | None] = {"image": 3, "label": None, "depth": 1, "normal": 3}
_SHAPE_WORDS: dict[ModalityKind, str] = {
    "image": "H x W x 3",
    "label": "H x W",
    "depth": "H x W x 1",
    "normal": "H x W x 3",
}
_ARTICLE: dict[ModalityKind, str] = {"image": "an", "label": "a", "depth": "a", "normal": "a"}
_NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class Modality:
    """One folder of the layout: its name and what it holds."""

    folder: str
    kind: ModalityKind

    @property
    def channels(self) -> int | None:
        """The trailing channel dimension on disk (``None``: an H x W map)."""
        return _CHANNELS[self.kind]

    def accepts(self, dtype: np.dtype[Any]) -> bool:
        """Floats everywhere; integers too for labels."""
        kinds = "fiu" if self.kind == "label" else "f"
        return dtype.kind in kinds and dtype.fields is None


@dataclass(frozen=True)
class DenseLayout:
    """What a data set of the layout holds and where a user gets it.

    Attributes:
        name: the data set's name in messages (``"NYUv2"``).
        modalities: the folders of every split; exactly one of each kind used, the image first.
        num_classes: labels are in ``[0, num_classes)`` or -1 (void).
        source: one sentence saying where the data can be obtained (ends every error message).
    """

    name: str
    modalities: tuple[Modality, ...]
    num_classes: int
    source: str

    def __post_init__(self) -> None:
        kinds = [m.kind for m in self.modalities]
        if not kinds or kinds[0] != "image" or len(set(kinds)) != len(kinds):
            raise ValueError(f"Expected the image first and each kind once, found {kinds}.")
        if "label" not in kinds or "depth" not in kinds:
            raise ValueError(f"Expected a label and a depth modality, found {kinds}.")

    def modality(self, kind: ModalityKind) -> Modality | None:
        return next((m for m in self.modalities if m.kind == kind), None)

    @property
    def pattern(self) -> str:
        folders = ",".join(m.folder for m in self.modalities)
        return f"ROOT/{{train,val}}/{{{folders}}}/{{i}}.npy"

    def error(self, where: Path | str, expected: str, found: str) -> DataError:
        """The one-line error: the path, what was expected, what was found, the source."""
        return DataError(f"{where}: expected {expected}, found {found}. {self.source}")


@dataclass(frozen=True)
class SplitFiles:
    """A checked split folder of the layout: ``size`` samples of ``height x width`` pixels."""

    directory: Path
    size: int
    height: int
    width: int

    def path(self, modality: Modality, index: int) -> Path:
        return self.directory / modality.folder / f"{index}.npy"


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    data_bytes: int  # what the file holds after its header
    needed_bytes: int  # what the shape and dtype need


# Parsed headers by their raw bytes: every file of a modality usually has the same header, so
# the (slow) parse of its text runs once per distinct header, not once per file.
_HEADER_CACHE: dict[bytes, tuple[tuple[int, ...], np.dtype[Any], int]] = {}
_HEADER_READ = 256  # one read holds the usual 128-byte header


def _read_header(path: str) -> tuple[_Header | None, str]:
    """The header of an ``.npy`` file, or ``None`` and what is wrong with the file."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            head = os.read(fd, _HEADER_READ)
            if len(head) < 10 or not head.startswith(_NPY_MAGIC):
                return None, "a file that does not start with the .npy signature"
            major = head[6]
            if major == 1:
                start, length = 10, struct.unpack("<H", head[8:10])[0]
            elif major in (2, 3) and len(head) >= 12:
                start, length = 12, struct.unpack("<I", head[8:12])[0]
            else:
                return None, f"an unsupported .npy format version {major}"
            if len(head) < start + length:
                head += os.read(fd, start + length - len(head))
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
    except OSError as exc:
        return None, f"a file that cannot be read ({exc.strerror or exc})"
    if len(head) < start + length:
        return None, "a truncated .npy header"
    key = head[: start + length]
    parsed = _HEADER_CACHE.get(key)
    if parsed is None:
        try:
            stream = io.BytesIO(key)
            version = npy_format.read_magic(stream)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(stream)
            else:
                shape, _, dtype = npy_format.read_array_header_2_0(stream)
        except (ValueError, SyntaxError, TypeError) as exc:
            return None, f"an unreadable .npy header ({exc})"
        shape = tuple(int(n) for n in shape)
        parsed = (shape, dtype, math.prod(shape) * dtype.itemsize)
        _HEADER_CACHE[key] = parsed
    shape, dtype, needed = parsed
    return _Header(shape, dtype, size - len(key), needed), ""


def _describe(header: _Header) -> str:
    return f"shape {header.shape} of dtype {header.dtype}"


def _list_indices(folder: Path, layout: DenseLayout) -> list[int]:
    """The indices of ``folder``'s ``{i}.npy`` files (hidden files ignored), checked 0..N-1."""
    try:
        names = [name for name in os.listdir(folder) if not name.startswith(".")]
    except OSError as exc:
        raise layout.error(
            folder, "a readable folder", f"an error ({exc.strerror or exc})"
        ) from None
    indices: list[int] = []
    for name in sorted(names):
        stem, _, ext = name.partition(".")
        if (
            ext != "npy"
            or not (stem.isascii() and stem.isdigit())
            or (stem != "0" and stem.startswith("0"))
        ):
            raise layout.error(
                folder / name,
                f"only files named {{i}}.npy (i = 0, 1, 2, ...) in {folder}",
                f"{name!r}",
            )
        indices.append(int(stem))
    indices.sort()
    if not indices:
        raise layout.error(folder, "files 0.npy .. N-1.npy", "an empty folder")
    if indices[-1] != len(indices) - 1:
        missing = next(i for i, j in enumerate(indices) if i != j)
        raise layout.error(
            folder / f"{missing}.npy",
            f"files named 0.npy .. {len(indices) - 1}.npy ({len(indices)} files in {folder})",
            f"no such file (the highest index is {indices[-1]})",
        )
    return indices


def _subfolders(directory: Path) -> str:
    try:
        found = sorted(p.name for p in directory.iterdir() if p.is_dir())
    except OSError:
        found = []
    return ", ".join(found) if found else "no folder"


def scan_split(
    root: Path, split: str, layout: DenseLayout, like: SplitFiles | None = None
) -> SplitFiles:
    """Check every file of ``root/split`` from its header; return the split's size and shape.

    Args:
        root: the data set's root folder.
        split: ``"train"`` or ``"val"``.
        layout: what the folders hold.
        like: a split already scanned whose size every sample must have, or ``None`` to
            take the size from this split's ``image/0.npy``.

    Raises:
        DataError: a folder is missing or empty, file counts differ between modalities, a
            file is misnamed, not a valid ``.npy``, or has the wrong dtype, number of
            dimensions or shape; the message names the file.
    """
    if not root.is_dir():
        found = "a file" if root.exists() else "no such folder"
        raise layout.error(
            root, f"the {layout.name} root folder, laid out as {layout.pattern}", found
        )
    directory = root / split
    if not directory.is_dir():
        raise layout.error(
            directory,
            f"the {split} split folder of the layout {layout.pattern}",
            f"no such folder (the root holds: {_subfolders(root)})",
        )
    counts: dict[str, int] = {}
    for modality in layout.modalities:
        folder = directory / modality.folder
        if not folder.is_dir():
            raise layout.error(
                folder,
                f"the {modality.kind} folder {modality.folder!r} of the layout {layout.pattern}",
                f"no such folder ({directory} holds: {_subfolders(directory)})",
            )
        counts[modality.folder] = len(_list_indices(folder, layout))
    image_folder = layout.modalities[0].folder
    n = counts[image_folder]
    for name, count in counts.items():
        if count != n:
            raise layout.error(
                directory / name,
                f"{n} files, as many as in {directory / image_folder}",
                f"{count} files",
            )
    files = SplitFiles(directory, n, -1, -1)
    if like is None:
        first = files.path(layout.modalities[0], 0)
        header = _checked_header(first, layout.modalities[0], layout)
        if len(header.shape) != 3 or header.shape[2] != 3 or min(header.shape) < 1:
            raise layout.error(
                first,
                f"an image of shape H x W x 3 ({layout.name} layout)",
                _describe(header),
            )
        size = (header.shape[0], header.shape[1])
    else:
        first = like.path(layout.modalities[0], 0)
        size = (like.height, like.width)
    for modality in layout.modalities:
        channels = modality.channels
        expected_shape = size if channels is None else (*size, channels)
        folder_name = os.path.join(directory, modality.folder)
        for index in range(n):
            path = os.path.join(folder_name, f"{index}.npy")  # str: Path costs more than the read
            header = _checked_header(path, modality, layout)
            if header.shape != expected_shape:
                raise layout.error(
                    path,
                    f"{_ARTICLE[modality.kind]} {modality.kind} of shape {expected_shape} "
                    f"({_SHAPE_WORDS[modality.kind]}, the size of {first})",
                    _describe(header),
                )
    return SplitFiles(directory, n, size[0], size[1])


def _checked_header(path: Path | str, modality: Modality, layout: DenseLayout) -> _Header:
    header, problem = _read_header(str(path))
    if header is None:
        raise layout.error(path, "a NumPy .npy file", problem)
    kinds = "an integer or float" if modality.kind == "label" else "a float"
    if not modality.accepts(header.dtype):
        raise layout.error(path, f"{kinds} dtype ({modality.kind})", _describe(header))
    if header.data_bytes < header.needed_bytes:
        raise layout.error(
            path,
            f"{header.needed_bytes} bytes of data for {_describe(header)}",
            f"{header.data_bytes} bytes (a truncated file)",
        )
    return header


def _load(path: Path, layout: DenseLayout) -> npt.NDArray[Any]:
    try:
        array: npt.NDArray[Any] = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise layout.error(path, "a NumPy .npy file", f"an unreadable file ({exc})") from None
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _check_label(label: npt.NDArray[Any], path: Path, layout: DenseLayout) -> npt.NDArray[Any]:
    """``label`` as int64, checked whole and in ``[-1, num_classes)``."""
    c = layout.num_classes
    low, high = label.min(), label.max()
    if not (low >= -1 and high < c):
        raise layout.error(
            path,
            f"class indices in [0, {c - 1}] or -1 (void)",
            f"values in [{low}, {high}]",
        )
    if label.dtype.kind == "f":
        whole = label.astype(np.int64)
        if not np.array_equal(whole, label):
            bad = label[whole != label].flat[0]
            raise layout.error(path, "whole class indices", f"the value {bad}")
        return whole
    return label.astype(np.int64, copy=False)


def _channels_first(array: npt.NDArray[Any]) -> torch.Tensor:
    """H x W x C on disk -> a contiguous float32 ``[C, H, W]`` tensor, in one copy."""
    return (
        torch.from_numpy(array)
        .permute(2, 0, 1)
        .to(torch.float32, memory_format=torch.contiguous_format)
    )


class DenseFolderDataset(Dataset[dict[str, Any]]):
    """Samples of one split folder of the layout (checked by :func:`scan_split`).

    Sample ``i`` (file index ``indices[i]``) is ``{"input": float32 [3, H, W], "targets":
    {"semantic": int64 [H, W] (-1 = void), "depth": float32 [1, H, W], "normal": float32
    [3, H, W]}}`` (no ``"normal"`` when the layout has none), optionally passed through
    ``transform`` (the joint augmentation).

    Raises (when a sample is loaded):
        DataError: the file cannot be read, the image has values outside [0, 1], or the
            label has values that are not whole or not in ``[-1, num_classes)``.
    """

    def __init__(
        self,
        files: SplitFiles,
        layout: DenseLayout,
        indices: Sequence[int] | None = None,
        transform: RandomScaleCropFlip | None = None,
    ) -> None:
        self.files = files
        self.layout = layout
        self.indices = list(range(files.size) if indices is None else indices)
        self.transform = transform
        self._image = layout.modalities[0]
        self._label = layout.modality("label")
        self._depth = layout.modality("depth")
        self._normal = layout.modality("normal")

    def __len__(self) -> int:
        return len(self.indices)

    def path(self, modality: Modality, i: int) -> Path:
        """The file of ``modality`` for sample ``i``."""
        return self.files.path(modality, self.indices[i])

    def __getitem__(self, i: int) -> dict[str, Any]:
        layout = self.layout
        image_path = self.path(self._image, i)
        image = _load(image_path, layout)
        low, high = image.min(), image.max()
        if not (low >= 0 and high <= 1):
            raise layout.error(image_path, "image values in [0, 1]", f"values in [{low}, {high}]")
        assert self._label is not None and self._depth is not None  # by DenseLayout
        label_path = self.path(self._label, i)
        label = _check_label(_load(label_path, layout), label_path, layout)
        maps = DenseMaps(
            image=_channels_first(image),
            label=torch.from_numpy(label),
            depth=_channels_first(_load(self.path(self._depth, i), layout)),
            normal=(
                None
                if self._normal is None
                else _channels_first(_load(self.path(self._normal, i), layout))
            ),
        )
        if self.transform is not None:
            maps = self.transform(maps)
        targets = {"semantic": maps.label, "depth": maps.depth}
        if maps.normal is not None:
            targets["normal"] = maps.normal
        return {"input": maps.image, "targets": targets}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.layout.name}, {self.files.directory}, n={len(self)}, "
            f"size={self.files.height}x{self.files.width}, transform={self.transform!r})"
        )


# Per-file class counts by (path, size, modification time): rebuilding a bundle (evaluation,
# a grid of runs) does not read the labels again.
_COUNT_CACHE: dict[tuple[str, int, int, int], npt.NDArray[np.int64]] = {}


def count_class_pixels(dataset: DenseFolderDataset) -> list[int]:
    """Pixels of every class ``0..C-1`` over ``dataset``'s labels (void not counted).

    Reads every label file once (checking its values) and caches the counts in memory.

    Raises:
        DataError: a label has values that are not whole or not in ``[-1, C)``.
    """
    layout = dataset.layout
    assert dataset._label is not None
    c = layout.num_classes
    total = np.zeros(c + 1, dtype=np.int64)
    for i in range(len(dataset)):
        path = dataset.path(dataset._label, i)
        st = path.stat()
        key = (str(path), c, st.st_size, st.st_mtime_ns)
        counts = _COUNT_CACHE.get(key)
        if counts is None:
            label = _check_label(_load(path, layout), path, layout)
            counts = np.bincount(label.ravel() + 1, minlength=c + 1)
            _COUNT_CACHE[key] = counts
        total += counts
    return [int(n) for n in total[1:]]


def dense_bundle(
    layout: DenseLayout,
    tasks: Mapping[str, Task],
    *,
    root: str | os.PathLike[str],
    augment: bool,
    val_size: int,
    seed: int,
    limit: int | None,
    depth_scaling: DepthScaling = "divide",
    info: Mapping[str, Any] | None = None,
) -> DataBundle:
    """Check a folder of the layout and build its bundle (see :func:`polytask.data.nyuv2`).

    ``test`` is the published ``val/`` folder. With ``val_size=0`` the validation split is that
    same test split (the papers' protocol); with ``val_size=N`` it is N training images held out
    at random (seeded by ``seed``). ``limit`` keeps the first ``limit`` images of each
    published split (before the hold-out). ``augment`` transforms the train split only.

    Raises:
        ConfigError: an option has the wrong type or is out of range.
        DataError: the folder does not follow the layout (see :func:`scan_split`), or a
            training label has values outside ``[-1, C)``.
    """
    if not isinstance(root, str | os.PathLike) or not str(root):
        raise ConfigError(
            f"Expected option `root` to be the path of the {layout.name} folder "
            f"({layout.pattern}), found {root!r}. {layout.source}"
        )
    augment = check_bool("augment", augment)
    val_size = check_int("val_size", val_size, 0)
    seed = check_int("seed", seed, 0)
    if limit is not None:
        limit = check_int("limit", limit, 1)
    path = Path(root).expanduser()
    train_files = scan_split(path, "train", layout)
    test_files = scan_split(path, "val", layout, train_files)
    n_train = train_files.size if limit is None else min(limit, train_files.size)
    n_test = test_files.size if limit is None else min(limit, test_files.size)
    if val_size >= n_train:
        raise ConfigError(
            f"option `val_size`={val_size} leaves no training image: {path / 'train'} has "
            f"{n_train} images" + ("" if limit is None else f" (limit={limit})") + "; "
            "use val_size=0 to validate on the test split, as the papers do."
        )
    transform = RandomScaleCropFlip(depth_scaling=depth_scaling) if augment else None
    test = DenseFolderDataset(test_files, layout, range(n_test))
    val: DenseFolderDataset
    if val_size == 0:
        train = DenseFolderDataset(train_files, layout, range(n_train), transform)
        val = test
    else:
        order = np.random.default_rng(seed).permutation(n_train)
        held_out = sorted(int(i) for i in order[:val_size])
        kept = sorted(int(i) for i in order[val_size:])
        train = DenseFolderDataset(train_files, layout, kept, transform)
        val = DenseFolderDataset(train_files, layout, held_out)
    size = (train_files.height, train_files.width)
    return DataBundle(
        tasks=dict(tasks),
        train=train,
        val=val,
        test=test,
        input_shape=(3, *size),
        info={
            "root": str(path),
            "layout": layout.pattern,
            "published_sizes": {"train": train_files.size, "val": test_files.size},
            "sizes": {"train": len(train), "val": len(val), "test": len(test)},
            "image_size": list(size),
            "num_classes": layout.num_classes,
            "augment": augment,
            "val_is_test": val_size == 0,
            "val_size": val_size,
            "seed": seed,
            "limit": limit,
            **dict(info or {}),
            "class_pixels": count_class_pixels(train),
        },
    )
