"""MultiDigits: source verification, splits, canvases, labels, masks and options."""

from __future__ import annotations

import doctest
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import sklearn.datasets
import torch
from torch.utils.data import DataLoader

import polytask.data.multidigits as md
from polytask.data import DATASETS, SPLITS, DataBundle, TensorMTLDataset
from polytask.errors import ConfigError, DataError
from polytask.losses import CrossEntropyLoss, MSELoss
from polytask.metrics.classification import Accuracy
from polytask.metrics.regression import RegressionMetric
from polytask.registry import call_with_options

SMALL = {"n_train": 300, "n_val": 100, "n_test": 100}
PINNED_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(scope="module")
def digits() -> Any:
    """The reference: scikit-learn's own loader, independent of polytask's reading."""
    return sklearn.datasets.load_digits()


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    built: DataBundle = md.multidigits(**SMALL, with_sum=True)
    return built


def single(split: Any) -> md.MultiDigitsDataset:
    assert isinstance(split, md.MultiDigitsDataset)
    return split


def rebuild(digits: Any, prov: dict[str, np.ndarray], i: int, canvas: int) -> np.ndarray:
    """One canvas, pixel by pixel, from its provenance and the raw source."""
    out = np.zeros((canvas, canvas), dtype=np.float32)
    for side in ("left", "right"):
        image = digits.images[prov[f"{side}_index"][i]] / 16.0
        top, left = prov[f"{side}_row"][i], prov[f"{side}_col"][i]
        for r in range(8):
            for c in range(8):
                out[top + r, left + c] = max(out[top + r, left + c], np.float32(image[r, c]))
    return out


# -- the source ----------------------------------------------------------------------------


def test_source_is_verified_and_matches_load_digits(digits: Any) -> None:
    images, labels = md.load_source()
    assert images.shape == (1797, 8, 8)
    assert images.dtype == np.float32
    assert images.min() == 0.0
    assert images.max() == 1.0
    assert np.bincount(labels).tolist() == PINNED_CLASS_COUNTS
    assert list(md.CLASS_COUNTS) == PINNED_CLASS_COUNTS
    np.testing.assert_array_equal(images, (digits.images / 16).astype(np.float32))
    np.testing.assert_array_equal(labels, digits.target)


def test_load_digits_is_the_fallback_when_the_file_is_not_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    direct = md.load_source()
    monkeypatch.setattr(md, "_bundled_digits_file", lambda: None)
    calls: list[int] = []
    real = sklearn.datasets.load_digits

    def counting_load_digits() -> Any:
        calls.append(1)
        return real()

    monkeypatch.setattr(sklearn.datasets, "load_digits", counting_load_digits)
    via_sklearn = md.load_source()
    assert calls == [1]
    np.testing.assert_array_equal(direct[0], via_sklearn[0])
    np.testing.assert_array_equal(direct[1], via_sklearn[1])


def _fake_load_digits(images: np.ndarray, target: np.ndarray) -> Any:
    return lambda: SimpleNamespace(images=images, target=target)


@pytest.mark.parametrize(
    ("alter", "expected"),
    [
        (
            lambda im, t: (im[:-1], t[:-1]),
            "shape (1797, 8, 8) and labels of shape (1797,), found (1796, 8, 8)",
        ),
        (lambda im, t: (im.reshape(1797, 64), t), "found (1797, 64)"),
        (lambda im, t: (im * 16, t), "integer pixel values in [0, 16]"),
        (lambda im, t: (im + 0.5, t), "integer pixel values"),
        (lambda im, t: (im, np.where(t == 9, 10, t)), "labels in [0, 9]"),
        (
            lambda im, t: (im, np.where(t == 8, 9, t)),
            "have [178, 182, 177, 183, 181, 182, 181, 179, 174, 180] digits",
        ),
        (lambda im, t: (np.where(im == 16, 15, im), t), "SHA-256"),
        (lambda im, t: (im, np.roll(t, 1)), "SHA-256"),
    ],
)
def test_altered_source_raises_data_error(
    monkeypatch: pytest.MonkeyPatch, digits: Any, alter: Any, expected: str
) -> None:
    images, target = alter(digits.images.copy(), digits.target.copy())
    monkeypatch.setattr(md, "_bundled_digits_file", lambda: None)
    monkeypatch.setattr(sklearn.datasets, "load_digits", _fake_load_digits(images, target))
    with pytest.raises(DataError) as info:
        md.multidigits(**SMALL)
    assert expected in str(info.value)
    assert "Reinstall scikit-learn" in str(info.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a gzip file", "Could not read the digits"),
        (None, "shape (1797, 8, 8)"),
    ],
)
def test_damaged_bundled_file_raises_data_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: bytes | None, expected: str
) -> None:
    import gzip

    path = tmp_path / "digits.csv.gz"
    if content is None:
        with gzip.open(path, "wt") as handle:
            handle.write("0,1,2\n3,4,5\n")
    else:
        path.write_bytes(content)
    monkeypatch.setattr(md, "_bundled_digits_file", lambda: path)
    with pytest.raises(DataError) as info:
        md.load_source()
    assert expected in str(info.value)


# -- splits and canvases ------------------------------------------------------------------


def test_registered_and_bundle_structure(bundle: DataBundle) -> None:
    assert DATASETS.get("multidigits") is md.multidigits
    built = call_with_options(DATASETS.get("multidigits"), {"n_train": 5}, where="data")
    assert len(built.train) == 5
    assert bundle.input_shape == (1, 16, 16)
    assert not bundle.multi_input
    assert list(bundle.tasks) == ["left", "right", "sum"]
    info = bundle.info
    assert info["source"] == "sklearn.datasets.load_digits"
    assert info["sizes"] == {"train": 300, "val": 100, "test": 100}
    assert info["seed"] == 0
    assert info["pool_sizes"] == {"train": 1079, "val": 359, "test": 359}
    for split in SPLITS:
        data = single(bundle.split(split))
        assert isinstance(data, TensorMTLDataset)
        assert data.split == split
        assert data.inputs.shape == (info["sizes"][split], 1, 16, 16)
        assert data.inputs.dtype == torch.float32
        assert data.mask is None
        assert "mask" not in data[0]


def test_source_pools_are_disjoint_and_stratified(bundle: DataBundle) -> None:
    _, labels = md.load_source()
    pools = {split: single(bundle.split(split)).pool for split in SPLITS}
    assert sum(len(pool) for pool in pools.values()) == 1797
    assert len(np.unique(np.concatenate(list(pools.values())))) == 1797
    for split, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        per_class = np.bincount(labels[pools[split]], minlength=10)
        assert np.all(np.abs(per_class - share * np.array(PINNED_CLASS_COUNTS)) <= 1), split
        prov = single(bundle.split(split)).provenance
        used = np.concatenate([prov["left_index"], prov["right_index"]])
        assert np.isin(used, pools[split]).all(), split


def test_every_canvas_rebuilds_from_its_provenance(bundle: DataBundle, digits: Any) -> None:
    for split in SPLITS:
        data = single(bundle.split(split))
        prov = data.provenance
        assert prov["left_row"].min() >= 0 and prov["left_row"].max() <= 8
        assert prov["right_row"].min() >= 0 and prov["right_row"].max() <= 8
        assert set(prov["left_col"].tolist()) <= {0, 1, 2}
        assert set(prov["right_col"].tolist()) <= {6, 7, 8}
        for i in range(len(data)):
            expected = rebuild(digits, prov, i, 16)
            np.testing.assert_array_equal(data.inputs[i, 0].numpy(), expected)


def test_small_and_large_canvases(digits: Any) -> None:
    for canvas in (12, 21):
        data = single(md.multidigits(n_train=40, n_val=1, n_test=1, canvas=canvas).train)
        prov = data.provenance
        assert data.inputs.shape == (40, 1, canvas, canvas)
        assert prov["left_row"].max() <= canvas - 8
        assert set(prov["right_col"].tolist()) <= set(range(canvas - 10, canvas - 7))
        for i in range(len(data)):
            np.testing.assert_array_equal(
                data.inputs[i, 0].numpy(), rebuild(digits, prov, i, canvas)
            )


def test_labels_are_the_source_classes(bundle: DataBundle, digits: Any) -> None:
    for split in SPLITS:
        data = single(bundle.split(split))
        prov = data.provenance
        left, right = digits.target[prov["left_index"]], digits.target[prov["right_index"]]
        assert data.targets["left"].dtype == torch.int64
        np.testing.assert_array_equal(data.targets["left"].numpy(), left)
        np.testing.assert_array_equal(data.targets["right"].numpy(), right)
        total = data.targets["sum"]
        assert total.dtype == torch.float32
        assert total.shape == (len(data), 1)
        np.testing.assert_array_equal(total[:, 0].numpy(), (left + right).astype(np.float32))


def test_classes_are_roughly_balanced() -> None:
    data = single(md.multidigits(n_train=4000, n_val=1, n_test=1).train)
    for task in ("left", "right"):
        counts = np.bincount(data.targets[task].numpy(), minlength=10)
        assert counts.min() > 300 and counts.max() < 500, (task, counts)


# -- determinism ----------------------------------------------------------------------------


def assert_same(a: md.MultiDigitsDataset, b: md.MultiDigitsDataset) -> None:
    assert torch.equal(a.inputs, b.inputs)
    assert a.targets.keys() == b.targets.keys()
    for task in a.targets:
        assert torch.equal(a.targets[task], b.targets[task])
    for key in a.provenance:
        np.testing.assert_array_equal(a.provenance[key], b.provenance[key])


def test_same_seed_same_data_and_other_seed_other_data(bundle: DataBundle) -> None:
    again = md.multidigits(**SMALL, with_sum=True)
    other = md.multidigits(**SMALL, with_sum=True, seed=1)
    for split in SPLITS:
        assert_same(single(bundle.split(split)), single(again.split(split)))
        assert not torch.equal(
            single(bundle.split(split)).inputs, single(other.split(split)).inputs
        )
        assert not np.array_equal(single(bundle.split(split)).pool, single(other.split(split)).pool)


def test_split_does_not_depend_on_other_sizes_or_the_sum_task(bundle: DataBundle) -> None:
    resized = single(md.multidigits(n_train=17, n_val=100, n_test=3).val)
    val = single(bundle.val)
    assert torch.equal(resized.inputs, val.inputs)
    for task in ("left", "right"):
        assert torch.equal(resized.targets[task], val.targets[task])
    for key, values in val.provenance.items():
        np.testing.assert_array_equal(resized.provenance[key], values)
    without_sum = md.multidigits(**SMALL)
    assert torch.equal(single(without_sum.train).inputs, single(bundle.train).inputs)


# -- partial labels -------------------------------------------------------------------------


def test_label_fraction_masks_train_only(digits: Any) -> None:
    built = md.multidigits(n_train=4000, n_val=50, n_test=50, with_sum=True, label_fraction=0.3)
    train = single(built.train)
    assert train.mask is not None
    assert set(train.mask) == {"left", "right", "sum"}
    prov = train.provenance
    truth = {
        "left": digits.target[prov["left_index"]],
        "right": digits.target[prov["right_index"]],
    }
    truth["sum"] = truth["left"] + truth["right"]
    for task, mask in train.mask.items():
        assert mask.dtype == torch.bool
        assert abs(mask.float().mean().item() - 0.3) < 0.03, task
        target = train.targets[task].reshape(len(train))
        assert (target[~mask] == md.MISSING_LABEL).all(), task
        np.testing.assert_array_equal(target[mask].numpy(), truth[task][mask.numpy()])
    assert not torch.equal(train.mask["left"], train.mask["right"])
    for split in ("val", "test"):
        data = single(built.split(split))
        assert data.mask is None
        assert "mask" not in data[0]
    assert built.info["label_fraction"] == {"left": 0.3, "right": 0.3, "sum": 0.3}


def test_label_fraction_mapping_masks_every_task() -> None:
    built = md.multidigits(n_train=2000, n_val=1, n_test=1, label_fraction={"right": 0.5})
    train = single(built.train)
    assert train.mask is not None
    assert set(train.mask) == {"left", "right"}
    assert bool(train.mask["left"].all())
    assert abs(train.mask["right"].float().mean().item() - 0.5) < 0.05
    assert built.info["label_fraction"] == {"left": 1.0, "right": 0.5}


def test_full_labels_carry_no_mask() -> None:
    built = md.multidigits(n_train=10, n_val=1, n_test=1, label_fraction={"left": 1.0})
    assert single(built.train).mask is None


def test_masked_losses_are_finite() -> None:
    built = md.multidigits(n_train=64, n_val=1, n_test=1, with_sum=True, label_fraction=0.5)
    batch = next(iter(DataLoader(built.train, batch_size=64)))
    generator = torch.Generator().manual_seed(0)
    for name, task in built.tasks.items():
        pred = torch.randn(64, task.output_dim, generator=generator)
        loss = task.compute_loss(pred, batch["targets"][name], batch["mask"][name])
        assert torch.isfinite(loss), name


# -- multi-input and tasks ------------------------------------------------------------------


def test_multi_input_gives_each_task_its_own_canvases(digits: Any) -> None:
    built = md.multidigits(n_train=50, n_val=20, n_test=10, with_sum=True, multi_input=True)
    assert built.multi_input
    for split, n in (("train", 50), ("val", 20), ("test", 10)):
        per_task = built.split(split)
        assert isinstance(per_task, dict)
        assert set(per_task) == {"left", "right", "sum"}
        for task, data in per_task.items():
            data = single(data)
            assert len(data) == n
            assert set(data[0]["targets"]) == {task}
            assert data.mask is None
            prov = data.provenance
            np.testing.assert_array_equal(data.inputs[0, 0].numpy(), rebuild(digits, prov, 0, 16))
        assert not torch.equal(single(per_task["left"]).inputs, single(per_task["right"]).inputs)
    masked = md.multidigits(n_train=50, n_val=2, n_test=2, multi_input=True, label_fraction=0.5)
    assert isinstance(masked.train, dict)
    for task, data in masked.train.items():
        assert set(data[0]["mask"]) == {task}
    assert isinstance(masked.val, dict)
    assert all(single(data).mask is None for data in masked.val.values())


def test_task_definitions(bundle: DataBundle) -> None:
    for name in ("left", "right"):
        task = bundle.tasks[name]
        assert task.name == name
        assert task.output_dim == 10
        assert task.kind == "classification"
        assert isinstance(task.loss, CrossEntropyLoss)
        assert list(task.metrics) == ["accuracy"]
        metric = task.metrics["accuracy"]()
        assert isinstance(metric, Accuracy) and metric.num_classes == 10
        assert task.higher_is_better() == {"accuracy": True}
    total = bundle.tasks["sum"]
    assert total.output_dim == 1
    assert total.kind == "regression"
    assert isinstance(total.loss, MSELoss)
    assert dict(total.metrics) == {"regression": RegressionMetric}
    assert total.higher_is_better() == {"mae": False, "rmse": False}
    assert list(md.multidigits(n_train=1, n_val=1, n_test=1).tasks) == ["left", "right"]


def test_default_collate_batches() -> None:
    built = md.multidigits(
        n_train=20, n_val=1, n_test=1, with_sum=True, label_fraction={"sum": 0.5}
    )
    batch = next(iter(DataLoader(built.train, batch_size=8, shuffle=False)))
    assert set(batch) == {"input", "targets", "mask"}
    assert batch["input"].shape == (8, 1, 16, 16)
    assert batch["input"].dtype == torch.float32
    assert batch["targets"]["left"].shape == (8,)
    assert batch["targets"]["left"].dtype == torch.int64
    assert batch["targets"]["sum"].shape == (8, 1)
    assert set(batch["mask"]) == {"left", "right", "sum"}
    assert all(m.shape == (8,) and m.dtype == torch.bool for m in batch["mask"].values())


def test_default_bundle_sizes() -> None:
    built = md.multidigits()
    assert [len(single(built.split(s))) for s in SPLITS] == [4000, 1000, 1000]


def test_docstring_example_runs() -> None:
    runner = doctest.DocTestRunner()
    tests = doctest.DocTestFinder().find(md)
    assert any(test.examples for test in tests)
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# -- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"n_train": 0}, "`n_train` to be an integer >= 1, found 0"),
        ({"n_val": -3}, "`n_val` to be an integer >= 1, found -3"),
        ({"n_test": 2.5}, "`n_test` to be an integer >= 1, found 2.5"),
        ({"n_train": True}, "`n_train` to be an integer >= 1, found True"),
        ({"seed": -1}, "`seed` to be an integer >= 0, found -1"),
        ({"canvas": 11}, "`canvas` to be an integer >= 12, found 11"),
        ({"canvas": "16"}, "`canvas` to be an integer >= 12, found '16'"),
        ({"label_fraction": 0.0}, "`label_fraction` to be a number in (0, 1], found 0.0"),
        ({"label_fraction": 1.5}, "`label_fraction` to be a number in (0, 1], found 1.5"),
        ({"label_fraction": "half"}, "`label_fraction` to be a number in (0, 1], found 'half'"),
        (
            {"label_fraction": {"left": 0}},
            "`label_fraction['left']` to be a number in (0, 1], found 0",
        ),
        (
            {"label_fraction": {"lefft": 0.5}},
            "`label_fraction` names unknown task 'lefft'. Did you mean 'left'?",
        ),
        ({"label_fraction": {"sum": 0.5}}, "'sum' needs with_sum=True"),
        ({"with_sum": "yes"}, "`with_sum` to be true or false, found 'yes'"),
        ({"multi_input": 1}, "`multi_input` to be true or false, found 1"),
    ],
)
def test_bad_options_raise_config_error(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        md.multidigits(**options)
    assert expected in str(info.value)
