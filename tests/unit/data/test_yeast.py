"""Yeast: the file river ships, the labels as tasks, the splits and the errors."""

from __future__ import annotations

import doctest
import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import polytask.data._tabular as tabular
import polytask.data.yeast as ye
from helpers import assert_error, cli
from polytask.data import DATASETS, SPLITS, DataBundle, TensorMTLDataset
from polytask.errors import ConfigError, DataError
from polytask.losses import BCEWithLogitsLoss
from polytask.metrics import MultiLabelMetric

RECIPE = Path(__file__).resolve().parents[3] / "configs" / "tabular" / "yeast.yaml"


@pytest.fixture(scope="module")
def reference() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The rows as river's own reader gives them, independent of polytask's reading."""
    from river import datasets

    return list(datasets.Yeast())


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    built: DataBundle = ye.yeast()
    return built


def tensor_split(bundle: DataBundle, split: str) -> TensorMTLDataset:
    data = bundle.split(split)
    assert isinstance(data, TensorMTLDataset)
    return data


def test_source_matches_rivers_reader(reference: list[Any]) -> None:
    features, labels = ye.load_source()
    assert len(reference) == ye.ROWS == 2417
    assert features.shape == (2417, 103) and features.dtype == np.float32
    assert labels.shape == (2417, 14) and set(np.unique(labels)) == {0, 1}
    expected_x = np.asarray([[x[f] for f in ye.FEATURES] for x, _ in reference], np.float32)
    expected_y = np.asarray([[y[c] for c in ye.COLUMNS] for _, y in reference], np.int64)
    assert np.array_equal(features, expected_x)
    assert np.array_equal(labels, expected_y)
    # the published statistics of Yeast: label cardinality 4.237, 1 to 11 labels per gene
    assert labels.sum(axis=1).mean() == pytest.approx(4.237, abs=5e-4)
    assert labels.sum(axis=1).min() == 1 and labels.sum(axis=1).max() == 11
    assert labels.sum(axis=0)[-1] == 34  # class14, the rarest


def test_bundle_tasks_shapes_and_standardisation(bundle: DataBundle) -> None:
    assert DATASETS.get("yeast") is ye.yeast
    assert bundle.input_shape == (103,)
    assert list(bundle.tasks) == list(ye.LABELS)
    train = tensor_split(bundle, "train")
    mean = train.inputs.double().mean(dim=0)
    std = train.inputs.double().std(dim=0, unbiased=False)
    assert torch.allclose(mean, torch.zeros(103, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(std, torch.ones(103, dtype=torch.float64), atol=1e-5)
    _, labels = ye.load_source()
    rows = np.asarray(bundle.info["indices"]["train"])
    for i, (name, task) in enumerate(bundle.tasks.items()):
        assert task.kind == "multilabel" and task.output_dim == 1
        assert task.extra["columns"] == [i]
        metric = task.make_metrics()["multilabel"]
        assert isinstance(metric, MultiLabelMetric)
        assert list(metric.higher_is_better) == ["f1", "roc_auc"]
        # balanced positive weight: the training split's negatives over its positives
        positives = int(labels[rows, i].sum())
        assert isinstance(task.loss, BCEWithLogitsLoss)
        assert task.loss.pos_weight == pytest.approx(((len(rows) - positives) / positives,))
        assert torch.equal(train.targets[name][:, 0], torch.from_numpy(labels[rows, i]).float())
    sample = bundle.train[0]
    assert {t: v.shape for t, v in sample["targets"].items()} == dict.fromkeys(
        bundle.tasks, torch.Size([1])
    )


def test_splits_are_disjoint_cover_every_row_and_spread_the_rare_label(
    bundle: DataBundle,
) -> None:
    _, labels = ye.load_source()
    indices = {split: np.asarray(bundle.info["indices"][split]) for split in SPLITS}
    assert sorted(np.concatenate(list(indices.values())).tolist()) == list(range(2417))
    assert bundle.info["sizes"] == {split: len(indices[split]) for split in SPLITS}
    # every label has positives in every split; class14's 34 genes about 60 / 20 / 20
    for split in SPLITS:
        assert labels[indices[split]].sum(axis=0).min() > 0
    assert [int(labels[indices[s], 13].sum()) for s in SPLITS] == [20, 7, 7]


def test_one_multilabel_task_and_named_groups() -> None:
    _, labels = ye.load_source()
    whole = ye.yeast(label_groups="all", pos_weight="none")
    (task,) = whole.tasks.values()
    assert task.name == "labels" and task.output_dim == 14
    assert isinstance(task.loss, BCEWithLogitsLoss) and task.loss.pos_weight is None
    rows = np.asarray(whole.info["indices"]["test"])
    assert torch.equal(
        tensor_split(whole, "test").targets["labels"], torch.from_numpy(labels[rows]).float()
    )
    groups = {"rare": ["class14", "class9"], "common": ["class12", "class13"]}
    grouped = ye.yeast(label_groups=groups, metrics=["f1_micro", "hamming_loss"])
    assert list(grouped.tasks) == ["rare", "common"]
    assert grouped.tasks["rare"].extra["columns"] == [13, 8]
    assert grouped.info["label_groups"] == groups
    rare = tensor_split(grouped, "val").targets["rare"]
    rows = np.asarray(grouped.info["indices"]["val"])
    assert torch.equal(rare, torch.from_numpy(labels[rows][:, [13, 8]]).float())
    metric = grouped.tasks["common"].make_metrics()["multilabel"]
    assert metric.higher_is_better == {"f1_micro": True, "hamming_loss": False}


def test_seed_determines_the_split() -> None:
    a, b, c = ye.yeast(seed=3), ye.yeast(seed=3), ye.yeast(seed=4)
    assert a.info["indices"] == b.info["indices"]
    assert a.info["indices"]["test"] != c.info["indices"]["test"]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"seed": -1}, "`seed`"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "below 1"),
        ({"label_groups": "some"}, "'each'"),
        ({"label_groups": {"a": ["class1", "class99"]}}, "unknown label 'class99'"),
        ({"label_groups": {"a": ["class1"], "b": ["class1"]}}, "in two label groups"),
        ({"label_groups": {"a": []}}, "non-empty list"),
        ({"pos_weight": "auto"}, "`pos_weight`"),
        ({"metrics": ["f1", "auc"]}, "auc"),
        ({"metrics": "f1"}, "`metrics`"),
        ({"label_groups": {"bad.name": ["class1"]}}, "task name"),
    ],
)
def test_bad_options(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        ye.yeast(**options)


def test_bad_option_through_the_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = cli(
        capsys,
        "train",
        RECIPE,
        f"output_dir={tmp_path / 'runs'}",
        "data.options.label_groups={a: [class1, nope]}",
    )
    assert_error(code, err, "unknown label 'nope'")
    assert not (tmp_path / "runs").exists()


def _rewritten(tmp_path: Path, edit: Any) -> Path:
    original = tabular.package_file("river", "datasets/yeast.csv.gz", "test")
    text = gzip.decompress(original.read_bytes()).decode()
    path = tmp_path / "yeast.csv.gz"
    path.write_bytes(gzip.compress(edit(text).encode()))
    return path


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t: t.rsplit("\n", 2)[0] + "\n", "2417 rows"),
        (lambda t: t.replace("Class14", "Class15", 1), "columns"),
        (lambda t: t.replace(",0,0\n", ",0,2\n", 1), "labels 0 or 1"),
        (lambda t: t.replace(",0,0\n", ",0,1\n", 1), "SHA-256"),
    ],
)
def test_altered_file_is_a_data_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, edit: Any, fragment: str
) -> None:
    path = _rewritten(tmp_path, edit)
    monkeypatch.setattr(ye, "package_file", lambda *args: path)
    with pytest.raises(DataError, match=fragment) as info:
        ye.load_source()
    assert "Reinstall river" in str(info.value)


def test_damaged_archive_is_a_data_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "yeast.csv.gz"
    path.write_bytes(b"not gzip")
    monkeypatch.setattr(ye, "package_file", lambda *args: path)
    with pytest.raises(DataError, match="Could not read"):
        ye.load_source()


def test_docstring_example() -> None:
    assert doctest.testmod(ye, raise_on_error=True).attempted >= 1
