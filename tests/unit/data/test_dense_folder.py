"""NYUv2 and CityScapes from the published .npy layout: samples, splits, options, validation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dense_layout as dl
import polytask.data.dense_folder as dense_folder
from polytask.data import DATASETS, DataBundle
from polytask.data.augment import RandomScaleCropFlip
from polytask.data.cityscapes import cityscapes
from polytask.data.dense_folder import DenseFolderDataset
from polytask.data.nyuv2 import NYUV2_LAYOUT, nyuv2
from polytask.errors import ConfigError, DataError
from polytask.registry import call_with_options

SOURCE_FRAGMENTS = ("github.com/lorenmt/mtan", "downloads nothing")


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dl.write_nyuv2(tmp_path_factory.mktemp("nyuv2") / "nyuv2")


@pytest.fixture(scope="module")
def city_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dl.write_cityscapes(tmp_path_factory.mktemp("cityscapes") / "cityscapes")


@pytest.fixture(scope="module")
def bundle(nyu_root: Path) -> DataBundle:
    return nyuv2(root=str(nyu_root))


def dataset(split: object) -> DenseFolderDataset:
    assert isinstance(split, DenseFolderDataset)
    return split


def assert_data_error(exc: pytest.ExceptionInfo[DataError], path: Path, *fragments: str) -> str:
    message = str(exc.value)
    assert "\n" not in message
    for fragment in (str(path), "expected", "found", *SOURCE_FRAGMENTS, *fragments):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- samples --------------------------------------------------------------------------------


def test_nyuv2_bundle_has_the_published_splits_and_tasks(
    bundle: DataBundle, nyu_root: Path
) -> None:
    assert list(bundle.tasks) == ["semantic", "depth", "normal"]
    assert bundle.tasks["semantic"].output_dim == 13
    assert bundle.input_shape == (3, 32, 48)
    assert not bundle.multi_input
    assert (len(dataset(bundle.train)), len(dataset(bundle.test))) == (4, 3)
    assert bundle.val is bundle.test
    assert dataset(bundle.test).files.directory == nyu_root / "val"
    info = bundle.info
    assert info["root"] == str(nyu_root)
    assert info["sizes"] == {"train": 4, "val": 3, "test": 3}
    assert info["published_sizes"] == {"train": 4, "val": 3}
    assert info["image_size"] == [32, 48]
    assert info["num_classes"] == 13
    assert info["augment"] is False
    assert info["val_is_test"] is True


def test_samples_follow_the_contract_and_equal_the_files(
    bundle: DataBundle, nyu_root: Path
) -> None:
    for split, folder, data in (("train", "train", bundle.train), ("test", "val", bundle.test)):
        for i in range(len(dataset(data))):
            sample = dataset(data)[i]
            assert set(sample) == {"input", "targets"}, split
            image, targets = sample["input"], sample["targets"]
            assert list(targets) == ["semantic", "depth", "normal"]
            assert (image.dtype, tuple(image.shape)) == (torch.float32, (3, 32, 48))
            assert image.is_contiguous()
            label, depth, normal = targets["semantic"], targets["depth"], targets["normal"]
            assert (label.dtype, tuple(label.shape)) == (torch.int64, (32, 48))
            assert (depth.dtype, tuple(depth.shape)) == (torch.float32, (1, 32, 48))
            assert (normal.dtype, tuple(normal.shape)) == (torch.float32, (3, 32, 48))
            assert depth.is_contiguous() and normal.is_contiguous()
            stored = {f: dl.read(nyu_root, folder, f, i) for f in dl.NYUV2_FOLDERS}
            assert stored["image"].dtype == np.float64
            np.testing.assert_array_equal(
                image.numpy(), stored["image"].transpose(2, 0, 1).astype(np.float32)
            )
            np.testing.assert_array_equal(label.numpy(), stored["label"].astype(np.int64))
            np.testing.assert_array_equal(
                depth.numpy(), stored["depth"].transpose(2, 0, 1).astype(np.float32)
            )
            np.testing.assert_array_equal(
                normal.numpy(), stored["normal"].transpose(2, 0, 1).astype(np.float32)
            )
            assert label.min() >= -1 and label.max() < 13


def test_samples_collate_into_batches(bundle: DataBundle) -> None:
    batch = next(iter(DataLoader(dataset(bundle.train), batch_size=2)))
    assert batch["input"].shape == (2, 3, 32, 48)
    assert batch["targets"]["semantic"].shape == (2, 32, 48)
    assert batch["targets"]["depth"].shape == (2, 1, 32, 48)
    assert batch["targets"]["normal"].shape == (2, 3, 32, 48)


@pytest.mark.parametrize(
    ("float_dtype", "label_dtype"),
    [(np.float32, np.int64), (np.float16, np.int16), (np.float64, np.uint8), (">f8", ">i4")],
)
def test_other_dtypes_on_disk_are_converted(
    tmp_path: Path, float_dtype: str, label_dtype: str
) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu", train=2, val=1, dtype=float_dtype)
    labels = np.arange(32 * 48).reshape(32, 48) % 13
    np.save(root / "train" / "label" / "0.npy", labels.astype(label_dtype))
    sample = dataset(nyuv2(root=str(root)).train)[0]
    assert sample["input"].dtype == torch.float32
    assert sample["targets"]["semantic"].dtype == torch.int64
    np.testing.assert_array_equal(sample["targets"]["semantic"].numpy(), labels)
    np.testing.assert_array_equal(
        sample["targets"]["depth"].numpy()[0],
        dl.read(root, "train", "depth", 0)[..., 0].astype(np.float32),
    )


def test_fortran_ordered_files_and_hidden_files_are_fine(tmp_path: Path) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu", train=2, val=1)
    image = np.asfortranarray(dl.read(root, "train", "image", 1))
    np.save(root / "train" / "image" / "1.npy", image)
    (root / "train" / "image" / ".DS_Store").write_bytes(b"\x00\x01")
    sample = dataset(nyuv2(root=str(root)).train)[1]
    np.testing.assert_array_equal(
        sample["input"].numpy(), image.transpose(2, 0, 1).astype(np.float32)
    )


def test_builders_are_registered_and_take_config_options(nyu_root: Path, city_root: Path) -> None:
    built = call_with_options(
        DATASETS.get("nyuv2"), {"root": str(nyu_root), "limit": 2}, where="data.options"
    )
    assert built.info["sizes"]["train"] == 2
    built = call_with_options(
        DATASETS.get("cityscapes"),
        {"root": str(city_root), "num_classes": 19},
        where="data.options",
    )
    assert built.info["num_classes"] == 19


# -- splits and options ---------------------------------------------------------------------


def test_val_size_holds_out_a_seeded_disjoint_subset(tmp_path: Path) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu", train=8, val=2, size=(32, 32))
    subsets = set()
    for seed in range(4):
        built = nyuv2(root=str(root), val_size=3, seed=seed, augment=True)
        train, val = dataset(built.train), dataset(built.val)
        assert len(val) == 3 and len(train) == 5
        assert not set(train.indices) & set(val.indices)
        assert sorted(train.indices + val.indices) == list(range(8))
        assert train.files.directory == val.files.directory == root / "train"
        assert built.val is not built.test
        assert built.info["val_is_test"] is False
        assert built.info["sizes"] == {"train": 5, "val": 3, "test": 2}
        assert isinstance(train.transform, RandomScaleCropFlip)
        assert val.transform is None  # held-out images are never augmented
        again = dataset(nyuv2(root=str(root), val_size=3, seed=seed).val)
        assert again.indices == val.indices
        subsets.add(tuple(val.indices))
        stored = dl.read(root, "train", "depth", val.indices[0])[..., 0].astype(np.float32)
        np.testing.assert_array_equal(val[0]["targets"]["depth"][0].numpy(), stored)
    assert len(subsets) > 1


def test_limit_keeps_the_first_images_of_each_split(tmp_path: Path) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu", train=5, val=4)
    built = nyuv2(root=str(root), limit=2)
    assert dataset(built.train).indices == [0, 1]
    assert dataset(built.test).indices == [0, 1]
    assert built.info["sizes"] == {"train": 2, "val": 2, "test": 2}
    assert built.info["published_sizes"] == {"train": 5, "val": 4}
    assert nyuv2(root=str(root), limit=100).info["sizes"]["train"] == 5
    held = nyuv2(root=str(root), limit=3, val_size=1)
    assert sorted(dataset(held.train).indices + dataset(held.val).indices) == [0, 1, 2]


def test_augment_applies_to_the_train_split_only(nyu_root: Path) -> None:
    built = nyuv2(root=str(nyu_root), augment=True)
    train = dataset(built.train)
    assert isinstance(train.transform, RandomScaleCropFlip)
    assert train.transform.scales == (1.0, 1.2, 1.5)
    assert dataset(built.test).transform is None
    assert built.info["augment"] is True
    torch.manual_seed(0)
    first = [train[i] for i in range(len(train))]
    torch.manual_seed(0)
    second = [train[i] for i in range(len(train))]
    for a, b in zip(first, second, strict=True):
        assert a["input"].shape == (3, 32, 48)
        assert a["targets"]["semantic"].dtype == torch.int64
        torch.testing.assert_close(a["input"], b["input"])
        torch.testing.assert_close(a["targets"]["normal"], b["targets"]["normal"])


def test_class_pixels_equal_a_naive_count(tmp_path: Path) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu", train=6, val=2)
    for kwargs in ({}, {"val_size": 2, "seed": 3}, {"limit": 3}):
        built = nyuv2(root=str(root), **kwargs)  # type: ignore[arg-type]
        naive = [0] * 13
        for index in dataset(built.train).indices:
            for value in dl.read(root, "train", "label", index).ravel().tolist():
                if value >= 0:
                    naive[int(value)] += 1
        assert built.info["class_pixels"] == naive, kwargs


def test_class_pixels_follow_a_changed_label_file(tmp_path: Path) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu", train=2, val=1)
    nyuv2(root=str(root))
    np.save(root / "train" / "label" / "0.npy", np.full((32, 48), 5.0))
    np.save(root / "train" / "label" / "1.npy", np.full((32, 48), -1.0))
    pixels = nyuv2(root=str(root)).info["class_pixels"]
    assert pixels == [0] * 5 + [32 * 48] + [0] * 7


def test_metric_protocol_reaches_the_tasks(nyu_root: Path) -> None:
    built = nyuv2(root=str(nyu_root), metric_protocol="per_batch")
    metric = built.tasks["depth"].metrics["depth"]()
    assert metric.protocol == "per_batch"  # type: ignore[attr-defined]


@pytest.mark.parametrize("num_classes", [7, 19])
def test_cityscapes_reads_the_chosen_label_folder(city_root: Path, num_classes: int) -> None:
    built = cityscapes(root=str(city_root), num_classes=num_classes)
    assert list(built.tasks) == ["semantic", "depth"]
    assert built.tasks["semantic"].output_dim == num_classes
    assert built.input_shape == (3, 32, 48)
    assert built.info["label_folder"] == f"label_{num_classes}"
    assert built.info["num_classes"] == num_classes
    assert built.info["val_is_test"] is True
    assert len(built.info["class_pixels"]) == num_classes
    sample = dataset(built.test)[2]
    assert list(sample["targets"]) == ["semantic", "depth"]
    stored = dl.read(city_root, "val", f"label_{num_classes}", 2)
    np.testing.assert_array_equal(sample["targets"]["semantic"].numpy(), stored.astype(np.int64))
    assert sample["targets"]["depth"].shape == (1, 32, 48)


def test_cityscapes_augmentation_divides_or_multiplies_inverse_depth(city_root: Path) -> None:
    for scaling in ("divide", "multiply"):
        train = dataset(cityscapes(root=str(city_root), augment=True, depth_scaling=scaling).train)
        assert isinstance(train.transform, RandomScaleCropFlip)
        train.transform.scales = (1.5,)
        sample = train[0]
        stored = dl.read(city_root, "train", "depth", 0).astype(np.float32)
        scaled = stored / np.float32(1.5) if scaling == "divide" else stored * np.float32(1.5)
        values = set(np.unique(scaled).tolist())
        assert set(np.unique(sample["targets"]["depth"].numpy()).tolist()) <= values


@pytest.mark.parametrize(
    ("builder", "options", "fragment"),
    [
        (nyuv2, {"val_size": 4}, "val_size"),
        (nyuv2, {"val_size": -1}, "val_size"),
        (nyuv2, {"limit": 0}, "limit"),
        (nyuv2, {"limit": 2, "val_size": 2}, "limit=2"),
        (nyuv2, {"seed": 1.5}, "seed"),
        (nyuv2, {"augment": "yes"}, "augment"),
        (nyuv2, {"metric_protocol": "batch"}, "metric_protocol"),
        (nyuv2, {"root": ""}, "root"),
        (cityscapes, {"num_classes": 13}, "7 or 19"),
        (cityscapes, {"num_classes": True}, "7 or 19"),
        (cityscapes, {"depth_scaling": "inverse"}, "depth_scaling"),
    ],
)
def test_bad_options_are_config_errors(
    nyu_root: Path,
    city_root: Path,
    builder: Callable[..., DataBundle],
    options: dict[str, object],
    fragment: str,
) -> None:
    root = nyu_root if builder is nyuv2 else city_root
    with pytest.raises(ConfigError) as exc:
        builder(**{"root": str(root), **options})
    assert fragment in str(exc.value)


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(dl.BREAKS))
def test_a_malformed_folder_is_one_data_error_naming_the_file(tmp_path: Path, case: str) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu")
    path = dl.BREAKS[case](root)
    with pytest.raises(DataError) as exc:
        nyuv2(root=str(root))
    assert_data_error(exc, path)


def test_shape_errors_say_what_was_expected_and_found(tmp_path: Path) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu")
    path = dl.BREAKS["a channels-first image"](root)
    with pytest.raises(DataError) as exc:
        nyuv2(root=str(root))
    assert_data_error(exc, path, "(32, 48, 3)", "H x W x 3", "found shape (3, 32, 48)")


def test_a_missing_label_folder_lists_what_is_there(tmp_path: Path) -> None:
    root = dl.write_cityscapes(tmp_path / "city")
    for split in ("train", "val"):
        (root / split / "label_19").rename(root / split / "label")
    with pytest.raises(DataError) as exc:
        cityscapes(root=str(root), num_classes=19)
    assert_data_error(exc, root / "train" / "label_19", "holds: depth, image, label, label_7")


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.full((32, 48), 13.0), "[0, 12] or -1"),
        (np.full((32, 48), -2.0), "[-2.0, -2.0]"),
        (np.full((32, 48), np.nan), "nan"),
        (np.full((32, 48), 2.5), "whole class indices"),
        (np.full((32, 48), 255, dtype=np.uint8), "255"),
    ],
)
def test_bad_label_values_are_data_errors_at_load_time(
    tmp_path: Path, array: np.ndarray, fragment: str
) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu")
    path = root / "val" / "label" / "1.npy"
    np.save(path, array)
    test = dataset(nyuv2(root=str(root)).test)
    test[0]
    with pytest.raises(DataError) as exc:
        test[1]
    assert_data_error(exc, path, fragment)


def test_bad_training_labels_fail_the_build(tmp_path: Path) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu")
    path = root / "train" / "label" / "3.npy"
    np.save(path, np.full((32, 48), 13.0))
    with pytest.raises(DataError) as exc:
        nyuv2(root=str(root))
    assert_data_error(exc, path, "[13.0, 13.0]")


def test_image_values_outside_0_1_are_data_errors_at_load_time(tmp_path: Path) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu")
    path = root / "val" / "image" / "2.npy"
    np.save(path, np.full((32, 48, 3), 255.0))
    test = dataset(nyuv2(root=str(root)).test)
    with pytest.raises(DataError) as exc:
        test[2]
    assert_data_error(exc, path, "[0, 1]", "255.0")


def test_the_scan_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu")

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("np.load called during the scan")

    monkeypatch.setattr(dense_folder.np, "load", no_load)
    files = dense_folder.scan_split(root, "train", NYUV2_LAYOUT)
    assert (files.size, files.height, files.width) == (4, 32, 48)
