"""DepthMetric against numpy, for both protocols, and on a hand-computed example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polytask.errors import ConfigError
from polytask.metrics import DepthMetric


def random_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, b in enumerate((2, 2, 3, 1, 2)):
        pred = torch.rand(b, 1, 6, 8, generator=gen) * 5
        target = torch.rand(b, 1, 6, 8, generator=gen) * 5 + 0.2
        target[torch.rand(b, 1, 6, 8, generator=gen) < 0.3] = 0.0
        if i == 3:
            target.zero_()  # a batch without any valid pixel
        out.append((pred, target))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dataset_protocol_matches_numpy(seed: int) -> None:
    data = random_batches(seed)
    metric = DepthMetric()
    for pred, target in data:
        metric.update(pred, target)
    p = np.concatenate([x.numpy().astype(np.float64).ravel() for x, _ in data])
    g = np.concatenate([y.numpy().astype(np.float64).ravel() for _, y in data])
    p, g = p[g != 0], g[g != 0]
    values = metric.compute()
    assert values["abs_err"] == pytest.approx(np.mean(np.abs(p - g)), rel=1e-12)
    assert values["rel_err"] == pytest.approx(np.mean(np.abs(p - g) / g), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_batch_protocol_matches_a_numpy_loop(seed: int) -> None:
    data = random_batches(seed)
    metric = DepthMetric(protocol="per_batch")
    abs_means, rel_means = [], []
    for pred, target in data:
        metric.update(pred[:, 0], target[:, 0])  # [B, H, W] works as well as [B, 1, H, W]
        p = pred.numpy().astype(np.float64)
        g = target.numpy().astype(np.float64)
        valid = g != 0
        if valid.any():
            abs_means.append(np.abs(p - g)[valid].mean())
            rel_means.append((np.abs(p - g)[valid] / g[valid]).mean())
    values = metric.compute()
    assert values["abs_err"] == pytest.approx(np.mean(abs_means), rel=1e-12)
    assert values["rel_err"] == pytest.approx(np.mean(rel_means), rel=1e-12)


def test_hand_computed_example() -> None:
    # Batch 1: pred [[1, 2], [3, 4]], target [[2, 0], [2, 5]]: valid pairs (1,2) (3,2) (4,5);
    #   |p - g| = 1, 1, 1 -> abs 1; |p - g| / g = 1/2, 1/2, 1/5 -> rel 1.2 / 3 = 0.4.
    # Batch 2: pred [[0, 0], [0, 6]], target [[0, 0], [0, 3]]: one valid pair (6,3); abs 3, rel 1.
    # dataset:   abs = (1+1+1+3)/4 = 1.5,  rel = (1.2 + 1)/4 = 0.55
    # per_batch: abs = (1 + 3)/2 = 2,      rel = (0.4 + 1)/2 = 0.7
    batch1 = (
        torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]),
        torch.tensor([[[[2.0, 0.0], [2.0, 5.0]]]]),
    )
    batch2 = (
        torch.tensor([[[[0.0, 0.0], [0.0, 6.0]]]]),
        torch.tensor([[[[0.0, 0.0], [0.0, 3.0]]]]),
    )
    expected = {"dataset": (1.5, 0.55), "per_batch": (2.0, 0.7)}
    for protocol, (abs_err, rel_err) in expected.items():
        metric = DepthMetric(protocol=protocol)  # type: ignore[arg-type]
        metric.update(*batch1)
        metric.update(*batch2)
        assert metric.compute() == pytest.approx({"abs_err": abs_err, "rel_err": rel_err})
        assert metric.higher_is_better == {"abs_err": False, "rel_err": False}


def test_shape_mismatch_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"found pred \(2, 1, 4, 4\) and target \(2, 1, 4, 5\)"):
        DepthMetric().update(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="same shape"):
        DepthMetric().update(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))


@pytest.mark.parametrize("protocol", ["per_image", "", None, 1])
def test_bad_protocol_raises_config_error(protocol: object) -> None:
    with pytest.raises(ConfigError, match="Expected argument `protocol` to be one of"):
        DepthMetric(protocol=protocol)  # type: ignore[arg-type]
