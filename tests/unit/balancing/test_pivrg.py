"""PIVRG against the official algorithm written naively (the priorities from the scores by
a tempered softmax, then scipy's least_squares on ``G w - (p / w)^(1/2)``), over several
epochs of scores from training losses (with and without a baseline); scale equivariance,
the bound on the priorities, equal scores as FairGrad, options and the state round trip."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation import PIVRG, FairGrad
from polytask.balancing.base import Balancer
from polytask.errors import ConfigError
from polytask.registry import call_with_options

NAMES = ["a", "b", "c"]


def build(options: dict[str, Any]) -> Balancer:
    balancer = call_with_options(
        BALANCERS.get("pivrg"), options, where="balancer.options", provided={"tasks": NAMES}
    )
    assert isinstance(balancer, Balancer)
    return balancer


def naive_weights(
    gramian: np.ndarray, scores: np.ndarray, bound: float, mintemp: float
) -> np.ndarray:
    """The official ``PIVRG.get_weighted_loss``, with tight tolerances for the solver."""
    temp = np.max([(np.max(scores) - np.min(scores)) / np.log(bound), mintemp])
    e = np.exp((scores - np.max(scores)) / temp)
    w = len(scores) * e / e.sum()
    res = least_squares(
        lambda x: gramian @ x - np.power(w / x, 0.5),
        np.ones(len(scores)) / len(scores),
        bounds=(0, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
    )
    return np.asarray(res.x)


def jacobian(seed: int, k: int = 3, n: int = 8) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 3.0, 0.3, 2.0][:k], dtype=torch.float64)[:, None]
    return torch.randn(k, n, generator=g, dtype=torch.float64) * scales


@pytest.mark.parametrize("baseline", [None, {"a": 2.0, "b": 0.5, "c": 1.0}])
def test_weights_over_epochs_match_the_official_algorithm(
    baseline: dict[str, float] | None,
) -> None:
    method = build({} if baseline is None else {"baseline": baseline})
    assert isinstance(method, PIVRG)
    history = [
        {"a": 2.2, "b": 0.9, "c": 1.3},
        {"a": 1.9, "b": 0.5, "c": 1.25},
        {"a": 1.5, "b": 0.2, "c": 1.2},
    ]
    reference = history[0] if baseline is None else baseline
    scores = np.zeros(3)  # the first epoch: zeros, as the official trainers
    for epoch in range(len(history) + 1):
        j = jacobian(epoch)
        _, w = method.aggregate(j, NAMES)
        expected = naive_weights((j @ j.T).numpy(), scores, 2.0, 10.0)
        assert w.tolist() == pytest.approx(expected.tolist(), rel=1e-7)
        if epoch < len(history):
            losses = history[epoch]
            method.on_epoch_end(epoch, losses)
            scores = np.array([100 * (losses[t] - reference[t]) / reference[t] for t in NAMES])
    assert list(method.scores.values()) == pytest.approx(scores.tolist())
    assert np.ptp(scores) > 10 * math.log(2)  # the spread sets the temperature: p spans 2x


@pytest.mark.parametrize("scores", [[40.0, -20.0, 5.0], [1.0, 0.0, 2.0], [300.0, 0.0, -300.0]])
def test_priorities_are_bounded_and_favour_lagging_tasks(scores: list[float]) -> None:
    method = PIVRG(NAMES, bound=2.0, min_temperature=10.0)
    method.set_scores(dict(zip(NAMES, scores, strict=True)))
    p = method.priorities(NAMES)
    assert float(p.sum()) == pytest.approx(3.0)
    ratio = float(p.max() / p.min())
    spread = max(scores) - min(scores)
    assert ratio == pytest.approx(min(2.0, math.exp(spread / 10.0)), rel=1e-12)
    assert [int(i) for i in torch.argsort(p)] == [int(i) for i in np.argsort(scores)]


def test_equal_scores_give_fairgrad_with_alpha_two() -> None:
    j = jacobian(5)
    method = PIVRG(NAMES)
    method.set_scores({"a": 7.0, "b": 7.0, "c": 7.0})
    d, w = method.aggregate(j, NAMES)
    d2, w2 = FairGrad(NAMES, alpha=2.0).aggregate(j, NAMES)
    assert torch.allclose(w, w2, rtol=1e-12) and torch.allclose(d, d2, rtol=1e-12)
    gw = (j @ j.T) @ w  # the condition itself, p = 1
    assert gw.tolist() == pytest.approx((1 / w.sqrt()).tolist(), rel=1e-9)


@pytest.mark.parametrize("c", [1e-6, 1e6])
def test_scale_laws_of_alpha_two(c: float) -> None:
    j = jacobian(6)
    scores = {"a": 25.0, "b": -10.0, "c": 0.0}
    ours, scaled = PIVRG(NAMES), PIVRG(NAMES)
    ours.set_scores(scores)
    scaled.set_scores(scores)
    d, w = ours.aggregate(j, NAMES)
    ds, ws = scaled.aggregate(j * c, NAMES)
    assert (ws * c ** (4 / 3)).tolist() == pytest.approx(w.tolist(), rel=1e-9)
    assert (ds * c ** (1 / 3)).tolist() == pytest.approx(d.tolist(), rel=1e-9)
    # the weighted condition (G w)_k = (p_k / w_k)^(1/2) at that scale
    p = scaled.priorities(NAMES)
    lhs = ((j * c) @ (j * c).T) @ ws
    assert lhs.tolist() == pytest.approx((p / ws).sqrt().tolist(), rel=1e-8)


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="bound"):
        build({"bound": 1.0})
    with pytest.raises(ConfigError, match="bound"):
        build({"bound": 0.5})
    with pytest.raises(ConfigError, match="min_temperature"):
        build({"min_temperature": 0.0})
    with pytest.raises(ConfigError, match="missing"):
        build({"baseline": {"a": 1.0, "b": 1.0}})
    with pytest.raises(ConfigError, match="unknown"):
        build({"baseline": {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}})
    with pytest.raises(ConfigError, match="baseline"):
        build({"baseline": {"a": 1.0, "b": 0.0, "c": 1.0}})
    with pytest.raises(ConfigError, match="baseline"):
        build({"baseline": {"a": 1.0, "b": -1.0, "c": 1.0}})
    method = PIVRG(NAMES)
    with pytest.raises(ValueError, match="unknown task"):
        method.set_scores({"z": 1.0})
    with pytest.raises(ValueError, match="not finite"):
        method.set_scores({"a": math.nan})


def test_state_round_trip() -> None:
    method = PIVRG(NAMES)
    method.on_epoch_end(0, {"a": 2.0, "b": 1.0, "c": 0.5})
    method.on_epoch_end(1, {"a": 1.9, "b": 0.4, "c": 0.45})
    method.aggregate(jacobian(1), NAMES)
    state = method.get_extra_state()
    restored = PIVRG(NAMES)
    restored.set_extra_state(state)
    assert restored.get_extra_state() == state
    j = jacobian(2)
    assert torch.equal(method.aggregate(j, NAMES)[1], restored.aggregate(j, NAMES)[1])
    method.on_epoch_end(2, {"a": 1.0, "b": 0.3, "c": 0.4})
    restored.on_epoch_end(2, {"a": 1.0, "b": 0.3, "c": 0.4})
    assert method.scores == restored.scores  # the first epoch's losses stay the reference
    assert method.scores["a"] == pytest.approx(-50.0)
