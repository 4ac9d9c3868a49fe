"""Tiny NYUv2 / CityScapes folders in the published layout, and ways to break them.

Importable as ``dense_layout`` (``tests/`` is on the test path). The layout is that of the
preprocessed copies linked from the README of the MTAN repository::

    ROOT/{train,val}/{image,label,depth,normal}/{i}.npy      (NYUv2)
    ROOT/{train,val}/{image,label_7,label_19,depth}/{i}.npy  (CityScapes)

with random valid arrays, stored as float64 by default (what users report for the copies).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt

NYUV2_FOLDERS = {"image": "image", "label": "label", "depth": "depth", "normal": "normal"}
"""NYUv2: folder -> kind."""

CITYSCAPES_FOLDERS = {"image": "image", "label_7": "label", "label_19": "label", "depth": "depth"}
"""CityScapes: folder -> kind (both label sets are written)."""

SPLIT_DIRS = ("train", "val")


def random_array(
    rng: np.random.Generator,
    kind: str,
    size: tuple[int, int],
    num_classes: int,
    dtype: npt.DTypeLike = np.float64,
) -> npt.NDArray[np.generic]:
    """A valid array of one modality, stored shape: image H x W x 3 in [0, 1], label H x W in
    [-1, C), depth H x W x 1 >= 0 (about 10 % zeros), normal H x W x 3 unit or all-zero."""
    h, w = size
    if kind == "image":
        array = rng.random((h, w, 3))
    elif kind == "label":
        array = rng.integers(-1, num_classes, (h, w))
    elif kind == "depth":
        array = rng.uniform(0.5, 10.0, (h, w, 1))
        array[rng.random((h, w, 1)) < 0.1] = 0.0
    elif kind == "normal":
        array = rng.normal(size=(h, w, 3))
        array /= np.linalg.norm(array, axis=2, keepdims=True)
        array[rng.random((h, w)) < 0.1] = 0.0
    else:
        raise ValueError(f"unknown modality kind {kind!r}")
    return array.astype(dtype)


def write_layout(
    root: Path,
    folders: Mapping[str, str],
    *,
    train: int,
    val: int,
    size: tuple[int, int],
    num_classes: Mapping[str, int],
    dtype: npt.DTypeLike = np.float64,
    seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/{folder}/{i}.npy``; label folders use ``num_classes[folder]``."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for folder, kind in folders.items():
            directory = root / split / folder
            directory.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                classes = num_classes.get(folder, 0)
                np.save(directory / f"{i}.npy", random_array(rng, kind, size, classes, dtype))
    return root


def write_nyuv2(
    root: Path,
    *,
    train: int = 4,
    val: int = 3,
    size: tuple[int, int] = (32, 48),
    dtype: npt.DTypeLike = np.float64,
    seed: int = 0,
) -> Path:
    """A NYUv2 folder (13 classes) of ``train`` + ``val`` images of ``size``."""
    return write_layout(
        root,
        NYUV2_FOLDERS,
        train=train,
        val=val,
        size=size,
        num_classes={"label": 13},
        dtype=dtype,
        seed=seed,
    )


def write_cityscapes(
    root: Path,
    *,
    train: int = 4,
    val: int = 3,
    size: tuple[int, int] = (32, 48),
    dtype: npt.DTypeLike = np.float64,
    seed: int = 0,
) -> Path:
    """A CityScapes folder with ``label_7`` and ``label_19``."""
    return write_layout(
        root,
        CITYSCAPES_FOLDERS,
        train=train,
        val=val,
        size=size,
        num_classes={"label_7": 7, "label_19": 19},
        dtype=dtype,
        seed=seed,
    )


def read(root: Path, split: str, folder: str, index: int) -> npt.NDArray[np.generic]:
    """The stored array of one file."""
    array: npt.NDArray[np.generic] = np.load(root / split / folder / f"{index}.npy")
    return array


# -- breaking a NYUv2 folder ----------------------------------------------------------------
#
# Each function breaks a folder written by ``write_nyuv2`` (default sizes: 4 train, 3 val,
# 32 x 48) in one way and returns the path that the error message must name.


def _path(root: Path, split: str, folder: str, index: int) -> Path:
    return root / split / folder / f"{index}.npy"


def _save(path: Path, array: npt.NDArray[np.generic]) -> Path:
    np.save(path, array)
    return path


def _resave_all(root: Path, split: str, index: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    for folder, kind in NYUV2_FOLDERS.items():
        np.save(_path(root, split, folder, index), random_array(rng, kind, size, 13))


def _missing_root(root: Path) -> Path:
    shutil.rmtree(root)
    return root


def _missing_split(root: Path) -> Path:
    shutil.rmtree(root / "val")
    return root / "val"


def _missing_modality(root: Path) -> Path:
    shutil.rmtree(root / "train" / "normal")
    return root / "train" / "normal"


def _fewer_files(root: Path) -> Path:
    _path(root, "train", "depth", 3).unlink()
    return root / "train" / "depth"


def _gap_in_names(root: Path) -> Path:
    _path(root, "train", "label", 1).unlink()
    return _path(root, "train", "label", 1)


def _zero_padded_name(root: Path) -> Path:
    path = _path(root, "val", "label", 2)
    return path.rename(path.with_name("002.npy"))


def _stray_file(root: Path) -> Path:
    path = root / "train" / "image" / "notes.txt"
    path.write_text("converted from the .mat file\n", encoding="utf-8")
    return path


def _empty_folder(root: Path) -> Path:
    for path in (root / "val" / "image").iterdir():
        path.unlink()
    return root / "val" / "image"


def _truncated(root: Path) -> Path:
    path = _path(root, "train", "normal", 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_header(root: Path) -> Path:
    path = _path(root, "train", "depth", 1)
    path.write_bytes(path.read_bytes()[:40])
    return path


def _text_file(root: Path) -> Path:
    path = _path(root, "train", "depth", 0)
    path.write_text("0.5 0.5 0.5\n", encoding="utf-8")
    return path


def _object_dtype(root: Path) -> Path:
    path = _path(root, "val", "depth", 1)
    np.save(path, np.array([{"depth": 1.0}], dtype=object), allow_pickle=True)
    return path


def _string_dtype(root: Path) -> Path:
    return _save(_path(root, "train", "label", 0), np.full((32, 48), "wall"))


def _integer_image(root: Path) -> Path:
    return _save(_path(root, "train", "image", 2), np.zeros((32, 48, 3), dtype=np.uint8))


def _channels_first_image(root: Path) -> Path:
    return _save(_path(root, "train", "image", 1), np.zeros((3, 32, 48)))


def _first_image_2d(root: Path) -> Path:
    return _save(_path(root, "train", "image", 0), np.zeros((32, 48)))


def _label_3d(root: Path) -> Path:
    return _save(_path(root, "train", "label", 2), np.zeros((32, 48, 1)))


def _depth_2d(root: Path) -> Path:
    return _save(_path(root, "val", "depth", 0), np.ones((32, 48)))


def _normal_4_channels(root: Path) -> Path:
    return _save(_path(root, "train", "normal", 3), np.zeros((32, 48, 4)))


def _depth_other_size(root: Path) -> Path:
    return _save(_path(root, "train", "depth", 2), np.ones((33, 48, 1)))


def _one_sample_other_size(root: Path) -> Path:
    _resave_all(root, "train", 3, (32, 50))
    return _path(root, "train", "image", 3)


def _val_other_size(root: Path) -> Path:
    for index in range(3):
        _resave_all(root, "val", index, (30, 48))
    return _path(root, "val", "image", 0)


BREAKS: dict[str, Callable[[Path], Path]] = {
    "missing root": _missing_root,
    "missing split": _missing_split,
    "missing modality": _missing_modality,
    "fewer files in one modality": _fewer_files,
    "a gap in the names": _gap_in_names,
    "a zero-padded name": _zero_padded_name,
    "a stray file": _stray_file,
    "an empty folder": _empty_folder,
    "a truncated file": _truncated,
    "a truncated header": _truncated_header,
    "a text file": _text_file,
    "an object (pickled) array": _object_dtype,
    "a string array": _string_dtype,
    "an integer image": _integer_image,
    "a channels-first image": _channels_first_image,
    "a 2-D first image": _first_image_2d,
    "an H x W x 1 label": _label_3d,
    "an H x W depth": _depth_2d,
    "four normal channels": _normal_4_channels,
    "one depth of another size": _depth_other_size,
    "one sample of another size": _one_sample_other_size,
    "a val split of another size": _val_other_size,
}
"""Ways to break a NYUv2 folder at build time: name -> ``break(root) -> path to name``."""
