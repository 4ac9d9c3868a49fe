"""Accuracy and RegressionMetric against scikit-learn, and on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, mean_absolute_error, mean_squared_error, recall_score

from polytask.metrics import Accuracy, RegressionMetric


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("as_indices", [False, True])
def test_accuracy_matches_sklearn(seed: int, as_indices: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    metric = Accuracy()
    preds, targets = [], []
    for b in (4, 7, 1, 5):
        logits = torch.randn(b, 5, generator=gen)
        target = torch.randint(0, 5, (b,), generator=gen)
        metric.update(logits.argmax(1) if as_indices else logits, target)
        preds.append(logits.argmax(1).numpy())
        targets.append(target.numpy())
    expected = 100 * accuracy_score(np.concatenate(targets), np.concatenate(preds))
    assert metric.compute()["accuracy"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_accuracy_matches_sklearn_recall_and_merges(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    whole, parts = Accuracy(num_classes=6), [Accuracy(num_classes=6), Accuracy(num_classes=6)]
    preds, targets = [], []
    for i, b in enumerate((4, 7, 1, 5, 9)):
        logits = torch.randn(b, 6, generator=gen)
        target = torch.randint(0, 5, (b,), generator=gen)  # class 5 never occurs
        whole.update(logits, target)
        parts[i % 2].update(logits, target)
        preds.append(logits.argmax(1).numpy())
        targets.append(target.numpy())
    y_true, y_pred = np.concatenate(targets), np.concatenate(preds)
    recall = 100 * recall_score(
        y_true, y_pred, labels=list(range(5)), average=None, zero_division=0
    )
    parts[0].merge(parts[1])
    for metric in (whole, parts[0]):
        details = metric.details()
        assert details["class_accuracy"][:5] == pytest.approx(list(recall), rel=1e-12)
        assert details["class_accuracy"][5] is None  # no sample of class 5
        assert details["samples"] == [float((y_true == c).sum()) for c in range(6)]
        assert metric.compute()["accuracy"] == pytest.approx(100 * accuracy_score(y_true, y_pred))


def test_per_class_accuracy_refuses_classes_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"0 \.\. 2"):
        Accuracy(num_classes=3).update(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="positive integer"):
        Accuracy(num_classes=0)
    assert Accuracy().details() == {}


def test_accuracy_hand_computed_example() -> None:
    # argmax of the rows: 1, 0, 1 against targets 1, 1, 1 -> 2 of 3 correct = 66.67%.
    metric = Accuracy()
    metric.update(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]))
    assert metric.compute() == pytest.approx({"accuracy": 200 / 3})
    assert metric.higher_is_better == {"accuracy": True}


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.randn(3, 2), torch.zeros(4, dtype=torch.long), r"\(4, C\)"),
        (torch.randn(3), torch.zeros(3, dtype=torch.long), "integer class indices"),
        (torch.randn(3, 2), torch.zeros(3, 1, dtype=torch.long), r"\[B\]"),
    ],
)
def test_accuracy_bad_inputs(pred: torch.Tensor, target: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Accuracy().update(pred, target)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1,), (), (4,)])
def test_regression_matches_sklearn(seed: int, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(seed)
    metric = RegressionMetric()
    preds, targets = [], []
    for b in (4, 7, 1, 5):
        pred = torch.randn(b, *shape, generator=gen)
        target = torch.randn(b, *shape, generator=gen) * 2
        if shape == (1,):
            target = target[:, 0]  # [B, 1] against [B]: the trailing singleton is squeezed
        metric.update(pred, target)
        preds.append(pred.numpy().reshape(b, -1).astype(np.float64))
        targets.append(target.numpy().reshape(b, -1).astype(np.float64))
    p, t = np.concatenate(preds).ravel(), np.concatenate(targets).ravel()
    values = metric.compute()
    assert values["mae"] == pytest.approx(mean_absolute_error(t, p), rel=1e-12)
    assert values["rmse"] == pytest.approx(math.sqrt(mean_squared_error(t, p)), rel=1e-12)


def test_regression_hand_computed_example() -> None:
    # errors 1-1 = 0, 2-4 = -2, 4-1 = 3: mae = 5/3, rmse = sqrt((0 + 4 + 9)/3) = sqrt(13/3).
    metric = RegressionMetric()
    metric.update(torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 4.0, 1.0]))
    assert metric.compute() == pytest.approx({"mae": 5 / 3, "rmse": math.sqrt(13 / 3)})
    assert metric.higher_is_better == {"mae": False, "rmse": False}


def test_regression_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"found pred \(3, 2\) and target \(3,\)"):
        RegressionMetric().update(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"found pred \(3, 2, 3\) and target \(3, 3, 2\)"):
        RegressionMetric().update(torch.zeros(3, 2, 3), torch.zeros(3, 3, 2))
