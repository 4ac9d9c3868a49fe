"""Solar Flare: the file river ships, the one-hot encoding, the splits and the errors."""

from __future__ import annotations

import doctest
import importlib.util
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import polytask.data._tabular as tabular
import polytask.data.solarflare as sf
from helpers import assert_error, cli
from polytask.data import DATASETS, SPLITS, DataBundle, TensorMTLDataset
from polytask.errors import ConfigError, DataError
from polytask.losses import MSELoss
from polytask.metrics.regression import RegressionMetric

RECIPE = Path(__file__).resolve().parents[3] / "configs" / "tabular" / "solarflare.yaml"
TARGET_COLUMNS = ("c-class-flares", "m-class-flares", "x-class-flares")


@pytest.fixture(scope="module")
def reference() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The rows as river's own reader gives them, independent of polytask's reading."""
    from river import datasets

    return list(datasets.SolarFlare())


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    built: DataBundle = sf.solarflare()
    return built


def tensor_split(bundle: DataBundle, split: str) -> TensorMTLDataset:
    data = bundle.split(split)
    assert isinstance(data, TensorMTLDataset)
    return data


def test_source_matches_rivers_reader(reference: list[Any]) -> None:
    features, counts, strongest = sf.load_source()
    assert len(reference) == sf.ROWS == 1066
    assert features.shape == (1066, 30) and features.dtype == np.float32
    # every attribute: exactly one indicator set, the one of river's value
    start = 0
    for name, levels in sf.LEVELS.items():
        block = features[:, start : start + len(levels)]
        assert (block.sum(axis=1) == 1).all()
        values = [str(x[name]) for x, _ in reference]
        assert [levels[i] for i in block.argmax(axis=1)] == values
        start += len(levels)
    assert {x["largest-spot-area"] for x, _ in reference} == {1}  # the dropped constant
    for task, column in zip(sf.TARGETS, TARGET_COLUMNS, strict=True):
        assert counts[task].tolist() == [float(y[column]) for _, y in reference]
    assert {t: int((c > 0).sum()) for t, c in counts.items()} == {
        "c_class": 182,
        "m_class": 36,
        "x_class": 5,
    }
    expected = [
        3 if y["x-class-flares"] else 2 if y["m-class-flares"] else 1 if y["c-class-flares"] else 0
        for _, y in reference
    ]
    assert strongest.tolist() == expected
    assert np.bincount(strongest).tolist() == [865, 163, 33, 5]


def test_bundle_tasks_and_shapes(bundle: DataBundle) -> None:
    assert DATASETS.get("solarflare") is sf.solarflare
    assert bundle.input_shape == (30,)
    assert not bundle.multi_input
    assert list(bundle.tasks) == ["c_class", "m_class", "x_class"]
    for task in bundle.tasks.values():
        assert isinstance(task.loss, MSELoss)
        assert task.metrics == {"regression": RegressionMetric}
        assert task.output_dim == 1 and task.postprocess is None
    sample = bundle.train[0]
    assert sample["input"].shape == (30,)
    assert {t: v.shape for t, v in sample["targets"].items()} == dict.fromkeys(
        bundle.tasks, torch.Size([1])
    )
    assert bundle.info["sizes"] == {"train": 638, "val": 214, "test": 214}


def test_splits_are_disjoint_cover_every_row_and_are_stratified(bundle: DataBundle) -> None:
    features, counts, strongest = sf.load_source()
    indices = {split: np.asarray(bundle.info["indices"][split]) for split in SPLITS}
    every = np.concatenate(list(indices.values()))
    assert sorted(every.tolist()) == list(range(1066))
    for split in SPLITS:
        data = tensor_split(bundle, split)
        rows = indices[split]
        assert torch.equal(data.inputs, torch.from_numpy(features[rows]))
        for task in sf.TARGETS:
            assert data.targets[task][:, 0].tolist() == counts[task][rows].tolist()
    # val and test hold round(20 %) of every stratum (strongest flare class), X included
    per_class = np.bincount(strongest)
    for split in ("val", "test"):
        found = np.bincount(strongest[indices[split]], minlength=4)
        assert found.tolist() == [round(0.2 * n) for n in per_class]


def test_seed_determines_the_split() -> None:
    a, b, c = sf.solarflare(seed=3), sf.solarflare(seed=3), sf.solarflare(seed=4)
    assert a.info["indices"] == b.info["indices"]
    assert a.info["indices"]["test"] != c.info["indices"]["test"]
    assert torch.equal(tensor_split(a, "train").inputs, tensor_split(b, "train").inputs)


def test_fractions_option() -> None:
    built = sf.solarflare(val_fraction=0.1, test_fraction=0.3)
    assert built.info["sizes"] == {"train": 640, "val": 105, "test": 321}


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"seed": -1}, "`seed`"),
        ({"val_fraction": 0.0}, "`val_fraction`"),
        ({"test_fraction": True}, "`test_fraction`"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "below 1"),
    ],
)
def test_bad_options(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        sf.solarflare(**options)


def _without(package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == package else real(name, *args, **kwargs)

    monkeypatch.setattr(tabular.importlib.util, "find_spec", find_spec)


def test_missing_river_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _without("river", monkeypatch)
    with pytest.raises(DataError, match=r"pip install 'polytask\[data\]'") as info:
        sf.solarflare()
    assert "'river'" in str(info.value)


def test_missing_river_through_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _without("river", monkeypatch)
    code, _, err = cli(capsys, "train", RECIPE, f"output_dir={tmp_path / 'runs'}")
    assert_error(code, err, "'river'", "pip install 'polytask[data]'", whole=True)
    assert not (tmp_path / "runs").exists()


def _rewrite(tmp_path: Path, edit: Any) -> Path:
    """A copy of river's archive with its CSV text edited."""
    original = tabular.package_file("river", "datasets/solar-flare.csv.zip", "test")
    with zipfile.ZipFile(original) as archive:
        (name,) = archive.namelist()
        text = archive.read(name).decode()
    path = tmp_path / "solar-flare.csv.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(name, edit(text))
    return path


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t: t.replace("\nH,A,X,1,3,1,1,1,1,1,0,0,0", "", 1), "1066 rows"),
        (lambda t: t.replace("zurich-class", "zurich"), "columns"),
        (lambda t: t.replace("\nH,A,X,", "\nQ,A,X,", 1), "levels"),
        (lambda t: t.replace(",1,0,0,0\n", ",1,1,0,0\n", 1), "SHA-256"),
        (lambda t: t.replace(",1,0,0,0\n", ",1,x,0,0\n", 1), "integer flare counts"),
    ],
)
def test_altered_file_is_a_data_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, edit: Any, fragment: str
) -> None:
    path = _rewrite(tmp_path, edit)
    monkeypatch.setattr(sf, "package_file", lambda *args: path)
    with pytest.raises(DataError, match=fragment) as info:
        sf.load_source()
    assert "Reinstall river" in str(info.value)


def test_damaged_archive_is_a_data_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "solar-flare.csv.zip"
    path.write_bytes(b"not a zip file")
    monkeypatch.setattr(sf, "package_file", lambda *args: path)
    with pytest.raises(DataError, match="Could not read"):
        sf.load_source()


def test_docstring_example() -> None:
    assert doctest.testmod(sf, raise_on_error=True).attempted >= 1
