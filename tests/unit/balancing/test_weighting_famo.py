"""FAMO: one full step by hand on a tiny model, TorchJD's FAMO over a sequence, missing tasks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torchjd.scalarization import FAMO as TorchJDFAMO

from polytask.balancing.base import BackwardContext
from polytask.balancing.weighting import FAMO
from polytask.errors import ConfigError

CTX = BackwardContext(shared_parameters=[])
X = torch.tensor([[0.5, -1.0, 2.0, 0.1], [1.5, 0.3, -0.4, 0.8], [-0.2, 0.9, 0.6, -1.3]])
TARGETS = torch.tensor([0.7, -0.4, 1.9])


def _losses(theta: Tensor) -> dict[str, Tensor]:
    """Three positive losses of a linear model with very different sizes."""
    pred = X.to(theta.dtype) @ theta
    err = pred - TARGETS.to(theta.dtype)
    return {"a": err[0] ** 2 + 0.01, "b": 100.0 * err[1] ** 2 + 0.5, "c": err[2].abs() + 0.02}


def test_one_full_step_on_a_tiny_model_equals_the_naive_formula() -> None:
    famo = FAMO(["a", "b", "c"])  # gamma 1e-3, lr 0.025, eps 1e-8
    # start from a state with history: logits, Adam moments and step counts
    xi0 = torch.tensor([0.2, -0.1, 0.4])
    m0, v0, t0 = torch.tensor([0.01, -0.02, 0.005]), torch.tensor([1e-4, 4e-4, 2e-5]), 3
    famo.logits.copy_(xi0)
    famo.exp_avg.copy_(m0)
    famo.exp_avg_sq.copy_(v0)
    famo.adam_steps.fill_(t0)

    theta0 = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    theta = theta0.clone().requires_grad_(True)
    weights = famo.backward(_losses(theta), CTX)
    assert theta.grad is not None
    alpha = 0.05
    with torch.no_grad():
        theta -= alpha * theta.grad
    famo.after_optimizer_step({t: v.detach() for t, v in _losses(theta).items()})

    # by hand, in float64
    names = ["a", "b", "c"]
    ref = theta0.clone().requires_grad_(True)
    losses = _losses(ref)
    grads = [torch.autograd.grad(losses[t], ref, retain_graph=True)[0] for t in names]
    big_l = torch.stack([losses[t].detach() for t in names])
    d_before = big_l + 1e-8
    z = torch.softmax(xi0.double(), 0)
    c = 1.0 / (z / d_before).sum()
    direction = sum(c * z[k] / d_before[k] * grads[k] for k in range(3))
    assert isinstance(direction, Tensor)
    torch.testing.assert_close(theta.grad, direction, rtol=1e-6, atol=1e-12)
    for k, t in enumerate(names):
        assert float(weights[t]) == pytest.approx(float(c * z[k] / d_before[k]), rel=1e-6)
    assert sum(float(w) for w in weights.values()) == pytest.approx(1.0)

    theta1 = theta0 - alpha * direction
    after = _losses(theta1)
    d_after = torch.stack([after[t] for t in names]) + 1e-8
    delta = torch.log(d_before) - torch.log(d_after)
    jacobian = torch.diag(z) - torch.outer(z, z)  # of softmax at xi0
    g = jacobian.T @ delta + 1e-3 * xi0.double()
    m = 0.9 * m0.double() + 0.1 * g
    v = 0.999 * v0.double() + 0.001 * g * g
    step = t0 + 1
    m_hat, v_hat = m / (1 - 0.9**step), v / (1 - 0.999**step)
    xi1 = xi0.double() - 0.025 * m_hat / (v_hat.sqrt() + 1e-8)
    torch.testing.assert_close(famo.logits.double(), xi1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(famo.exp_avg.double(), m, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(famo.exp_avg_sq.double(), v, rtol=1e-5, atol=1e-12)
    assert famo.adam_steps.tolist() == [4, 4, 4]


def _torchjd_multipliers(oracle: TorchJDFAMO, values: Tensor) -> Tensor:
    x = values.clone().requires_grad_(True)
    oracle(x).backward()
    assert x.grad is not None
    return x.grad


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e6])
def test_a_sequence_of_steps_equals_torchjd_famo(scale: float) -> None:
    # TorchJD's FAMO follows the official code: Adam(lr, weight_decay=gamma) on the logits
    oracle = TorchJDFAMO(3, lr=0.025, weight_decay=1e-3)
    famo = FAMO(["a", "b", "c"], gamma=1e-3, lr=0.025)
    g = torch.Generator().manual_seed(0)
    values = (torch.rand(3, generator=g) + 0.5) * scale
    for _ in range(8):
        theirs = _torchjd_multipliers(oracle, values)
        leaves = {t: values[i].clone().requires_grad_(True) for i, t in enumerate("abc")}
        weights = famo.backward(leaves, CTX)
        ours = torch.stack([leaves[t].grad for t in "abc"])  # type: ignore[misc]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
        torch.testing.assert_close(
            torch.stack([weights[t] for t in "abc"]), theirs, rtol=1e-5, atol=0
        )
        # tasks fall at different rates
        after = values * torch.tensor([0.9, 0.99, 0.7]) * (1 + 0.05 * torch.rand(3, generator=g))
        oracle.update(after)
        famo.after_optimizer_step({t: after[i] for i, t in enumerate("abc")})
        values = after
    # the slowest-falling task ("b") has gained weight
    z = torch.softmax(famo.logits, 0)
    assert float(z[1]) > 1 / 3 > float(z[2])


def test_absent_tasks_keep_their_logits_and_the_rest_is_famo_on_the_present_tasks() -> None:
    three, two = FAMO(["a", "b", "c"]), FAMO(["a", "b"])
    three.logits[2] = 0.7
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        values = torch.rand(2, generator=g) + 0.2
        after = values * (torch.rand(2, generator=g) * 0.5 + 0.5)
        w3 = three.weights({"a": values[0], "b": values[1]})
        w2 = two.weights({"a": values[0], "b": values[1]})
        assert {t: float(w) for t, w in w3.items()} == pytest.approx(
            {t: float(w) for t, w in w2.items()}
        )
        for famo in (three, two):
            famo.backward(
                {"a": values[0].clone().requires_grad_(), "b": values[1].clone().requires_grad_()},
                CTX,
            )
            famo.after_optimizer_step({"a": after[0], "b": after[1]})
        torch.testing.assert_close(three.logits[:2], two.logits)
    assert float(three.logits[2]) == pytest.approx(0.7)
    assert three.adam_steps.tolist() == [5, 5, 0]
    assert three.exp_avg[2].item() == 0.0


def test_a_task_missing_after_the_step_is_not_updated() -> None:
    famo = FAMO(["a", "b"])
    famo.backward(
        {"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(2.0, requires_grad=True)},
        CTX,
    )
    famo.after_optimizer_step({"a": torch.tensor(0.5)})
    assert famo.adam_steps.tolist() == [1, 0]


def test_min_losses_shift_the_losses() -> None:
    famo = FAMO(["a", "b"], min_losses={"b": 1.0}, eps=0.0)
    w = famo.weights({"a": torch.tensor(1.0), "b": torch.tensor(3.0)})
    # z = (1/2, 1/2), D = (1, 2): multipliers (1, 1/2) / 1.5
    assert {t: float(v) for t, v in w.items()} == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    with pytest.raises(ConfigError, match=r"min_losses.*\['b'\]|\['b'\].*min_losses"):
        famo.weights({"a": torch.tensor(1.0), "b": torch.tensor(0.5)})
    with pytest.raises(ConfigError, match=r"balancer\.options\.min_losses"):
        FAMO(["a"], min_losses={"z": 1.0})
    with pytest.raises(ConfigError, match=r"balancer\.options\.min_losses\.a"):
        FAMO(["a"], min_losses={"a": math.inf})


def test_the_update_needs_the_post_step_losses_after_a_backward() -> None:
    famo = FAMO(["a"])
    assert famo.needs_post_step_losses
    with pytest.raises(ValueError, match=r"before FAMO\.backward"):
        famo.after_optimizer_step({"a": torch.tensor(1.0)})
    famo.backward({"a": torch.tensor(1.0, requires_grad=True)}, CTX)
    with pytest.raises(ValueError, match="needs the losses"):
        famo.after_optimizer_step(None)


def test_logits_are_buffers_not_parameters_of_the_trainers_optimizer() -> None:
    famo = FAMO(["a", "b"])
    assert list(famo.parameters()) == []
    assert {"logits", "exp_avg", "exp_avg_sq", "adam_steps", "min_losses"} <= set(famo.state_dict())
    assert famo.lr == 0.025
