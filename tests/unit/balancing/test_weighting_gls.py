"""GLS: the gradient is that of the geometric mean; finite at tiny, huge and zero losses."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchjd.scalarization import GeometricMean

from polytask.balancing.base import BackwardContext
from polytask.balancing.weighting import GLS
from polytask.errors import ConfigError

CTX = BackwardContext(shared_parameters=[])


def _model_losses(theta: Tensor, scales: Tensor) -> dict[str, Tensor]:
    """Three positive losses of one parameter vector, of very different sizes."""
    return {
        "a": scales[0] * (theta[0] - 1.0) ** 2 + scales[0] * 0.1,
        "b": scales[1] * torch.exp(theta[1] * theta[2]),
        "c": scales[2] * (theta.square().sum() + 0.5),
    }


@pytest.mark.parametrize("scale", [1.0, 1e-8, 1e8, "mixed"])
def test_gradient_equals_autograd_of_the_geometric_mean(scale: float | str) -> None:
    scales = (
        torch.tensor([1e-8, 1.0, 1e8], dtype=torch.float64)
        if scale == "mixed"
        else torch.full((3,), float(scale), dtype=torch.float64)
    )
    start = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    theta = start.clone().requires_grad_(True)
    weights = GLS(["a", "b", "c"]).backward(_model_losses(theta, scales), CTX)
    assert theta.grad is not None
    ours = theta.grad.clone()

    reference = start.clone().requires_grad_(True)
    losses = _model_losses(reference, scales)
    geo = torch.prod(torch.stack(list(losses.values()))) ** (1 / 3)  # naive, in float64
    (expected,) = torch.autograd.grad(geo, reference)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=0)
    # the weights are dG/dL_k = G / (K L_k)
    for t, loss in losses.items():
        assert float(weights[t]) == pytest.approx(float((geo / (3 * loss)).detach()), rel=1e-10)


def test_float32_at_extreme_scales_is_finite_and_matches_torchjd() -> None:
    gls, oracle = GLS(["a", "b", "c"]), GeometricMean()
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-8, 1e8, 1e-30, 1e30):
        values = (torch.rand(3, generator=g) + 0.1) * scale
        x = values.clone().requires_grad_(True)
        oracle(x).backward()
        leaves = {t: values[i].clone().requires_grad_(True) for i, t in enumerate("abc")}
        total, weights = gls.combine(leaves)
        total.backward()
        assert x.grad is not None
        grads = torch.stack([leaves[t].grad for t in "abc"])  # type: ignore[misc]
        assert bool(torch.isfinite(grads).all())
        torch.testing.assert_close(grads, x.grad, rtol=1e-5, atol=0)
        torch.testing.assert_close(total.detach(), oracle(values), rtol=1e-5, atol=0)
        assert all(bool(torch.isfinite(w)) for w in weights.values())


def test_a_zero_loss_gives_zero_weights_instead_of_nan() -> None:
    gls = GLS(["a", "b", "c"])
    for values in ([0.0, 2.0, 3.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]):
        leaves = {
            t: torch.tensor(v, requires_grad=True) for t, v in zip("abc", values, strict=True)
        }
        weights = gls.backward(leaves, CTX)
        assert [float(weights[t]) for t in "abc"] == [0.0, 0.0, 0.0]
        assert all(float(leaves[t].grad) == 0.0 for t in "abc")  # type: ignore[arg-type]


def test_missing_tasks_take_the_geometric_mean_of_the_present_losses() -> None:
    gls = GLS(["a", "b", "c"])
    weights = gls.weights({"c": torch.tensor(4.0), "a": torch.tensor(1.0)})
    # G = sqrt(4 * 1) = 2; w = G / (2 L)
    assert {t: float(w) for t, w in weights.items()} == {"c": 0.25, "a": 1.0}
    single = gls.weights({"b": torch.tensor(123.0)})
    assert float(single["b"]) == 1.0


def test_a_negative_loss_is_a_config_error_naming_the_task() -> None:
    with pytest.raises(ConfigError, match=r"balancer.name=gls .*\['b'\]"):
        GLS(["a", "b"]).weights({"a": torch.tensor(1.0), "b": torch.tensor(-0.5)})
