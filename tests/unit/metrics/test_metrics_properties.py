"""Contract properties shared by every built-in metric: mask, merge, reset, state round trip."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from polytask.errors import ConfigError
from polytask.metrics import (
    METRICS,
    MULTILABEL_VALUES,
    Accuracy,
    DepthMetric,
    Metric,
    MultiLabelMetric,
    NormalMetric,
    RegressionMetric,
    SegmentationMetric,
)

Batch = tuple[Tensor, Tensor]


def segmentation_batch(gen: torch.Generator, b: int) -> Batch:
    logits = torch.randn(b, 4, 5, 6, generator=gen)
    target = torch.randint(-1, 5, (b, 5, 6), generator=gen)  # -1 ignored, 4 out of range
    return logits, target


def depth_batch(gen: torch.Generator, b: int) -> Batch:
    pred = torch.rand(b, 1, 5, 6, generator=gen) * 3
    target = torch.rand(b, 1, 5, 6, generator=gen) * 3 + 0.1
    target[torch.rand(b, 1, 5, 6, generator=gen) < 0.3] = 0.0
    return pred, target


def normals_batch(gen: torch.Generator, b: int) -> Batch:
    pred = torch.randn(b, 3, 5, 6, generator=gen)
    target = torch.nn.functional.normalize(torch.randn(b, 3, 5, 6, generator=gen), dim=1)
    target = target * (torch.rand(b, 1, 5, 6, generator=gen) > 0.3)
    return pred, target


def accuracy_batch(gen: torch.Generator, b: int) -> Batch:
    return torch.randn(b, 3, generator=gen), torch.randint(0, 3, (b,), generator=gen)


def regression_batch(gen: torch.Generator, b: int) -> Batch:
    return torch.randn(b, 1, generator=gen), torch.randn(b, generator=gen)


def multilabel_batch(gen: torch.Generator, b: int) -> Batch:
    return torch.randn(b, 3, generator=gen), torch.randint(0, 2, (b, 3), generator=gen)


CASES: dict[str, tuple[Callable[[], Metric], Callable[[torch.Generator, int], Batch]]] = {
    "segmentation": (lambda: SegmentationMetric(num_classes=4), segmentation_batch),
    "depth-dataset": (lambda: DepthMetric(), depth_batch),
    "depth-per_batch": (lambda: DepthMetric(protocol="per_batch"), depth_batch),
    "normals-dataset": (lambda: NormalMetric(), normals_batch),
    "normals-per_batch": (lambda: NormalMetric(protocol="per_batch"), normals_batch),
    "accuracy": (lambda: Accuracy(), accuracy_batch),
    "regression": (lambda: RegressionMetric(), regression_batch),
    "multilabel": (lambda: MultiLabelMetric(values=MULTILABEL_VALUES), multilabel_batch),
}


def batches(case: str, n: int = 4, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    make = CASES[case][1]
    return [make(gen, 2 + i % 3) for i in range(n)]


def fed(case: str, data: list[Batch]) -> Metric:
    metric = CASES[case][0]()
    for pred, target in data:
        metric.update(pred, target)
    return metric


def assert_same_values(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == pytest.approx(b[name], rel=1e-12, abs=1e-12, nan_ok=True), name


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_values_match_higher_is_better_and_are_finite(case: str) -> None:
    metric = fed(case, batches(case))
    values = metric.compute()
    assert set(values) == set(metric.higher_is_better)
    assert all(math.isfinite(v) for v in values.values())


def test_empty_metric_computes_nan(case: str) -> None:
    values = CASES[case][0]().compute()
    assert values and all(math.isnan(v) for v in values.values())


def test_mask_drops_samples(case: str) -> None:
    data = batches(case)
    masked = CASES[case][0]()
    for pred, target in data:
        # Garbage samples appended after the labelled ones must not count.
        junk_pred = (
            torch.full_like(pred[:1], float("nan")) if pred.is_floating_point() else pred[:1]
        )
        mask = torch.tensor([True] * pred.shape[0] + [False])
        masked.update(torch.cat([pred, junk_pred]), torch.cat([target, target[:1]]), mask)
    assert_same_values(masked.compute(), fed(case, data).compute())


def test_all_false_mask_adds_nothing(case: str) -> None:
    data = batches(case)
    metric = fed(case, data)
    before = metric.state_dict()
    pred, target = data[0]
    metric.update(pred, target, torch.zeros(pred.shape[0], dtype=torch.bool))
    after = metric.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_merge_equals_one_metric_fed_everything(case: str) -> None:
    data = batches(case, n=5)
    first, second = fed(case, data[:2]), fed(case, data[2:])
    first.merge(second)
    assert_same_values(first.compute(), fed(case, data).compute())


def test_merge_rejects_another_kind(case: str) -> None:
    other: Metric = Accuracy() if case != "accuracy" else RegressionMetric()
    with pytest.raises(TypeError):
        CASES[case][0]().merge(other)


def test_reset_forgets_everything(case: str) -> None:
    data = batches(case)
    metric = fed(case, data)
    metric.reset()
    assert all(math.isnan(v) for v in metric.compute().values())
    for pred, target in data[:2]:
        metric.update(pred, target)
    assert_same_values(metric.compute(), fed(case, data[:2]).compute())


def test_state_dict_round_trip(case: str) -> None:
    data = batches(case, n=5)
    original = fed(case, data[:3])
    restored = CASES[case][0]()
    restored.load_state_dict(original.state_dict())
    assert_same_values(restored.compute(), original.compute())
    for pred, target in data[3:]:
        restored.update(pred, target)
    assert_same_values(restored.compute(), fed(case, data).compute())


def test_states_are_exact_dtypes(case: str) -> None:
    for name, value in fed(case, batches(case)).state_dict().items():
        assert value.dtype in (torch.float64, torch.int64), name


def test_registry_names_every_metric() -> None:
    assert METRICS.get("segmentation") is SegmentationMetric
    assert METRICS.get("depth") is DepthMetric
    assert METRICS.get("normals") is NormalMetric
    assert METRICS.get("accuracy") is Accuracy
    assert METRICS.get("regression") is RegressionMetric
    assert METRICS.get("multilabel") is MultiLabelMetric
    with pytest.raises(ConfigError, match="segmentation"):
        METRICS.get("segmentaton")


def test_protocols_do_not_merge() -> None:
    with pytest.raises(TypeError):
        DepthMetric("dataset").merge(DepthMetric("per_batch"))
    with pytest.raises(TypeError):
        NormalMetric("dataset").merge(NormalMetric("per_batch"))
