"""Chance level: what a constant predictor scores, checked against hand computations, its
record in results.json, and the grid's warning for cells at chance."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.utils.data import Dataset

from helpers import tiny_config_dict
from polytask.compare import CHANCE_MARGIN, chance_warnings, summarize_grid
from polytask.config import Config, from_dict
from polytask.data import TensorMTLDataset
from polytask.evaluation import chance_level, chance_values, collect_targets, tensor_targets
from polytask.losses import CrossEntropyLoss, MSELoss
from polytask.metrics import Accuracy, RegressionMetric, SegmentationMetric
from polytask.tasks import Task
from polytask.training.build import build_components
from polytask.training.rundir import RunDirectory
from polytask.training.trainer import Trainer

TASKS = {
    "label": Task(
        "label", CrossEntropyLoss(), {"accuracy": partial(Accuracy, 3)}, 3, kind="classification"
    ),
    "score": Task("score", MSELoss(), {"regression": RegressionMetric}, 1, kind="regression"),
    "seg": Task(
        "seg", CrossEntropyLoss(), {"seg": partial(SegmentationMetric, 3)}, 3, kind="segmentation"
    ),
}

# train: label majority 1 (3 of 5 labelled; the unlabelled sample's 2s do not count), score
# mean 2.0
TRAIN = TensorMTLDataset(
    torch.zeros(6, 2),
    {
        "label": torch.tensor([0, 1, 1, 2, 1, 2]),
        "score": torch.tensor([[1.0], [2.0], [3.0], [0.0], [4.0], [2.0]]),
        "seg": torch.zeros(6, 4, dtype=torch.long),
    },
    mask={"label": torch.tensor([True, True, True, True, True, False])},
)
# test: labels 1, 0, 0, 2 (majority 0 here), scores 0, 2, 5, 1 (mean 2.0)
TEST = TensorMTLDataset(
    torch.zeros(4, 2),
    {
        "label": torch.tensor([1, 0, 0, 2]),
        "score": torch.tensor([[0.0], [2.0], [5.0], [1.0]]),
        "seg": torch.zeros(4, 4, dtype=torch.long),
    },
)


def test_constant_predictor_from_the_training_split() -> None:
    values, source = chance_level(TASKS, TEST, reference=TRAIN, batch_size=2)
    # majority class of train (1) on the test labels: 1 of 4 right
    assert values["label"] == {"accuracy": pytest.approx(25.0)}
    # the train mean (1 + 2 + 3 + 0 + 4 + 2) / 6 = 2 against the test scores 0, 2, 5, 1
    errors = [2.0, 0.0, 3.0, 1.0]
    assert values["score"]["mae"] == pytest.approx(sum(errors) / 4)
    assert values["score"]["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 4))
    assert "seg" not in values  # segmentation: no constant predictor
    assert source == {"label": "train", "score": "train"}


def test_constant_predictor_from_the_evaluated_split() -> None:
    values, source = chance_level(TASKS, TEST, batch_size=2)
    assert values["label"] == {"accuracy": pytest.approx(50.0)}  # test majority 0: 2 of 4
    assert source == {"label": "evaluated", "score": "evaluated"}


class _Plain(Dataset[dict[str, Any]]):
    """The test split without TensorMTLDataset: its targets must be read batch by batch."""

    def __len__(self) -> int:
        return len(TEST)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return TEST[i]


def test_targets_of_other_data_sets_are_collected_by_a_pass() -> None:
    assert tensor_targets(_Plain(), TASKS) == {}  # type: ignore[arg-type]
    collected = collect_targets(_Plain(), TASKS, batch_size=3)  # type: ignore[arg-type]
    assert torch.equal(collected["label"], TEST.targets["label"])
    assert torch.equal(collected["score"], TEST.targets["score"])
    values, source = chance_level(TASKS, _Plain(), reference=TRAIN, batch_size=3)  # type: ignore[arg-type]
    assert values["label"]["accuracy"] == pytest.approx(25.0)
    assert source["label"] == "train"


def test_masked_test_samples_are_left_out() -> None:
    test = TensorMTLDataset(
        torch.zeros(4, 1),
        {"label": torch.tensor([1, 0, 0, 2])},
        mask={"label": torch.tensor([True, False, False, True])},
    )
    values, _ = chance_level({"label": TASKS["label"]}, test, reference=TRAIN, batch_size=4)
    assert values["label"]["accuracy"] == pytest.approx(50.0)  # class 1 on labels 1, 2


def test_multilabel_prevalence() -> None:
    multilabel = pytest.importorskip("polytask.metrics.multilabel")
    task = Task(
        "tags",
        MSELoss(),
        {"ml": partial(multilabel.MultiLabelMetric, ("hamming_loss", "subset_accuracy", "f1"))},
        2,
        kind="multilabel",
    )
    # train prevalences 0.75 and 0.25: the constant predicts label 0 on, label 1 off
    reference = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    values = chance_values({"tags": task}, {"tags": target}, {"tags": reference})["tags"]
    # wrong entries: (1, 0) and (2, 1) of 6; right rows: 0 only
    assert values["hamming_loss"] == pytest.approx(100 * 2 / 6)
    assert values["subset_accuracy"] == pytest.approx(100 / 3)
    # label 0: TP 2, FP 1, FN 0 -> F1 0.8; label 1: TP 0, FP 0, FN 1 -> 0
    assert values["f1"] == pytest.approx(100 * 0.8 / 2)


def test_the_trainer_records_the_chance_level(tmp_path: Path) -> None:
    data = tiny_config_dict(tmp_path, **{"train.epochs": 1})
    config = from_dict(Config, data)
    components = build_components(config)
    run = RunDirectory.create(tmp_path / "run", data)
    results = Trainer(components, run, console=False).fit()
    train, test = components.bundle.train, components.bundle.test
    assert isinstance(train, TensorMTLDataset) and isinstance(test, TensorMTLDataset)
    for task in ("left", "right"):
        majority = int(torch.bincount(train.targets[task]).argmax())
        hand = 100.0 * float((test.targets[task] == majority).float().mean())
        assert results["chance"][task]["accuracy"] == pytest.approx(hand)
        assert results["chance_from"][task] == "train"
    saved = json.loads(run.results_path.read_text(encoding="utf-8"))
    assert saved["chance"] == results["chance"]


# -- the grid's warning --------------------------------------------------------------------


def _results(acc: float, mae: float, *, chance: bool = True) -> dict[str, Any]:
    results: dict[str, Any] = {
        "higher_is_better": {"a": {"accuracy": True}, "r": {"mae": False, "rmse": False}},
        "test": {"metrics": {"a": {"accuracy": acc}, "r": {"mae": mae, "rmse": mae * 1.2}}},
        "train_time_s": 1.0,
        "parameters": {"shared": 10},
    }
    if chance:
        results["chance"] = {"a": {"accuracy": 20.0}, "r": {"mae": 10.0, "rmse": 12.0}}
    return results


def test_warning_fires_for_a_cell_at_chance_and_not_for_a_good_one() -> None:
    runs = {
        # accuracy 21 ± 0.71 against 20: within max(2 x 0.71, 5 % of 20 = 1); MAE 5: good
        "bad": [_results(20.5, 5.0), _results(21.5, 5.0)],
        # 21.5 ± 0.71: better by 1.5, more than max(1.41, 1)
        "fair": [_results(21.0, 5.0), _results(22.0, 5.0)],
        # 30 ± 1.4 against 20: better by far more than max(2.8, 1)
        "good": [_results(29.0, 5.0), _results(31.0, 5.0)],
        # 26 ± 4.2: better by 6, but the seeds spread by more (2 x 4.2 = 8.5): noise
        "noisy": [_results(23.0, 5.0), _results(29.0, 5.0)],
    }
    warnings = chance_warnings(runs)
    assert [(w["cell"], w["task"]) for w in warnings] == [("bad", "a"), ("noisy", "a")]
    first = warnings[0]
    assert first["values"]["accuracy"]["chance"] == 20.0
    assert first["values"]["accuracy"]["margin"] == pytest.approx(2 * math.sqrt(0.5))
    assert first["text"].startswith("cell 'bad' is at chance level on task 'a': accuracy")
    assert "(2 seeds)" in first["text"]


def test_the_margin_with_one_seed_and_lower_is_better_values() -> None:
    at = 20.0 * (1 + CHANCE_MARGIN)  # exactly at the margin: still at chance
    runs = {
        "edge": [_results(at, 5.0)],
        "past": [_results(at + 0.1, 5.0)],
        # MAE 9.8 and RMSE 11.76 against 10 and 12: neither better by 5 %
        "mae": [_results(90.0, 9.8)],
        # MAE 9.4 is better than 10 by more than 0.5: a task is at chance only on every value
        "mae_ok": [_results(90.0, 9.4)],
    }
    found = [(w["cell"], w["task"]) for w in chance_warnings(runs)]
    assert found == [("edge", "a"), ("mae", "r")]


def test_runs_without_a_chance_record_give_no_warning() -> None:
    assert chance_warnings({"old": [_results(20.0, 10.0, chance=False)]}) == []
    # a cell with old and new runs is judged on the runs that have it
    mixed = chance_warnings({"x": [_results(20.0, 5.0, chance=False), _results(20.0, 5.0)]})
    assert [(w["cell"], w["task"], w["seeds"]) for w in mixed] == [("x", "a", 1)]


def test_summarize_grid_warns_and_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "g"
    grid.mkdir()
    spec = {"name": "g", "seeds": [0, 1], "baseline": "stl", "cells": {"stl": {}, "hps": {}}}
    (grid / "grid.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    values = {"stl": [(20.5, 5.0), (20.0, 5.0)], "hps": [(40.0, 5.0), (41.0, 5.0)]}
    for cell, seeds in values.items():
        for seed, (acc, mae) in enumerate(seeds):
            run = grid / cell / f"seed-{seed}"
            run.mkdir(parents=True)
            (run / "results.json").write_text(json.dumps(_results(acc, mae)), encoding="utf-8")
    summary = summarize_grid(grid)
    err = capsys.readouterr().err
    assert "polytask: warning: cell 'stl' is at chance level on task 'a'" in err
    assert "'hps'" not in err
    assert [(w["cell"], w["task"]) for w in summary["chance_warnings"]] == [("stl", "a")]
    markdown = (grid / "results.md").read_text(encoding="utf-8")
    assert "**At chance level.** Cell 'stl' is at chance level on task 'a'" in markdown
    assert "hps' is at chance" not in markdown
    assert "at chance level on task" in (grid / "report.html").read_text(encoding="utf-8")
    # an old grid (runs without `chance`) summarises as before, without a warning
    for run in grid.glob("*/seed-*/results.json"):
        data = json.loads(run.read_text(encoding="utf-8"))
        del data["chance"]
        run.write_text(json.dumps(data), encoding="utf-8")
    summary = summarize_grid(grid)
    assert summary["chance_warnings"] == [] and summary["chance_note"] is None
    assert "warning" not in capsys.readouterr().err
