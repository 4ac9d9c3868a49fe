"""Palmer penguins: the file palmerpenguins ships, missing values, features, the standardised
body mass and its evaluation in grams, the splits and the errors."""

from __future__ import annotations

import doctest
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import polytask.data._tabular as tabular
import polytask.data.penguins as pg
from helpers import assert_error, cli
from polytask.data import DATASETS, SPLITS, DataBundle, TensorMTLDataset
from polytask.errors import ConfigError, DataError
from polytask.evaluation import evaluate
from polytask.losses import MSELoss
from polytask.metrics.regression import RegressionMetric

RECIPE = Path(__file__).resolve().parents[3] / "configs" / "tabular" / "penguins.yaml"


@pytest.fixture(scope="module")
def reference() -> Any:
    """The table as palmerpenguins' own loader (pandas) gives it."""
    from palmerpenguins import load_penguins

    return load_penguins()


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    built: DataBundle = pg.penguins()
    return built


def tensor_split(bundle: DataBundle, split: str) -> TensorMTLDataset:
    data = bundle.split(split)
    assert isinstance(data, TensorMTLDataset)
    return data


def test_source_matches_the_packages_loader(reference: Any) -> None:
    assert len(reference) == 344
    assert reference["species"].value_counts().to_dict() == {
        "Adelie": 152,
        "Gentoo": 124,
        "Chinstrap": 68,
    }
    complete = reference.dropna()
    assert len(reference) - len(complete) == pg.DROPPED == 11
    source = pg.load_source()
    assert len(source["species"]) == 333
    assert np.bincount(source["species"]).tolist() == [146, 68, 119]
    assert np.bincount(source["sex"]).tolist() == [165, 168]
    assert [pg.SPECIES[i] for i in source["species"]] == complete["species"].tolist()
    assert [pg.SEXES[i] for i in source["sex"]] == complete["sex"].tolist()
    assert source["island"] == complete["island"].tolist()
    assert source["body_mass_g"].tolist() == complete["body_mass_g"].tolist()
    for name in pg.MEASUREMENTS:
        assert source[name].tolist() == complete[name].tolist()


def test_bundle_tasks_and_features(bundle: DataBundle) -> None:
    assert DATASETS.get("penguins") is pg.penguins
    assert bundle.input_shape == (6,)
    assert list(bundle.tasks) == ["species", "sex", "body_mass"]
    assert bundle.tasks["species"].output_dim == 3
    assert bundle.tasks["sex"].output_dim == 2
    assert bundle.tasks["body_mass"].metrics == {"regression": RegressionMetric}
    assert bundle.info["sizes"] == {"train": 197, "val": 68, "test": 68}
    source = pg.load_source()
    train = np.asarray(bundle.info["indices"]["train"])
    every = torch.cat([tensor_split(bundle, s).inputs for s in SPLITS])
    rows = np.concatenate([bundle.info["indices"][s] for s in SPLITS])
    for j, name in enumerate(pg.MEASUREMENTS):
        mean, std = source[name][train].mean(), source[name][train].std()
        expected = (source[name][rows] - mean) / std
        assert np.allclose(every[:, j].numpy(), expected, atol=1e-5)
    # standardised on train: mean 0, population std 1 there
    inputs = tensor_split(bundle, "train").inputs[:, :3].double()
    assert torch.allclose(inputs.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(
        inputs.std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-6
    )
    islands = every[:, 3:]
    assert (islands.sum(1) == 1).all()
    assert [pg.ISLANDS[i] for i in islands.argmax(1)] == [source["island"][r] for r in rows]


def test_splits_are_disjoint_stratified_and_seeded(bundle: DataBundle) -> None:
    source = pg.load_source()
    indices = {s: np.asarray(bundle.info["indices"][s]) for s in SPLITS}
    assert sorted(np.concatenate(list(indices.values())).tolist()) == list(range(333))
    strata = source["species"] * 2 + source["sex"]
    for split in ("val", "test"):
        found = np.bincount(strata[indices[split]], minlength=6)
        assert found.tolist() == [round(0.2 * n) for n in np.bincount(strata)]
        data = tensor_split(bundle, split)
        assert data.targets["species"].tolist() == source["species"][indices[split]].tolist()
        assert data.targets["sex"].tolist() == source["sex"][indices[split]].tolist()
    again, other = pg.penguins(seed=0), pg.penguins(seed=1)
    assert again.info["indices"] == bundle.info["indices"]
    assert other.info["indices"]["test"] != bundle.info["indices"]["test"]
    assert torch.equal(tensor_split(again, "test").inputs, tensor_split(bundle, "test").inputs)


def test_body_mass_is_learnt_standardised_and_evaluated_in_grams(bundle: DataBundle) -> None:
    task = bundle.tasks["body_mass"]
    source = pg.load_source()
    train = bundle.info["indices"]["train"]
    grams = source["body_mass_g"][train].astype(np.float64)
    mean, std = grams.mean(), grams.std()
    assert (task.extra["mean"], task.extra["std"]) == (mean, std)
    # the targets are the file's grams, untouched
    test = tensor_split(bundle, "test")
    expected = source["body_mass_g"][bundle.info["indices"]["test"]]
    assert test.targets["body_mass"][:, 0].tolist() == expected.tolist()
    # the loss compares a standard-unit prediction with the standardised target
    target = test.targets["body_mass"]
    standard = (target.double() - mean) / std
    pred = standard.float() + 0.5
    assert task.compute_loss(pred, target).item() == pytest.approx(0.25, abs=1e-5)
    assert task.compute_loss(standard.float(), target).item() == pytest.approx(0.0, abs=1e-10)
    # the metric sees the prediction in grams: a perfect prediction has zero error in grams
    # and a prediction off by 0.5 standard units is off by 0.5 * std grams
    for offset, mae in ((0.0, 0.0), (0.5, 0.5 * std)):
        metric = RegressionMetric()
        metric.update(task.prepare(standard + offset), target)
        values = metric.compute()
        assert values["mae"] == pytest.approx(mae, abs=1e-9)
        assert values["rmse"] == pytest.approx(mae, abs=1e-9)
    assert isinstance(task.loss, tabular.StandardizedLoss)
    assert isinstance(task.loss.base, MSELoss)


def test_evaluation_reports_grams(bundle: DataBundle) -> None:
    """Through the evaluation loop: a model that predicts the training mean (0 in standard
    units) has the MAE of the training mean in grams."""

    class Constant(torch.nn.Module):
        task_names = ("species", "sex", "body_mass")

        def forward(self, x: torch.Tensor, task: str | None = None) -> dict[str, torch.Tensor]:
            n = x.shape[0]
            return {
                "species": torch.zeros(n, 3),
                "sex": torch.zeros(n, 2),
                "body_mass": torch.zeros(n, 1),
            }

    test = tensor_split(bundle, "test")
    result = evaluate(Constant(), bundle.tasks, test, batch_size=16, device=torch.device("cpu"))  # type: ignore[arg-type]
    grams = test.targets["body_mass"].double()
    expected = (grams - bundle.tasks["body_mass"].extra["mean"]).abs().mean().item()
    assert result.metrics["body_mass"]["mae"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [({"seed": 1.5}, "`seed`"), ({"test_fraction": 1.0}, "`test_fraction`")],
)
def test_bad_options(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        pg.penguins(**options)


def _without(package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == package else real(name, *args, **kwargs)

    monkeypatch.setattr(tabular.importlib.util, "find_spec", find_spec)


def test_missing_package_is_a_data_error_and_one_cli_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _without("palmerpenguins", monkeypatch)
    with pytest.raises(DataError, match=r"pip install 'polytask\[data\]'"):
        pg.penguins()
    code, _, err = cli(capsys, "train", RECIPE, f"output_dir={tmp_path / 'runs'}")
    assert_error(code, err, "'palmerpenguins'", "pip install 'polytask[data]'", whole=True)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t: t.replace("species,island", "kind,island", 1), "columns"),
        (lambda t: t.replace("\nAdelie,", "\nGentoo,", 1), "species"),
        (lambda t: t.replace(",3750,male,", ",3751,male,", 1), "SHA-256"),
        (lambda t: t.replace(",3750,male,", ",3750,NA,", 1), "missing values"),
        (lambda t: t.rsplit("\n", 2)[0] + "\n", "344 rows"),
    ],
)
def test_altered_file_is_a_data_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, edit: Any, fragment: str
) -> None:
    original = tabular.package_file("palmerpenguins", "data/penguins.csv", "test")
    path = tmp_path / "penguins.csv"
    path.write_text(edit(original.read_text(encoding="utf-8")), encoding="utf-8")
    if fragment == "missing values":  # a file with a valid checksum but one more NA
        monkeypatch.setattr(pg, "SOURCE_SHA256", tabular.sha256_of_rows(_rows(path)))
    monkeypatch.setattr(pg, "package_file", lambda *args: path)
    with pytest.raises(DataError, match=fragment) as info:
        pg.load_source()
    assert "Reinstall palmerpenguins" in str(info.value)


def _rows(path: Path) -> list[list[str]]:
    import csv

    with path.open(newline="", encoding="utf-8") as handle:
        return [row for row in csv.reader(handle) if row]


def test_docstring_example() -> None:
    assert doctest.testmod(pg, raise_on_error=True).attempted >= 1
