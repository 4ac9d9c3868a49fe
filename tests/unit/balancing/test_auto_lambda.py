"""Auto-Lambda: a step against the official algorithm written functionally, its Adam against
torch's, and a run resumed exactly."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from helpers import resumed_equals_uninterrupted
from polytask.balancing import BALANCERS
from polytask.balancing.base import BackwardContext
from polytask.balancing.weighting.auto_lambda import AutoLambda
from polytask.errors import ConfigError

TASKS = ["a", "b"]
LR, WD = 0.05, 0.01


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.trunk = nn.Linear(3, 5)
        self.heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in TASKS})

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        z = torch.tanh(self.trunk(x))
        return {
            t: ((self.heads[t](z).squeeze(1) - y[:, i]) ** 2).mean() for i, t in enumerate(TASKS)
        }


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)


def _official(net: _Net, primary: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """The official step, functionally: every loss at explicitly built parameters."""
    x, y = _data()
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    names = list(theta)
    lam = torch.full((2,), 0.1, requires_grad=True)

    def losses(params: Mapping[str, Tensor], part: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = functional_call(net, dict(params), halves[part])
        return out

    first = losses(theta, 0)
    g = torch.autograd.grad(
        sum(lam[i] * first[t] for i, t in enumerate(TASKS)), list(theta.values()), retain_graph=True
    )
    ahead = {
        n: (theta[n] - LR * (gi + WD * theta[n])).detach().requires_grad_(True)
        for n, gi in zip(names, g, strict=True)
    }
    second = losses(ahead, 1)
    d = [
        torch.zeros_like(ahead[n]) if x is None else x
        for n, x in zip(
            names,
            torch.autograd.grad(
                sum(second[t] for t in primary), list(ahead.values()), allow_unused=True
            ),
            strict=True,
        )
    ]
    e = 0.01 / torch.cat([x.reshape(-1) for x in d]).norm()
    with torch.no_grad():
        plus = losses({n: theta[n] + e * di for n, di in zip(names, d, strict=True)}, 0)
        minus = losses({n: theta[n] - e * di for n, di in zip(names, d, strict=True)}, 0)
    meta = -LR * torch.stack([(plus[t] - minus[t]) / (2 * e) for t in TASKS])
    adam = torch.optim.Adam([lam], lr=1e-4)
    lam.grad = meta.detach()
    adam.step()
    # the network's update with the updated weights, on the whole step (both halves)
    whole = {t: (first[t] + losses(theta, 1)[t]) / 2 for t in TASKS}
    total = sum(lam.detach()[i] * whole[t] for i, t in enumerate(TASKS))
    grads = torch.autograd.grad(total, list(theta.values()))
    return lam.detach(), dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("primary", [["a", "b"], ["b"]])
def test_a_step_matches_the_official_algorithm(primary: list[str]) -> None:
    net = _Net()
    expected_lambdas, expected_grads = _official(net, primary)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, y = _data()
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]

    names = {id(p): n for n, p in net.named_parameters()}

    def recompute(
        evaluation: bool = False,
        part: int | None = None,
        values: Mapping[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        assert part is not None and not evaluation
        state = {names[id(p)]: v for p, v in (values or {}).items()}
        out: dict[str, Tensor] = functional_call(net, state, halves[part])
        return out

    parts = [net(*h) for h in halves]
    whole = {t: (parts[0][t] + parts[1][t]) / 2 for t in TASKS}
    shared = list(net.trunk.parameters())
    others = [p for t in TASKS for p in net.heads[t].parameters()]
    ctx = BackwardContext(
        shared_parameters=shared,
        other_parameters=others,
        parts=parts,
        recompute=recompute,
        learning_rate=lambda p: (LR, WD),
    )
    balancer = AutoLambda(TASKS, primary=primary)
    weights = balancer.backward(whole, ctx)
    assert torch.allclose(balancer.lambdas, expected_lambdas, rtol=0, atol=1e-7)
    assert torch.allclose(torch.stack([weights[t] for t in TASKS]), expected_lambdas, atol=1e-7)
    assert not torch.equal(balancer.lambdas, torch.full((2,), 0.1))  # the weights moved
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"{name} was not restored"
        assert torch.allclose(p.grad, expected_grads[name], rtol=1e-5, atol=1e-7), name


def test_a_step_with_an_overflow_leaves_the_weights_as_they_were() -> None:
    """An inf in the first part's loss (as a loss scaler's overflow gives) makes the look-ahead
    and the meta-gradient non-finite: the meta step is skipped, so the weights and Adam's
    moments stay finite and unchanged instead of becoming NaN for the rest of the run."""
    net = _Net()
    x, y = _data()
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    names = {id(p): n for n, p in net.named_parameters()}

    def recompute(
        evaluation: bool = False,
        part: int | None = None,
        values: Mapping[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        assert part is not None
        state = {names[id(p)]: v for p, v in (values or {}).items()}
        out: dict[str, Tensor] = functional_call(net, state, halves[part])
        return out

    parts = [net(*h) for h in halves]
    parts[0] = {t: v * float("inf") for t, v in parts[0].items()}
    ctx = BackwardContext(
        shared_parameters=list(net.trunk.parameters()),
        other_parameters=[p for t in TASKS for p in net.heads[t].parameters()],
        parts=parts,
        recompute=recompute,
        learning_rate=lambda p: (LR, WD),
    )
    balancer = AutoLambda(TASKS)
    assert balancer.meta_gradient(ctx, TASKS) is None
    whole = {t: (parts[1][t] + parts[1][t]) / 2 for t in TASKS}
    balancer.backward(whole, ctx)
    assert torch.equal(balancer.lambdas, torch.full((2,), 0.1))
    assert torch.equal(balancer._m, torch.zeros(2)) and torch.equal(balancer._v, torch.zeros(2))
    assert torch.equal(balancer._t, torch.zeros(2, dtype=torch.long))


def test_adam_matches_torch() -> None:
    balancer = AutoLambda(["a", "b", "c"], meta_lr=0.01)
    reference = torch.full((3,), 0.1, requires_grad=True)
    adam = torch.optim.Adam([reference], lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        grad = torch.randn(3, generator=g)
        balancer._adam([0, 1, 2], grad)
        reference.grad = grad
        adam.step()
    assert torch.allclose(balancer.lambdas, reference.detach(), rtol=0, atol=1e-7)
    balancer._adam([1], torch.tensor([1.0]))  # an absent task's weight and moments stay
    assert balancer.lambdas[0] == reference.detach()[0]
    assert balancer._t.tolist() == [5, 6, 5]


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="meta_lr"):
        AutoLambda(TASKS, meta_lr=0.0)
    with pytest.raises(ConfigError, match="primary"):
        AutoLambda(TASKS, primary=["z"])
    with pytest.raises(ConfigError, match="primary"):
        AutoLambda(TASKS, primary=[])
    assert "auto_lambda" in BALANCERS


def test_an_interrupted_run_resumed_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    config = {
        "balancer.name": "auto_lambda",
        "balancer.options": {"meta_lr": 0.01},
        "data.options.n_train": 96,
    }
    a, _ = resumed_equals_uninterrupted(tmp_path, config)
    lambdas = a["balancer"]["_extra_state"]["lambdas"]
    assert not torch.allclose(lambdas, torch.full_like(lambdas, 0.1))  # the weights learned
