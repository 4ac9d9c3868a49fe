"""MultiLabelMetric against scikit-learn: random, tied, degenerate, sharded and masked cases."""

from __future__ import annotations

import itertools
import math
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    hamming_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)
from torch import Tensor

from polytask.errors import ConfigError
from polytask.metrics import METRICS, MULTILABEL_VALUES, MultiLabelMetric

REL = 1e-9


def make_data(
    seed: int, n: int, rates: Sequence[float], ties: str | None = None
) -> tuple[Tensor, Tensor]:
    """Logits [n, L] loosely correlated with {0,1} targets whose label l is positive at rates[l].

    ``ties``: None (continuous scores), ``"round"`` (rounded to one decimal) or ``"few"``
    (three distinct values, one of them the threshold 0 itself).
    """
    rng = np.random.default_rng(seed)
    target = (rng.random((n, len(rates))) < np.asarray(rates)).astype(np.int64)
    logits = rng.normal(size=target.shape) + 1.2 * target - 0.6
    if ties == "round":
        logits = np.round(logits, 1)
    elif ties == "few":
        logits = rng.choice([-1.0, 0.0, 1.0], size=target.shape) + 0.5 * target
        logits = np.clip(np.round(logits), -1.0, 1.0)
    return torch.from_numpy(logits), torch.from_numpy(target)


def sklearn_values(logits: np.ndarray, target: np.ndarray, threshold: float = 0.0) -> dict:
    """Every value in percent from scikit-learn; AUC and AP averaged over the defined labels."""
    logits, target = np.atleast_2d(logits.T).T, np.atleast_2d(target.T).T  # [N] -> [N, 1]
    pred = (logits.astype(np.float64) > threshold).astype(np.int64)
    num_labels = target.shape[1]
    if num_labels > 1:  # multi-label indicator arrays: macro = mean over labels
        y, p, macro, micro = target, pred, "macro", "micro"
    else:  # one label: the macro and micro values are the binary ones of the positive class
        y, p, macro, micro = target[:, 0], pred[:, 0], "binary", "binary"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        balanced = [balanced_accuracy_score(target[:, j], pred[:, j]) for j in range(num_labels)]
    defined = [j for j in range(num_labels) if 0 < target[:, j].sum() < target.shape[0]]
    auc = [roc_auc_score(target[:, j], logits[:, j]) for j in defined]
    ap = [average_precision_score(target[:, j], logits[:, j]) for j in defined]
    values = {
        "f1": f1_score(y, p, average=macro, zero_division=0),
        "precision": precision_score(y, p, average=macro, zero_division=0),
        "recall": recall_score(y, p, average=macro, zero_division=0),
        "balanced_accuracy": float(np.mean(balanced)),
        "roc_auc": float(np.mean(auc)) if auc else math.nan,
        "average_precision": float(np.mean(ap)) if ap else math.nan,
        "f1_micro": f1_score(y, p, average=micro, zero_division=0),
        "precision_micro": precision_score(y, p, average=micro, zero_division=0),
        "recall_micro": recall_score(y, p, average=micro, zero_division=0),
        "hamming_loss": hamming_loss(y, p),
        "subset_accuracy": accuracy_score(y, p),
    }
    return {name: 100 * float(value) for name, value in values.items()}


def assert_values(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, rel=REL, abs=1e-12, nan_ok=True), name


def fed(
    logits: Tensor, target: Tensor, sizes: Sequence[int] = (7, 1, 13), **kwargs
) -> MultiLabelMetric:
    """A metric fed ``logits``/``target`` in batches of the given sizes, cycled."""
    metric = MultiLabelMetric(values=kwargs.pop("values", MULTILABEL_VALUES), **kwargs)
    start, i = 0, 0
    while start < logits.shape[0]:
        stop = start + sizes[i % len(sizes)]
        metric.update(logits[start:stop], target[start:stop])
        start, i = stop, i + 1
    return metric


# -- against scikit-learn ----------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("n", "rates"),
    [
        (60, (0.5, 0.3)),
        (200, (0.5, 0.1, 0.02, 0.3, 0.9)),  # a rare label (a few positives) and a common one
        (37, (0.2, 0.6, 0.4, 0.05, 0.5, 0.7, 0.3, 0.1)),
    ],
)
@pytest.mark.parametrize("ties", [None, "round", "few"])
def test_matches_sklearn(seed: int, n: int, rates: tuple[float, ...], ties: str | None) -> None:
    logits, target = make_data(seed, n, rates, ties)
    metric = fed(logits, target)
    assert_values(metric.compute(), sklearn_values(logits.numpy(), target.numpy()))
    if ties == "few":  # scores equal to the threshold are predicted negative
        assert (logits == 0).any()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ties", [None, "round", "few"])
def test_binary_one_label_as_b_and_b1(seed: int, ties: str | None) -> None:
    logits, target = make_data(seed, 90, (0.15,), ties)
    flat = fed(logits[:, 0], target[:, 0])
    column = fed(logits, target)
    expected = sklearn_values(logits[:, 0].numpy(), target[:, 0].numpy())
    assert_values(flat.compute(), expected)
    assert_values(column.compute(), expected)
    assert flat.num_labels == column.num_labels == 1


def test_per_label_details_match_sklearn() -> None:
    logits, target = make_data(3, 120, (0.5, 0.03, 0.25), "round")
    details = fed(logits, target).details()
    y, s = target.numpy(), logits.numpy()
    p = (s > 0).astype(np.int64)
    expected = {
        "f1": f1_score(y, p, average=None, zero_division=0),
        "precision": precision_score(y, p, average=None, zero_division=0),
        "recall": recall_score(y, p, average=None, zero_division=0),
        "balanced_accuracy": [balanced_accuracy_score(y[:, j], p[:, j]) for j in range(3)],
        "roc_auc": [roc_auc_score(y[:, j], s[:, j]) for j in range(3)],
        "average_precision": [average_precision_score(y[:, j], s[:, j]) for j in range(3)],
    }
    assert set(details) == {*expected, "positives", "samples"}
    for name, values in expected.items():
        assert details[name] == pytest.approx([100 * v for v in values], rel=REL), name
    assert details["positives"] == [float(v) for v in y.sum(0)]
    assert details["samples"] == [120.0] * 3


def test_hand_computed_example_with_ties() -> None:
    # Label 0: scores 2, 1, 1, -1 for targets 1, 1, 0, 0. Predicted 1, 1, 1, 0: TP 2, FP 1, FN 0.
    # Ranks (ascending, ties averaged): -1 -> 1, 1 -> 2.5, 1 -> 2.5, 2 -> 4; positives 4 + 2.5;
    # AUC = (6.5 - 3) / (2 * 2) = 0.875. AP: threshold 2: P 1, R 1/2; threshold 1: P 2/3, R 1;
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    # Label 1: every target 0, nothing predicted: precision/recall/F1 0, TNR 1, AUC/AP undefined.
    metric = MultiLabelMetric(values=MULTILABEL_VALUES)
    metric.update(
        torch.tensor([[2.0, -1.0], [1.0, -2.0], [1.0, -1.0], [-1.0, -3.0]]),
        torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0]]),
    )
    values, details = metric.compute(), metric.details()
    assert details["roc_auc"] == [pytest.approx(87.5), None]
    assert details["average_precision"] == [pytest.approx(500 / 6), None]
    assert values["roc_auc"] == pytest.approx(87.5)  # label 1 left out of the mean
    assert details["f1"] == [pytest.approx(80.0), 0.0]
    assert values["f1"] == pytest.approx(40.0)  # label 1 counts as 0
    assert details["balanced_accuracy"] == [pytest.approx(75.0), pytest.approx(100.0)]
    assert values["hamming_loss"] == pytest.approx(100 / 8)
    assert values["subset_accuracy"] == pytest.approx(75.0)
    assert values["f1_micro"] == pytest.approx(80.0)


# -- degenerate labels and predictions ------------------------------------------------------
def test_labels_with_all_zero_or_all_one_targets() -> None:
    logits, target = make_data(4, 80, (0.4, 0.5, 0.3, 0.6), "round")
    target[:, 1] = 0
    target[:, 3] = 1
    metric = fed(logits, target)
    expected = sklearn_values(logits.numpy(), target.numpy())
    assert_values(metric.compute(), expected)
    details = metric.details()
    assert details["roc_auc"][1] is None and details["roc_auc"][3] is None
    assert details["average_precision"][1] is None and details["average_precision"][3] is None
    assert None not in details["roc_auc"][0::2]
    # scikit-learn's own averages differ here: NaN for AUC, 0 and 1 counted for AP.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(roc_auc_score(target.numpy(), logits.numpy(), average="macro"))
        y, s = target.numpy(), logits.numpy()
        assert average_precision_score(y[:, 1], s[:, 1]) == 0.0
        assert average_precision_score(y[:, 3], s[:, 3]) == 1.0
    # An all-one label's balanced accuracy is its TPR, an all-zero label's its TNR.
    assert details["balanced_accuracy"][3] == pytest.approx(
        100 * (logits[:, 3] > 0).double().mean()
    )
    assert details["balanced_accuracy"][1] == pytest.approx(
        100 * (logits[:, 1] <= 0).double().mean()
    )


def test_no_label_with_both_classes_gives_nan_ranking_values() -> None:
    logits, target = make_data(5, 30, (0.5, 0.5))
    target[:, 0], target[:, 1] = 0, 1
    values = fed(logits, target).compute()
    assert math.isnan(values["roc_auc"]) and math.isnan(values["average_precision"])
    assert_values(
        {k: v for k, v in values.items() if k not in ("roc_auc", "average_precision")},
        {
            k: v
            for k, v in sklearn_values(logits.numpy(), target.numpy()).items()
            if k not in ("roc_auc", "average_precision")
        },
    )


@pytest.mark.parametrize("rates", [(0.3, 0.02, 0.6), (0.2,)])
def test_all_negative_predictions(rates: tuple[float, ...]) -> None:
    logits, target = make_data(6, 70, rates)
    logits = -logits.abs() - 0.1  # every logit below 0: nothing predicted positive
    metric = fed(logits, target)
    values = metric.compute()
    assert_values(values, sklearn_values(logits.numpy(), target.numpy()))
    for name in ("f1", "precision", "recall", "f1_micro", "precision_micro", "recall_micro"):
        assert values[name] == 0.0, name
    # TPR 0 and TNR 1 on a label with positives, TNR 1 alone on a label without.
    expected = np.mean([50.0 if pos else 100.0 for pos in target.sum(0).tolist()])
    assert values["balanced_accuracy"] == pytest.approx(expected, rel=REL)


# -- merging, state, masks ---------------------------------------------------------------------
@pytest.mark.parametrize("num_labels", [1, 4])
def test_merged_shards_equal_one_shot_and_sklearn(num_labels: int) -> None:
    rates = (0.3, 0.05, 0.5, 0.7)[:num_labels]
    logits, target = make_data(7, 150, rates, "round")
    whole = fed(logits, target)
    cuts = [0, 40, 41, 100, 150]
    shards = [fed(logits[a:b], target[a:b]) for a, b in itertools.pairwise(cuts)]
    empty_first = MultiLabelMetric(values=MULTILABEL_VALUES)  # L unknown until merged
    for shard in shards:
        empty_first.merge(shard)
    empty_first.merge(MultiLabelMetric(values=MULTILABEL_VALUES))  # an empty shard: no-op
    expected = sklearn_values(logits.numpy(), target.numpy())
    assert_values(empty_first.compute(), expected)
    assert_values(empty_first.compute(), whole.compute())
    assert empty_first.details() == whole.details()  # the same state, so the same numbers
    for name, value in whole.state_dict().items():
        assert torch.equal(empty_first.state_dict()[name], value), name


def test_state_dict_round_trip_and_continue() -> None:
    logits, target = make_data(8, 90, (0.4, 0.1, 0.5), "few")
    first = fed(logits[:50], target[:50])
    restored = MultiLabelMetric(values=MULTILABEL_VALUES)
    restored.load_state_dict(first.state_dict())
    assert_values(restored.compute(), first.compute())
    restored.update(logits[50:], target[50:])
    assert_values(restored.compute(), sklearn_values(logits.numpy(), target.numpy()))
    for name, value in fed(logits, target).state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
        assert value.dtype in (torch.int64, torch.float64), name
    # The state of an empty metric loads as an empty metric.
    empty = MultiLabelMetric(values=MULTILABEL_VALUES)
    restored.load_state_dict(empty.state_dict())
    assert restored.num_labels is None
    assert all(math.isnan(v) for v in restored.compute().values())


def test_load_state_dict_refuses_inconsistent_state() -> None:
    logits, target = make_data(8, 20, (0.4, 0.1))
    state = fed(logits, target).state_dict()
    with pytest.raises(ValueError, match="40 entries"):
        MultiLabelMetric().load_state_dict({**state, "scores": state["scores"][:-1]})
    with pytest.raises(ValueError, match="one length"):
        MultiLabelMetric().load_state_dict({**state, "fp": state["fp"][:1]})


def test_merge_refuses_other_settings_and_label_counts() -> None:
    a, b = make_data(9, 10, (0.5, 0.5)), make_data(9, 10, (0.5, 0.5, 0.5))
    two, three = fed(*a, values=("f1",)), fed(*b, values=("f1",))
    with pytest.raises(ValueError, match=r"Expected 2 labels.*has 3"):
        two.merge(three)
    with pytest.raises(TypeError, match="threshold"):
        two.merge(MultiLabelMetric(values=("f1",), threshold=1.0))
    with pytest.raises(TypeError):  # one keeps the scores, the other does not
        two.merge(MultiLabelMetric(values=("f1", "roc_auc")))
    with pytest.raises(TypeError):
        MultiLabelMetric(values=("f1",)).merge(MultiLabelMetric(values=("roc_auc",)))


def test_mask_drops_samples() -> None:
    logits, target = make_data(10, 40, (0.3, 0.6, 0.1), "round")
    keep = torch.from_numpy(np.random.default_rng(10).random(40) < 0.6)
    junk_logits, junk_target = logits.clone(), target.clone()
    junk_logits[~keep] = float("nan")  # unlabelled samples may hold anything
    junk_target[~keep] = 7
    masked = MultiLabelMetric(values=MULTILABEL_VALUES)
    for rows in (slice(0, 15), slice(15, 40)):
        masked.update(junk_logits[rows], junk_target[rows], keep[rows])
    expected = sklearn_values(logits[keep].numpy(), target[keep].numpy())
    assert_values(masked.compute(), expected)
    assert masked.details()["samples"] == [float(keep.sum())] * 3


def test_sync_across_two_processes_one_without_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks run ``sync`` through stand-in collectives; rank 1 saw no sample at all."""
    import torch.distributed as dist

    barrier, slots, local = threading.Barrier(2), [None, None], threading.local()

    def all_gather_object(out: list, obj: object, group: object = None) -> None:
        slots[local.rank] = obj
        barrier.wait()
        out[:] = list(slots)
        barrier.wait()

    def all_reduce(tensor: Tensor, group: object = None) -> None:
        slots[local.rank] = tensor.clone()
        barrier.wait()
        assert slots[0].shape == slots[1].shape  # as a real all_reduce requires
        total = slots[0] + slots[1]
        barrier.wait()
        tensor.copy_(total)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)

    logits, target = make_data(11, 50, (0.5, 0.2, 0.05), "round")
    ranks = [fed(logits, target), MultiLabelMetric(values=MULTILABEL_VALUES)]

    def run(rank: int) -> dict[str, float]:
        local.rank = rank
        ranks[rank].sync()
        return ranks[rank].compute()

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, [0, 1]))
    expected = sklearn_values(logits.numpy(), target.numpy())
    assert_values(results[0], expected)
    assert_values(results[1], expected)


# -- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values",
    [
        ("f1", "roc_auc"),
        ("hamming_loss",),
        ("subset_accuracy", "recall_micro", "average_precision"),
    ],
)
def test_values_select_what_compute_returns(values: tuple[str, ...]) -> None:
    logits, target = make_data(12, 50, (0.4, 0.2))
    metric = fed(logits, target, values=values)
    result = metric.compute()
    assert tuple(result) == values
    assert metric.higher_is_better == {v: v != "hamming_loss" for v in values}
    expected = sklearn_values(logits.numpy(), target.numpy())
    assert_values(result, {v: expected[v] for v in values})
    kept = {"scores", "targets"} <= set(metric.state_dict())
    assert kept == any(v in ("roc_auc", "average_precision") for v in values)
    assert ("roc_auc" in metric.details()) == kept


def test_default_values_and_registry() -> None:
    metric = MultiLabelMetric()
    assert metric.higher_is_better == {"f1": True, "roc_auc": True}
    assert metric.threshold == 0.0
    assert METRICS.get("multilabel") is MultiLabelMetric
    assert MultiLabelMetric(values=MULTILABEL_VALUES).higher_is_better["hamming_loss"] is False


@pytest.mark.parametrize("threshold", [-0.5, 0.7, 2])
def test_threshold(threshold: float) -> None:
    logits, target = make_data(13, 80, (0.3, 0.5, 0.1), "round")
    metric = fed(logits.float(), target, threshold=threshold)
    expected = sklearn_values(logits.float().numpy(), target.numpy(), threshold)
    assert_values(metric.compute(), expected)
    default = fed(logits.float(), target).compute()
    assert default["f1"] != pytest.approx(expected["f1"], rel=REL)
    assert default["roc_auc"] == pytest.approx(expected["roc_auc"], rel=REL)  # threshold-free


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool, torch.float64])
def test_target_dtypes(dtype: torch.dtype) -> None:
    logits, target = make_data(14, 30, (0.5, 0.3))
    reference = fed(logits, target).compute()
    assert_values(fed(logits, target.to(dtype)).compute(), reference)


def test_empty_metric_and_reset() -> None:
    metric = MultiLabelMetric(values=MULTILABEL_VALUES)
    values = metric.compute()
    assert list(values) == list(MULTILABEL_VALUES)
    assert all(math.isnan(v) for v in values.values())
    assert metric.details() == {}
    metric.update(torch.zeros(0, 3), torch.zeros(0, 3))  # an empty batch fixes nothing
    assert metric.num_labels is None
    logits, target = make_data(15, 20, (0.5, 0.5, 0.5))
    metric.update(logits, target)
    assert metric.num_labels == 3
    metric.reset()  # forgets L too
    assert metric.num_labels is None and metric.details() == {}
    metric.update(logits[:, 0], target[:, 0])
    assert_values(metric.compute(), sklearn_values(logits[:, 0].numpy(), target[:, 0].numpy()))


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"values": ("f1", "auc")}, r"'auc'.*known values are 'f1', 'precision'"),
        ({"values": ()}, "at least one"),
        ({"values": ("f1", "recall", "f1")}, r"without repeats.*'f1'"),
        ({"values": "f1"}, "list of value names"),
        ({"threshold": float("nan")}, "finite number"),
        ({"threshold": True}, "finite number"),
        ({"threshold": "0.5"}, "finite number"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MultiLabelMetric(**kwargs)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.zeros(4, 2), torch.zeros(4, 3), r"same shape.*\(4, 2\).*\(4, 3\)"),
        (torch.zeros(4, 1), torch.zeros(4), r"same shape.*\(4, 1\).*\(4,\)"),
        (torch.zeros(4, 2, 2), torch.zeros(4, 2, 2), r"\[B\] \(one label\) or \[B, L\]"),
        (torch.zeros(4, 0), torch.zeros(4, 0), "L >= 1"),
        (torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2), "floating-point"),
        (torch.zeros(3, 2), torch.tensor([[0, 1], [2, 0], [1, 1]]), "0 or 1, found 2"),
        (torch.zeros(2, 2), torch.tensor([[0.0, 0.5], [1.0, 0.0]]), "0 or 1, found 0.5"),
        (torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2), "NaN"),
    ],
)
def test_bad_inputs(pred: Tensor, target: Tensor, match: str) -> None:
    metric = MultiLabelMetric(values=MULTILABEL_VALUES)
    with pytest.raises(ValueError, match=match):
        metric.update(pred, target)
    assert metric.num_labels is None  # a refused batch adds nothing


def test_label_count_is_fixed_by_the_first_batch() -> None:
    metric = MultiLabelMetric()
    metric.update(torch.zeros(3, 2), torch.zeros(3, 2))
    before = metric.state_dict()
    with pytest.raises(ValueError, match=r"Expected 2 labels.*this batch has 3"):
        metric.update(torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"Expected 2 labels.*this batch has 1"):
        metric.update(torch.zeros(3), torch.zeros(3))
    for name, value in metric.state_dict().items():
        assert torch.equal(value, before[name]), name
