"""The vectorized PCGrad / GradVac coefficient routines against their original loop versions.

``_naive_pcgrad_weights`` and ``_naive_gradvac_weights`` are verbatim copies of the
pure-Python implementations that :func:`pcgrad_weights` and :func:`gradvac_weights` had
before the loop over rows was vectorized (all rows advance in lockstep through their visiting
orders, with batched NumPy operations). They are the reference: same orders, same Gramian,
same targets must give the same coefficients and the same updated targets.

Tolerance: float64, ``rtol=1e-10`` with ``atol=1e-10`` times the largest coefficient
(weights; the absolute term covers coefficients that are a cancellation of larger terms) or
``atol=1e-10`` (targets, cosines in [-1, 1]). The vectorized code performs the same IEEE
operations as the loops, in the same order: the sums over the rows and GradVac's ``c . (Gc)``
add their terms one after the other like Python's left-to-right ``sum``, and NumPy's square
root is correctly rounded like ``math.sqrt`` (``torch.sqrt`` on the CPU may not be, through
MKL). So the results are in fact bitwise equal; the tolerance, tight but not zero, only keeps
the tests from depending on last-bit details of the kernels. It is not loose for the
degenerate families: with 40 rank-2 or nearly collinear gradients GradVac is ill-conditioned
(merely summing ``c . (Gc)`` with ``math.fsum`` in the reference moves its targets by up to
about 3e-4), so a change in the order of the operations shows up there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from polytask.balancing.aggregation.gradvac import gradvac_weights
from polytask.balancing.aggregation.pcgrad import pcgrad_weights, random_task_orders

RTOL = 1e-10
ATOL = 1e-10

KS = [1, 2, 3, 5, 10, 40]
KINDS = ["ordinary", "nearly_collinear", "zero_rows", "tiny", "huge", "low_rank", "conflicting"]


# --- the reference: the loop implementations, verbatim ------------------------------------


def _naive_pcgrad_weights(gramian: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    g = gramian.detach().to("cpu", torch.float64).tolist()
    k = len(g)
    total = [0.0] * k
    for i in range(k):
        coef = [0.0] * k
        coef[i] = 1.0
        dots = list(g[i])  # <g_i^PC, g_l> for every l
        for j in orders[i]:
            if dots[j] < 0.0 and g[j][j] > 0.0:
                step = dots[j] / g[j][j]
                coef[j] -= step
                row = g[j]
                dots = [d - step * r for d, r in zip(dots, row, strict=True)]
        total = [t + c for t, c in zip(total, coef, strict=True)]
    return torch.tensor(total, dtype=torch.float64, device=gramian.device)


def _naive_gradvac_weights(
    gramian: Tensor, orders: Sequence[Sequence[int]], targets: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    g = gramian.detach().to("cpu", torch.float64).tolist()
    phi_hat = targets.detach().to("cpu", torch.float64).tolist()
    k = len(g)
    total = [0.0] * k
    for i in range(k):
        coef = [0.0] * k
        coef[i] = 1.0
        dots = list(g[i])  # <g_i^adjusted, g_l> for every l
        sq_norm = g[i][i]
        for j in orders[i]:
            if sq_norm <= 0.0 or g[j][j] <= 0.0:
                continue
            norm_i, norm_j = math.sqrt(sq_norm), math.sqrt(g[j][j])
            phi = min(1.0, max(-1.0, dots[j] / (norm_i * norm_j)))
            target = phi_hat[i][j]
            sin_target = math.sqrt(max(0.0, 1.0 - target * target))
            if phi < target and sin_target > 0.0:
                sin_phi = math.sqrt(max(0.0, 1.0 - phi * phi))
                step = norm_i * (target * sin_phi - phi * sin_target) / (norm_j * sin_target)
                coef[j] += step
                dots = [d + step * r for d, r in zip(dots, g[j], strict=True)]
                sq_norm = max(0.0, sum(c * d for c, d in zip(coef, dots, strict=True)))
            phi_hat[i][j] = (1.0 - beta) * target + beta * phi
        total = [t + c for t, c in zip(total, coef, strict=True)]
    weights = torch.tensor(total, dtype=torch.float64, device=gramian.device)
    return weights, torch.tensor(phi_hat, dtype=torch.float64).reshape(k, k)


# --- seeded inputs --------------------------------------------------------------------------


def _jacobian(kind: str, k: int, seed: int) -> Tensor:
    """A seeded K x n Jacobian (float64) of the given family."""
    gen = torch.Generator().manual_seed(1000 * seed + 17 * k + len(kind))
    n = 3 * k + 4
    j = torch.randn(k, n, generator=gen, dtype=torch.float64)
    if kind == "nearly_collinear":
        base = torch.randn(1, n, generator=gen, dtype=torch.float64)
        signs = torch.where(torch.rand(k, 1, generator=gen) < 0.5, -1.0, 1.0).double()
        j = signs * base + 1e-6 * j
    elif kind == "zero_rows":
        j[torch.arange(k) % 3 == 1] = 0.0
    elif kind == "tiny":
        j = 1e-6 * j
    elif kind == "huge":
        j = 1e6 * j
    elif kind == "low_rank":
        base = torch.randn(2, n, generator=gen, dtype=torch.float64)
        j = torch.randn(k, 2, generator=gen, dtype=torch.float64) @ base
    elif kind == "conflicting":
        j[1::2] = -j[1::2] + 0.1 * torch.randn(j[1::2].shape, generator=gen, dtype=torch.float64)
    return j


def _orders(k: int, seed: int) -> list[list[int]]:
    return random_task_orders(torch.Generator().manual_seed(seed), k, list(range(k)))


def _targets(k: int, seed: int, ones: bool) -> Tensor:
    gen = torch.Generator().manual_seed(seed + 5)
    targets = 2.0 * torch.rand(k, k, generator=gen, dtype=torch.float64) - 1.0
    if ones:
        targets[torch.rand(k, k, generator=gen) < 0.25] = 1.0
    return targets


def _close_weights(actual: Tensor, expected: Tensor) -> None:
    assert actual.dtype == torch.float64 and actual.device == expected.device
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL * max(1.0, scale))


# --- PCGrad -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", KS)
def test_pcgrad_matches_the_loop_version(k: int, kind: str, seed: int) -> None:
    j = _jacobian(kind, k, seed)
    gram = j @ j.T
    orders = _orders(k, seed)
    _close_weights(pcgrad_weights(gram, orders), _naive_pcgrad_weights(gram, orders))


@pytest.mark.parametrize("k", KS)
def test_pcgrad_float32_gramian_matches_the_loop_version(k: int) -> None:
    j = _jacobian("conflicting", k, 4).float()
    gram = j @ j.T
    orders = _orders(k, 4)
    _close_weights(pcgrad_weights(gram, orders), _naive_pcgrad_weights(gram, orders))


def test_pcgrad_single_task_and_two_tasks() -> None:
    one = pcgrad_weights(torch.tensor([[4.0]]), [[]])
    assert one.dtype == torch.float64 and one.tolist() == [1.0]
    # two conflicting tasks: each loses its component along the other
    gram = torch.tensor([[1.0, -0.5], [-0.5, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(
        pcgrad_weights(gram, [[1], [0]]), _naive_pcgrad_weights(gram, [[1], [0]])
    )
    torch.testing.assert_close(pcgrad_weights(gram, [[1], [0]]), torch.tensor([1.5, 1.25]).double())


def test_pcgrad_all_zero_gramian() -> None:
    gram = torch.zeros(4, 4, dtype=torch.float64)
    orders = _orders(4, 0)
    assert pcgrad_weights(gram, orders).tolist() == [1.0] * 4


# --- GradVac ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ones", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", KS)
def test_gradvac_matches_the_loop_version(k: int, kind: str, seed: int, ones: bool) -> None:
    j = _jacobian(kind, k, seed)
    gram = j @ j.T
    orders = _orders(k, seed)
    targets = _targets(k, seed, ones)
    before = targets.clone()
    beta = 0.3
    weights, updated = gradvac_weights(gram, orders, targets, beta)
    expected_weights, expected_targets = _naive_gradvac_weights(gram, orders, targets, beta)
    _close_weights(weights, expected_weights)
    assert updated.dtype == torch.float64 and updated.device.type == "cpu"
    assert updated.shape == (k, k)
    torch.testing.assert_close(updated, expected_targets, rtol=RTOL, atol=ATOL)
    assert torch.equal(targets, before)  # the input targets are not modified in place


@pytest.mark.parametrize("k", [3, 10, 40])
def test_gradvac_repeated_steps_match_the_loop_version(k: int) -> None:
    """Several steps feeding the updated targets back in (as GradVac.weights_for does)."""
    targets = torch.zeros(k, k, dtype=torch.float64)
    expected_targets = targets.clone()
    for step in range(5):
        j = _jacobian("conflicting", k, step)
        gram = j @ j.T
        orders = _orders(k, 100 + step)
        weights, targets = gradvac_weights(gram, orders, targets, 0.5)
        expected, expected_targets = _naive_gradvac_weights(gram, orders, expected_targets, 0.5)
        _close_weights(weights, expected)
        torch.testing.assert_close(targets, expected_targets, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("beta", [0.0, 0.01, 1.0])
def test_gradvac_beta_extremes_match_the_loop_version(beta: float) -> None:
    j = _jacobian("ordinary", 10, 3)
    gram = j @ j.T
    orders = _orders(10, 3)
    targets = _targets(10, 3, ones=True)
    weights, updated = gradvac_weights(gram, orders, targets, beta)
    expected_weights, expected_targets = _naive_gradvac_weights(gram, orders, targets, beta)
    _close_weights(weights, expected_weights)
    torch.testing.assert_close(updated, expected_targets, rtol=RTOL, atol=ATOL)


def test_gradvac_zero_targets_is_pcgrad() -> None:
    j = _jacobian("conflicting", 10, 1)
    gram = j @ j.T
    orders = _orders(10, 1)
    weights, _ = gradvac_weights(gram, orders, torch.zeros(10, 10, dtype=torch.float64), 0.1)
    _close_weights(weights, pcgrad_weights(gram, orders))


def test_gradvac_single_task_and_edge_cases() -> None:
    weights, updated = gradvac_weights(torch.tensor([[4.0]]), [[]], torch.zeros(1, 1), 0.5)
    assert weights.tolist() == [1.0] and updated.tolist() == [[0.0]]
    assert weights.dtype == torch.float64 and updated.dtype == torch.float64
    # a zero gradient: its pairs (both directions) are skipped, targets left unchanged
    gram = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([[0.0, 0.7], [0.4, 0.0]], dtype=torch.float64)
    weights, updated = gradvac_weights(gram, [[1], [0]], targets, 0.5)
    assert weights.tolist() == [1.0, 1.0] and torch.equal(updated, targets)
    # a target of exactly 1: gradient unchanged, EMA updated with phi = -1
    gram = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    weights, updated = gradvac_weights(gram, [[1], [0]], targets, 0.5)
    assert weights.tolist() == [1.0, 1.0]
    torch.testing.assert_close(updated, torch.tensor([[0.0, 0.0], [0.0, 0.0]]).double())


# --- non-finite Gramians, invalid orders ------------------------------------------------------


def _same_with_nans(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [3, 5, 10])
def test_non_finite_gramian_matches_the_loop_version(k: int, seed: int, value: float) -> None:
    """An inf or NaN entry (an overflowing Gramian of a finite Jacobian reaches the methods)
    propagates exactly as in the loops, and NumPy emits no warning on the way."""
    j = _jacobian("conflicting", k, seed)
    gram = j @ j.T
    a, b = torch.randint(0, k, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    gram[a, b] = gram[b, a] = value
    orders = _orders(k, seed)
    targets = _targets(k, seed, ones=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = pcgrad_weights(gram, orders)
        gv_weights, gv_targets = gradvac_weights(gram, orders, targets, 0.3)
    _same_with_nans(weights, _naive_pcgrad_weights(gram, orders))
    expected_weights, expected_targets = _naive_gradvac_weights(gram, orders, targets, 0.3)
    _same_with_nans(gv_weights, expected_weights)
    _same_with_nans(gv_targets, expected_targets)


@pytest.mark.parametrize(
    "orders",
    [
        [[1, 2], [0, 2]],  # one order missing
        [[1, 2], [0], [0, 1]],  # ragged
        [[1, 1], [0, 2], [0, 1]],  # a row visited twice
        [[1, 3], [0, 2], [0, 1]],  # out of range
        [[1, -1], [0, 2], [0, 1]],
    ],
)
def test_invalid_orders_are_rejected(orders: list[list[int]]) -> None:
    gram = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="visiting order"):
        pcgrad_weights(gram, orders)
    with pytest.raises(ValueError, match="visiting order"):
        gradvac_weights(gram, orders, torch.zeros(3, 3), 0.5)
