"""Uncertainty weighting: closed-form gradients, hand-computed training sequences, TorchJD."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torchjd.scalarization import UW

from polytask.balancing.base import BackwardContext
from polytask.balancing.weighting import UncertaintyWeighting
from polytask.config import OptimConfig
from polytask.losses import CrossEntropyLoss
from polytask.metrics.classification import Accuracy
from polytask.models.backbones import MLP
from polytask.models.heads import mlp_head
from polytask.models.sharing import HardSharing
from polytask.tasks import Task
from polytask.training.build import build_optimizer

CTX = BackwardContext(shared_parameters=[])


def _leaves(values: dict[str, float]) -> dict[str, Tensor]:
    return {t: torch.tensor(v, dtype=torch.float64, requires_grad=True) for t, v in values.items()}


def _s(uw: UncertaintyWeighting) -> dict[str, float]:
    return {t: float(uw.log_variance(t).detach()) for t in uw.task_names}


@pytest.mark.parametrize(("parameterization", "initial"), [("mtan", -0.5), ("nash_mtl", 0.0)])
def test_initial_state_and_learning_rate(parameterization: str, initial: float) -> None:
    uw = UncertaintyWeighting(["a", "b", "c"], parameterization=parameterization)  # type: ignore[arg-type]
    assert sum(p.numel() for p in uw.parameters()) == 3  # one log-variance per task, no more
    assert _s(uw) == {"a": initial, "b": initial, "c": initial}
    assert uw.lr == (None if parameterization == "mtan" else 0.025)
    w = uw.weights(_leaves({"a": 1.0}))["a"]
    assert float(w.detach()) == pytest.approx(0.5 * math.exp(-initial))


def test_the_regulariser_is_in_the_backward_pass_with_the_closed_form_gradient() -> None:
    uw = UncertaintyWeighting(["a", "b", "c"])
    with torch.no_grad():
        for t, s in zip("abc", (-0.5, 0.3, 1.7), strict=True):
            uw.log_variance(t).fill_(s)
    losses = _leaves({"a": 2.0, "b": 0.5, "c": 7.0})
    weights = uw.backward(losses, CTX)
    for t, s, loss in zip("abc", (-0.5, 0.3, 1.7), (2.0, 0.5, 7.0), strict=True):
        grad_s = uw.log_variance(t).grad
        assert grad_s is not None
        # d/ds [L / (2 e^s) + s / 2] = (1 - e^{-s} L) / 2; d/dL = e^{-s} / 2
        assert float(grad_s) == pytest.approx(0.5 * (1 - math.exp(-s) * loss), rel=1e-6)
        assert float(losses[t].grad) == pytest.approx(0.5 * math.exp(-s), rel=1e-6)  # type: ignore[arg-type]
        assert float(weights[t]) == pytest.approx(0.5 * math.exp(-s), rel=1e-6)
        assert not weights[t].requires_grad
    total, _ = uw.combine(_leaves({"a": 2.0, "b": 0.5, "c": 7.0}))
    expected = sum(
        0.5 * math.exp(-s) * loss + 0.5 * s
        for s, loss in zip((-0.5, 0.3, 1.7), (2.0, 0.5, 7.0), strict=True)
    )
    assert float(total.detach()) == pytest.approx(expected, rel=1e-6)


# per-epoch losses of two tasks; one SGD step on s per epoch
LOSSES = [{"a": 2.0, "b": 0.2}, {"a": 1.5, "b": 0.25}, {"a": 1.0, "b": 0.1}, {"a": 0.8, "b": 0.3}]


def _hand_sequence(initial: float, lr: float) -> list[dict[str, float]]:
    """Weights e^{-s}/2 before each step; s <- s - lr (1 - e^{-s} L) / 2."""
    s = {"a": initial, "b": initial}
    out = []
    for losses in LOSSES:
        out.append({t: 0.5 * math.exp(-s[t]) for t in s})
        s = {t: s[t] - lr * 0.5 * (1 - math.exp(-s[t]) * losses[t]) for t in s}
    return out


@pytest.mark.parametrize(("parameterization", "initial"), [("mtan", -0.5), ("nash_mtl", 0.0)])
def test_sgd_training_follows_the_hand_computed_sequence(
    parameterization: str, initial: float
) -> None:
    uw = UncertaintyWeighting(["a", "b"], parameterization=parameterization)  # type: ignore[arg-type]
    lr = 0.1
    opt = torch.optim.SGD(uw.parameters(), lr=lr)
    # with initial -0.5: weights e^{0.5}/2 = 0.824361; s_a <- -0.5 - 0.1 (1 - e^{0.5} 2) / 2
    expected = _hand_sequence(initial, lr)
    for losses, want in zip(LOSSES, expected, strict=True):
        opt.zero_grad()
        got = uw.backward(_leaves(losses), CTX)
        assert {t: float(w) for t, w in got.items()} == pytest.approx(want, rel=1e-6)
        opt.step()
    if parameterization == "mtan":
        assert expected[0]["a"] == pytest.approx(0.8243606353500641)
        assert expected[1]["a"] == pytest.approx(
            0.5 * math.exp(0.5 + 0.1 * 0.5 * (1 - math.exp(0.5) * 2))
        )


@pytest.mark.parametrize("initial", [-0.5, 0.0, 1.3])
def test_equals_torchjd_uw_from_the_same_log_variances(initial: float) -> None:
    # TorchJD's UW is the "nash_mtl" form 0.5 (e^{-s} L + s) initialised at 0; the "mtan" form
    # L / (2 e^s) + s / 2 is the same function, so with the same s both agree at every step.
    oracle = UW(3)
    uw = UncertaintyWeighting(["a", "b", "c"], parameterization="nash_mtl")
    assert torch.equal(oracle.log_var.detach(), torch.stack(list(uw.log_variances)).detach())
    with torch.no_grad():
        oracle.log_var.fill_(initial)
        for p in uw.log_variances:
            p.fill_(initial)
    opt_a = torch.optim.Adam(oracle.parameters(), lr=0.05)
    opt_b = torch.optim.Adam(uw.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        values = torch.rand(3, generator=g) * 3
        x = values.clone().requires_grad_(True)
        opt_a.zero_grad()
        total_a = oracle(x)
        total_a.backward()
        opt_a.step()
        leaves = {t: values[i].clone().requires_grad_(True) for i, t in enumerate("abc")}
        opt_b.zero_grad()
        total_b, _ = uw.combine(leaves)
        total_b.backward()
        opt_b.step()
        assert float(total_b.detach()) == pytest.approx(float(total_a.detach()), rel=1e-6)
        assert x.grad is not None
        torch.testing.assert_close(torch.stack([leaves[t].grad for t in "abc"]), x.grad)  # type: ignore[misc]
        torch.testing.assert_close(
            torch.stack(list(uw.log_variances)).detach(), oracle.log_var.detach()
        )


def test_an_absent_task_gets_no_gradient_and_adam_leaves_it_alone() -> None:
    uw = UncertaintyWeighting(["a", "b"])
    opt = torch.optim.Adam(uw.parameters(), lr=0.1)
    for present in ({"a": 1.0, "b": 3.0}, {"a": 2.0}, {"a": 2.0}):
        opt.zero_grad(set_to_none=True)
        before_b = float(uw.log_variance("b").detach())
        weights = uw.backward(_leaves(present), CTX)
        assert set(weights) == set(present)
        if "b" not in present:
            assert uw.log_variance("b").grad is None
        opt.step()
        if "b" not in present:
            assert float(uw.log_variance("b").detach()) == before_b


def test_the_trainer_gives_the_log_variances_their_own_learning_rate() -> None:
    tasks = {
        n: Task(name=n, loss=CrossEntropyLoss(), metrics={"accuracy": Accuracy}, output_dim=4)
        for n in ("a", "b", "c")
    }
    model = HardSharing(
        tasks=tasks,
        backbone=lambda: MLP(input_shape=(6,), hidden=(8,)),
        head=lambda t, f: mlp_head(t, f, hidden=4),
    )
    for parameterization, lr in (("mtan", 1e-3), ("nash_mtl", 0.025)):
        uw = UncertaintyWeighting(list(tasks), parameterization=parameterization)  # type: ignore[arg-type]
        opt = build_optimizer(OptimConfig(lr=1e-3), model, uw, None)
        group = next(g for g in opt.param_groups if g.get("name") == "balancer")
        assert group["lr"] == lr and group["weight_decay"] == 0.0
        assert len(group["params"]) == len(tasks)


def test_unknown_task_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown task 'z'"):
        UncertaintyWeighting(["a"]).weights(_leaves({"z": 1.0}))
