"""PCD against TorchJD 0.18 (sequences of calls: the moving averages) and against the KKT
conditions of its projection, over the seeded families."""

from __future__ import annotations

import io

import pytest
import torch
from test_aggregation_exact import KINDS, SIZES, family
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation import PCD
from polytask.errors import CheckpointError, ConfigError
from polytask.registry import call_with_options

torchjd = pytest.importorskip("torchjd.aggregation")


def names(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


@pytest.mark.parametrize("tau", [0.0, 0.02, 0.3])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", SIZES)
def test_pcd_equals_torchjd_over_a_sequence_of_steps(k: int, kind: str, tau: float) -> None:
    ours = PCD(names(k), tau=tau, beta=0.9)
    theirs = torchjd.PCDWeighting(tau=tau, beta=0.9)
    for seed in range(3):
        j = family(kind, k, seed)
        g = j @ j.T
        scale = float(j.norm(dim=1).max()) or 1.0
        d, expected = ours.weights_from_gramian(g) @ j, theirs(g) @ j
        torch.testing.assert_close(d / scale, expected / scale, rtol=0, atol=1e-8)


def normalized_rows(method: PCD, j: Tensor) -> Tensor:
    """The rows g~_i = s_i g_i with the scales of the method's current averages."""
    k = j.shape[0]
    scales = []
    for t in names(k):
        v = method._ema[t] / (1 - method.beta ** method._steps[t]) + method.eps
        scales.append(v**-0.5)
    return torch.tensor(scales, dtype=torch.float64)[:, None] * j


@pytest.mark.parametrize("tau", [0.02, 0.3])
@pytest.mark.parametrize("kind", ["ordinary", "conflicting", "tiny", "huge", "small_task"])
@pytest.mark.parametrize("k", SIZES)
def test_pcd_meets_the_kkt_conditions_of_its_projection(k: int, kind: str, tau: float) -> None:
    """d~ = g~_1 + sum_j lambda_j g~_j, lambda >= 0, g~_j . d~ >= tau |g~_j|^2 with equality
    where lambda_j > 0; the output is d~ rescaled to |g_1|."""
    j = family(kind, k)
    method = PCD(names(k), tau=tau, beta=0.5, eps=0.0)
    w = method.weights_from_gramian(j @ j.T)
    rows = normalized_rows(method, j)
    d = w @ j
    torch.testing.assert_close(d.norm(), j[0].norm(), rtol=1e-10, atol=0)
    c = w / (rows.norm(dim=1) / j.norm(dim=1))  # coefficients of the normalised rows
    c = c / c[0]
    tilde = c @ rows
    assert bool((c[1:] >= 0).all())
    slack = rows[1:] @ tilde - tau * rows[1:].norm(dim=1) ** 2
    size = float(rows.norm(dim=1).max()) * float((c.abs() * rows.norm(dim=1)).sum())
    assert float(slack.min()) >= -1e-10 * size
    assert float((slack * c[1:]).abs().max()) <= 1e-10 * size * float(c.abs().max())


def test_pcd_special_cases() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, generator=g, dtype=torch.float64)
    # two anti-parallel secondary gradients: infeasible, the output is g_1
    j = torch.stack([a, b, -b])
    w = PCD(names(3), tau=0.1).weights_from_gramian(j @ j.T)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    # g_1 = 0: no update
    j = torch.stack([torch.zeros(6, dtype=torch.float64), a, b])
    assert bool((PCD(names(3)).weights_from_gramian(j @ j.T) == 0).all())
    # a step without the primary task: no update to the shared part
    j = torch.stack([a, b])
    method = PCD(["p", "x", "y"], primary="p")
    assert bool((method.weights_for(j @ j.T, ["x", "y"]) == 0).all())
    # tau = 0 and no conflict: the primary gradient itself
    j = torch.stack([a, a + 0.1 * b])
    w = PCD(names(2), tau=0.0).weights_from_gramian(j @ j.T)
    if float(j[0] @ j[1]) > 0:
        torch.testing.assert_close(w @ j, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["ordinary", "conflicting", "small_task"])
def test_pcd_primary_by_name_and_order_of_the_other_tasks(kind: str) -> None:
    j = family(kind, 5)
    tasks = ["a", "b", "c", "d", "e"]
    first = PCD(tasks, primary="c", tau=0.2).weights_for(j @ j.T, tasks)
    perm = [2, 4, 0, 3, 1]
    permuted = [tasks[i] for i in perm]
    other = PCD(tasks, primary="c", tau=0.2).weights_for(j[perm] @ j[perm].T, permuted)
    scale = float(j.norm(dim=1).max())
    torch.testing.assert_close((other @ j[perm]) / scale, (first @ j) / scale, rtol=0, atol=1e-10)


def test_pcd_secondary_scale_invariance_and_state() -> None:
    """With eps = 0 a secondary row multiplied by the same constant at every step leaves the
    output unchanged (the normalisation); the averages survive a checkpoint."""
    k = 4
    plain, scaled = PCD(names(k), eps=0.0, tau=0.2), PCD(names(k), eps=0.0, tau=0.2)
    factor = torch.tensor([1.0, 1e5, 1.0, 1e-5], dtype=torch.float64)[:, None]
    for seed in range(3):
        j = family("conflicting", k, seed)
        d = plain.weights_from_gramian(j @ j.T) @ j
        js = factor * j
        ds = scaled.weights_from_gramian(js @ js.T) @ js
        torch.testing.assert_close(ds, d, rtol=1e-9, atol=1e-12)
    buffer = io.BytesIO()
    torch.save(plain.state_dict(), buffer)
    buffer.seek(0)
    restored = PCD(names(k), eps=0.0, tau=0.2)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert restored.get_extra_state() == plain.get_extra_state()
    j = family("ordinary", k)
    torch.testing.assert_close(
        restored.weights_from_gramian(j @ j.T), plain.weights_from_gramian(j @ j.T)
    )
    with pytest.raises(CheckpointError, match="pcd"):
        restored.set_extra_state(3)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"primary": "z"}, "primary"),
        ({"tau": 1.5}, "tau"),
        ({"tau": -0.1}, "tau"),
        ({"beta": 1.0}, "beta"),
        ({"eps": -1.0}, "eps"),
        ({"level": "loss"}, "level"),
    ],
)
def test_pcd_bad_options_name_the_key(options: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"balancer\.options\.{key}"):
        call_with_options(
            BALANCERS.get("pcd"), options, where="balancer.options", provided={"tasks": ["a", "b"]}
        )


@pytest.mark.parametrize("level", ["parameter", "feature"])
def test_pcd_takes_level_and_float32_rows(level: str) -> None:
    method = PCD(["a", "b", "c"], level=level)
    assert method.level == level and method.needs_representation == (level == "feature")
    j = family("conflicting", 3).float()
    combined, weights = method.aggregate(j, ["a", "b", "c"])
    assert combined.dtype == torch.float32 and weights.shape == (3,)
    torch.testing.assert_close(combined.norm(), j[0].norm(), rtol=1e-5, atol=0)
