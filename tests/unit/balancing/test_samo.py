"""SAMO: the perturbed rows against a naive functional computation, the wrapped method,
the parameters restored, and a run resumed exactly."""

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
from polytask.errors import ConfigError

TASKS = ["a", "b", "c"]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 6)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        z = torch.tanh(self.trunk(x))
        return {
            t: ((self.heads[t](z).squeeze(1) - y[:, i]) ** 2).mean() for i, t in enumerate(TASKS)
        }


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(10, 4, generator=g), torch.randn(10, 3, generator=g)


def _naive_rows(
    net: _Net, rho: float, beta: float, eps: float, seed: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """The SAMO rows from scratch: parameters as a dictionary, every loss a functional
    call at explicitly built parameter values (nothing changed in place)."""
    x, y = _data()
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    trunk = ["trunk.weight", "trunk.bias"]

    def losses_at(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = functional_call(net, dict(params), (x, y))
        return out

    base = losses_at(theta)
    g = torch.autograd.grad(
        torch.stack(list(base.values())).mean(), [theta[n] for n in trunk], retain_graph=True
    )
    generator = torch.Generator().manual_seed(seed)
    rows, heads = [], {}
    for t in TASKS:
        own = [n for n in theta if n.startswith(f"heads.{t}.")]
        h = torch.autograd.grad(base[t], [theta[n] for n in own], retain_graph=True)
        z = [torch.randn(theta[n].shape, generator=generator) for n in trunk]
        with torch.no_grad():
            plus = losses_at(
                {**theta, **{n: theta[n] + eps * zi for n, zi in zip(trunk, z, strict=True)}}
            )[t]
            minus = losses_at(
                {**theta, **{n: theta[n] - eps * zi for n, zi in zip(trunk, z, strict=True)}}
            )[t]
        slope = float(plus - minus) / (2 * eps)
        u = [(1 - beta) * gi + beta * slope * zi for gi, zi in zip(g, z, strict=True)]
        u_norm = torch.sqrt(sum((ui.double() ** 2).sum() for ui in u))
        h_norm = torch.sqrt(sum((hi.double() ** 2).sum() for hi in h))
        moved = dict(theta)
        for n, ui in zip(trunk, u, strict=True):
            moved[n] = (theta[n] + rho * ui / float(u_norm)).detach().requires_grad_(True)
        for n, hi in zip(own, h, strict=True):
            moved[n] = (theta[n] + rho * hi / float(h_norm)).detach().requires_grad_(True)
        loss = losses_at(moved)[t]
        grads = torch.autograd.grad(loss, [moved[n] for n in trunk + own])
        rows.append(torch.cat([gr.reshape(-1) for gr in grads[: len(trunk)]]))
        for n, gr in zip(own, grads[len(trunk) :], strict=True):
            heads[n] = gr
    return torch.stack(rows), heads


def _step(net: _Net, balancer: nn.Module) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor]]:
    x, y = _data()
    shared = list(net.trunk.parameters())
    others = [p for t in TASKS for p in net.heads[t].parameters()]

    def recompute(evaluation: bool = False) -> dict[str, Tensor]:
        was = net.training
        net.train(not evaluation)
        try:
            out: dict[str, Tensor] = net(x, y)
            return out
        finally:
            net.train(was)

    ctx = BackwardContext(shared_parameters=shared, other_parameters=others, recompute=recompute)
    weights = balancer.backward(net(x, y), ctx)
    return weights, shared, others


@pytest.mark.parametrize(
    "rho, beta, eps", [(0.001, 0.5, 0.01), (0.3, 0.0, 0.01), (0.3, 1.0, 0.1), (0.05, 0.25, 1e-3)]
)
def test_rows_match_the_naive_computation(rho: float, beta: float, eps: float) -> None:
    net = _Net()
    expected_rows, expected_heads = _naive_rows(net, rho, beta, eps, seed=7)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    samo = BALANCERS.get("samo")(tasks=TASKS, rho=rho, beta=beta, eps=eps, seed=7)
    _, shared, _ = _step(net, samo)
    # `sum` gives the shared parameters the sum of the rows, every head its own task's
    trunk = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(trunk, expected_rows.sum(dim=0), rtol=1e-5, atol=1e-6)
    for name, p in net.named_parameters():
        if name in expected_heads:
            assert torch.allclose(p.grad, expected_heads[name], rtol=1e-5, atol=1e-6), name
        assert torch.equal(p.detach(), before[name]), f"{name} was not restored"
    # the rows themselves, through the Gramian the wrapped method saw
    gramian = samo.diagnostics()["gramian"]
    assert torch.allclose(gramian, (expected_rows @ expected_rows.T).float(), rtol=1e-4)
    assert not torch.allclose(expected_rows, _naive_rows(net, 0.0, beta, eps, seed=7)[0])


def test_it_wraps_a_gradient_method() -> None:
    net = _Net()
    rows, _ = _naive_rows(net, 0.1, 0.5, 0.01, seed=0)
    mgda = BALANCERS.get("mgda")(tasks=TASKS)
    expected, expected_weights = mgda.aggregate(rows, TASKS)
    samo = BALANCERS.get("samo")(tasks=TASKS, method="mgda", rho=0.1)
    weights, shared, _ = _step(net, samo)
    trunk = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(trunk, expected, rtol=1e-4, atol=1e-6)
    got = torch.stack([weights[t] for t in TASKS])
    assert torch.allclose(got, expected_weights.to(got.dtype), atol=1e-4)


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="not a parameter-level gradient method"):
        BALANCERS.get("samo")(tasks=TASKS, method="equal")
    with pytest.raises(ConfigError, match="samo"):
        BALANCERS.get("samo")(tasks=TASKS, method="samo")
    with pytest.raises(ConfigError, match="cannot be wrapped"):
        BALANCERS.get("samo")(tasks=TASKS, method="modo")
    with pytest.raises(ConfigError, match="level"):
        BALANCERS.get("samo")(tasks=TASKS, level="feature")
    with pytest.raises(ConfigError, match="beta"):
        BALANCERS.get("samo")(tasks=TASKS, beta=1.5)


def test_an_interrupted_run_resumed_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    config = {
        "balancer.name": "samo",
        "balancer.options": {"method": "pcgrad", "rho": 0.05},
        "data.options.n_train": 96,
    }
    resumed_equals_uninterrupted(tmp_path, config)


def test_the_wrapped_method_gets_the_trainers_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAMO passes every trainer hook on to the method it wraps: GradNorm's renormalisation
    after each optimizer step takes effect, and each hook reaches the wrapped method once."""
    samo = BALANCERS.get("samo")(tasks=["a", "b"], method="gradnorm")
    with torch.no_grad():
        samo.inner.weight.copy_(torch.tensor([3.0, 1.0]))
    samo.after_optimizer_step(None)
    assert torch.equal(samo.inner.weight.detach(), torch.tensor([1.5, 0.5]))  # sums to K

    calls: list[str] = []
    for hook in ("on_epoch_start", "on_epoch_end", "after_optimizer_step", "on_structure_changed"):
        monkeypatch.setattr(
            samo.inner, hook, lambda *args, _hook=hook: calls.append(_hook), raising=True
        )
    samo.on_epoch_start(0)
    samo.on_epoch_end(0, {"a": 1.0, "b": 2.0})
    samo.after_optimizer_step(None)
    samo.on_structure_changed()
    assert calls == [
        "on_epoch_start",
        "on_epoch_end",
        "after_optimizer_step",
        "on_structure_changed",
    ]
