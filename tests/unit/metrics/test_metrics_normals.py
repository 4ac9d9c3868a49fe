"""NormalMetric against numpy, for both protocols, and on a hand-computed example."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from polytask.errors import ConfigError
from polytask.metrics import NormalMetric
from polytask.metrics.normals import median

NAMES = ("mean", "median", "within_11.25", "within_22.5", "within_30")


def random_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, b in enumerate((2, 2, 3, 1, 2)):
        target = torch.nn.functional.normalize(torch.randn(b, 3, 6, 8, generator=gen), dim=1)
        pred = target + 0.6 * torch.randn(b, 3, 6, 8, generator=gen)  # angles spread over 0-180
        target = target * (torch.rand(b, 1, 6, 8, generator=gen) > 0.3)  # invalid: all zero
        if i == 3:
            target.zero_()  # a batch without any valid pixel
        out.append((pred, target))
    return out


def numpy_angles(pred: torch.Tensor, target: torch.Tensor, normalize: bool) -> np.ndarray:
    p = pred.numpy().astype(np.float64)
    g = target.numpy().astype(np.float64)
    if normalize:
        p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    valid = g.sum(axis=1) != 0
    cosine = np.einsum("bchw,bchw->bhw", p, g)[valid]
    angles: np.ndarray = np.degrees(np.arccos(np.clip(cosine, -1, 1)))
    return angles


def numpy_values(angles: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(np.mean(angles)),
        "median": float(np.median(angles)),
        "within_11.25": 100 * float(np.mean(angles < 11.25)),
        "within_22.5": 100 * float(np.mean(angles < 22.5)),
        "within_30": 100 * float(np.mean(angles < 30)),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_dataset_protocol_matches_numpy(seed: int, normalize: bool) -> None:
    data = random_batches(seed)
    metric = NormalMetric(normalize=normalize)
    for pred, target in data:
        metric.update(pred, target)
    angles = np.concatenate([numpy_angles(p, g, normalize) for p, g in data])
    assert metric.compute() == pytest.approx(numpy_values(angles), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_batch_protocol_matches_a_numpy_loop(seed: int) -> None:
    data = random_batches(seed)
    metric = NormalMetric(protocol="per_batch")
    per_batch = []
    for pred, target in data:
        metric.update(pred, target)
        angles = numpy_angles(pred, target, normalize=True)
        if angles.size:
            per_batch.append(numpy_values(angles))
    expected = {name: float(np.mean([v[name] for v in per_batch])) for name in NAMES}
    assert metric.compute() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_median_follows_numpy(n: int) -> None:
    values = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert float(median(values)) == np.median(values.numpy())


def unit(deg: float) -> list[float]:
    """A unit normal at ``deg`` degrees from (0, 0, 1), in the y-z plane."""
    return [0.0, math.sin(math.radians(deg)), math.cos(math.radians(deg))]


def test_hand_computed_example() -> None:
    # Six pixels (H = 1, W = 6), prediction -> target:
    #   (2,0,0) -> (1,0,0): normalised to (1,0,0), angle 0
    #   (1,0,0) -> (0,1,0): angle 90
    #   unit(25) -> (0,0,1): angle 25;  unit(10) -> (0,0,1): angle 10
    #   anything -> (0,0,0): invalid (missing normal)
    #   anything -> (1,-1,0)/sqrt(2): invalid too, its channels sum to 0 (the reference's test)
    # angles [0, 90, 25, 10]: mean 125/4 = 31.25, median (10 + 25)/2 = 17.5,
    #   below 11.25: {0, 10} -> 50%, below 22.5: 50%, below 30: {0, 10, 25} -> 75%.
    # A second batch with one pixel, angle 90 ((0,1,0) -> (0,0,1)):
    #   per_batch: mean (31.25 + 90)/2 = 60.625, median (17.5 + 90)/2 = 53.75,
    #              within (50 + 0)/2 = 25, 25, (75 + 0)/2 = 37.5
    #   dataset:   angles [0, 90, 25, 10, 90]: mean 215/5 = 43, median 25, within 40, 40, 60
    s = 1 / math.sqrt(2)
    preds = [[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], unit(25), unit(10), [0.3, 0.2, 0.1], [1.0, 0.0, 0.0]]
    targets = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], unit(0), unit(0), [0.0, 0.0, 0.0], [s, -s, 0.0]]

    def image(normals: list[list[float]]) -> torch.Tensor:  # pixels -> [1, 3, 1, W], float64
        return torch.tensor(normals, dtype=torch.float64).T.reshape(1, 3, 1, len(normals))

    batch1 = (image(preds), image(targets))
    batch2 = (image([[0.0, 1.0, 0.0]]), image([unit(0)]))
    single = NormalMetric()
    single.update(*batch1)
    first = [31.25, 17.5, 50.0, 50.0, 75.0]
    assert single.compute() == pytest.approx(dict(zip(NAMES, first, strict=True)), abs=1e-9)
    expected: dict[str, list[float]] = {
        "per_batch": [60.625, 53.75, 25.0, 25.0, 37.5],
        "dataset": [43.0, 25.0, 40.0, 40.0, 60.0],
    }
    for protocol, values in expected.items():
        metric = NormalMetric(protocol=protocol)  # type: ignore[arg-type]
        metric.update(*batch1)
        metric.update(*batch2)
        assert metric.compute() == pytest.approx(dict(zip(NAMES, values, strict=True)), abs=1e-9)
    assert single.higher_is_better == {
        "mean": False,
        "median": False,
        "within_11.25": True,
        "within_22.5": True,
        "within_30": True,
    }


def test_without_normalize_a_long_prediction_is_clamped() -> None:
    # <(2,0,0), (1,0,0)> = 2 is clamped to 1: angle 0 rather than NaN.
    pred = torch.tensor([2.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    target = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    metric = NormalMetric(normalize=False)
    metric.update(pred, target)
    assert metric.compute()["mean"] == 0.0


def test_shape_mismatch_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"found pred \(2, 3, 4, 4\) and target \(2, 3, 4, 5\)"):
        NormalMetric().update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        NormalMetric().update(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"protocol": "median_of_batches"}, "Expected argument `protocol` to be one of"),
        ({"normalize": "yes"}, "Expected argument `normalize` to be a bool but got 'yes'."),
        ({"normalize": 1}, "`normalize`"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError) as info:
        NormalMetric(**kwargs)  # type: ignore[arg-type]
    assert match in str(info.value)
