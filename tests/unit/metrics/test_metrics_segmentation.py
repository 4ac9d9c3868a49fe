"""SegmentationMetric against scikit-learn, and on a hand-computed example."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, jaccard_score

from polytask.errors import ConfigError
from polytask.metrics import SegmentationMetric


def reference(targets: list[np.ndarray], preds: list[np.ndarray], c: int) -> dict[str, Any]:
    """sklearn over every valid pixel of the split, concatenated."""
    t = np.concatenate([x.ravel() for x in targets])
    p = np.concatenate([x.ravel() for x in preds])
    keep = (t >= 0) & (t < c)
    t, p = t[keep], p[keep]
    labels = list(range(c))
    present = np.isin(labels, np.concatenate([t, p]))
    iou = jaccard_score(t, p, labels=labels, average=None, zero_division=0)
    return {
        "confusion": confusion_matrix(t, p, labels=labels),
        "iou": np.where(present, 100 * iou, np.nan),
        "miou": 100 * float(np.mean(iou[present])),
        "pixel_acc": 100 * accuracy_score(t, p),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("as_indices", [False, True])
def test_matches_sklearn_over_several_batches(seed: int, as_indices: bool) -> None:
    c = 6
    gen = torch.Generator().manual_seed(seed)
    metric = SegmentationMetric(num_classes=c, ignore_index=255)
    targets, preds = [], []
    for b in (2, 3, 1, 2):
        logits = torch.randn(b, c, 7, 9, generator=gen)
        target = torch.randint(0, c, (b, 7, 9), generator=gen)
        target[torch.rand(b, 7, 9, generator=gen) < 0.2] = 255
        target[torch.rand(b, 7, 9, generator=gen) < 0.05] = -3  # outside [0, C): dropped too
        metric.update(logits.argmax(1) if as_indices else logits, target)
        targets.append(target.numpy())
        preds.append(logits.argmax(1).numpy())
    ref = reference(targets, preds, c)
    np.testing.assert_array_equal(metric.confusion_matrix().numpy(), ref["confusion"])
    np.testing.assert_allclose(metric.iou().numpy(), ref["iou"], rtol=1e-12)
    values = metric.compute()
    assert values["miou"] == pytest.approx(ref["miou"], rel=1e-12)
    assert values["pixel_acc"] == pytest.approx(ref["pixel_acc"], rel=1e-12)


def test_class_absent_from_split_is_left_out_of_the_mean() -> None:
    gen = torch.Generator().manual_seed(3)
    c = 5
    target = torch.randint(0, 3, (4, 8, 8), generator=gen)  # classes 3 and 4 never occur...
    pred = torch.randint(0, 4, (4, 8, 8), generator=gen)  # ...and 4 is never predicted
    metric = SegmentationMetric(num_classes=c)
    metric.update(pred, target)
    ref = reference([target.numpy()], [pred.numpy()], c)
    iou = metric.iou()
    assert math.isnan(float(iou[4])) and float(iou[3]) == 0.0
    assert metric.compute()["miou"] == pytest.approx(ref["miou"], rel=1e-12)
    assert metric.compute()["miou"] == pytest.approx(float(iou[:4].mean()), rel=1e-12)


def test_hand_computed_example() -> None:
    # Valid (target, pred) pairs, the -1 pixel dropped: (0,0) (0,1) (1,1) (1,2) (2,2).
    # Confusion (rows = target): [[1,1,0],[0,1,1],[0,0,1]]; diagonal 1, 1, 1 of 5 pixels.
    # IoU_0 = 1/(2+1-1) = 1/2, IoU_1 = 1/(2+2-1) = 1/3, IoU_2 = 1/(1+2-1) = 1/2.
    # mIoU = (1/2 + 1/3 + 1/2) / 3 = 4/9 = 44.44...%; pixel accuracy 3/5 = 60%.
    target = torch.tensor([[[0, 0, 1], [1, 2, -1]]])
    pred = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    for c in (3, 4):  # with C = 4, class 3 never occurs and is left out of the mean
        metric = SegmentationMetric(num_classes=c)
        metric.update(pred, target)
        assert metric.confusion_matrix()[:3, :3].tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
        assert metric.compute() == pytest.approx({"miou": 400 / 9, "pixel_acc": 60.0})
        assert metric.iou()[:3].tolist() == pytest.approx([50.0, 100 / 3, 50.0])
    assert metric.higher_is_better == {"miou": True, "pixel_acc": True}


def test_logits_and_float_targets() -> None:
    # One-hot logits give the same classes as the indices; a float target (-1.0 = void) works.
    target = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 2.0, -1.0]]])
    pred = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    metric = SegmentationMetric(num_classes=3)
    metric.update(logits, target)
    assert metric.compute() == pytest.approx({"miou": 400 / 9, "pixel_acc": 60.0})


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.randn(2, 4, 5, 5), torch.zeros(2, 5, 5, dtype=torch.long), r"\(2, 3, 5, 5\)"),
        (torch.zeros(2, 5, 4, dtype=torch.long), torch.zeros(2, 5, 5, dtype=torch.long), "found"),
        (torch.zeros(2, 5, 5), torch.zeros(2, 5, 5, dtype=torch.long), "integer class indices"),
        (torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.long), r"\[0, 3\)"),
    ],
)
def test_bad_inputs_raise_value_error(pred: torch.Tensor, target: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SegmentationMetric(num_classes=3).update(pred, target)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"num_classes": -1},
            "Expected argument `num_classes` to be a positive integer but got -1.",
        ),
        ({"num_classes": 0}, "`num_classes`"),
        ({"num_classes": 2.0}, "`num_classes`"),
        ({"num_classes": True}, "`num_classes`"),
        ({"num_classes": 3, "ignore_index": 1}, "`ignore_index`"),
        ({"num_classes": 3, "ignore_index": "void"}, "`ignore_index`"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError) as info:
        SegmentationMetric(**kwargs)  # type: ignore[arg-type]
    assert match in str(info.value)


def test_details_are_per_class_iou_and_pixels_against_sklearn() -> None:
    c = 5
    gen = torch.Generator().manual_seed(3)
    metric = SegmentationMetric(num_classes=c)
    targets, preds = [], []
    for b in (2, 3):
        target = torch.randint(-1, c - 1, (b, 6, 8), generator=gen)  # class 4 never a target
        pred = torch.randint(0, c - 1, (b, 6, 8), generator=gen)  # nor predicted
        metric.update(pred, target)
        targets.append(target.numpy())
        preds.append(pred.numpy())
    ref = reference(targets, preds, c)
    details = metric.details()
    assert details["iou"][4] is None  # undefined, not 0
    np.testing.assert_allclose(details["iou"][:4], ref["iou"][:4], rtol=1e-12)
    t = np.concatenate([x.ravel() for x in targets])
    assert details["pixels"] == [float((t == k).sum()) for k in range(c)]
