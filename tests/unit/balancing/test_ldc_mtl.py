"""LDC-MTL against the official training loop written naively (one Adam over the network and
the weight logits, the pre-normalised losses, the penalty on consecutive weighted losses),
over several steps and each normalisation; the logged multipliers against autograd; missing
tasks; options; the checkpoint state.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from polytask.balancing import BALANCERS
from polytask.balancing.base import BackwardContext, Balancer
from polytask.balancing.weighting import LDCMTL
from polytask.errors import CheckpointError, ConfigError
from polytask.registry import call_with_options

NAMES = ["a", "b", "c"]
CTX = BackwardContext(shared_parameters=[])


def build(options: dict[str, Any], tasks: list[str] = NAMES) -> LDCMTL:
    balancer = call_with_options(
        BALANCERS.get("ldc_mtl"), options, where="balancer.options", provided={"tasks": tasks}
    )
    assert isinstance(balancer, LDCMTL)
    return balancer


class Net(nn.Module):
    """A shared linear layer and one linear head per task; targets of very different scales."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(4, 3).double()
        self.heads = nn.ModuleList(nn.Linear(3, 1).double() for _ in NAMES)

    def losses(self, step: int) -> Tensor:
        g = torch.Generator().manual_seed(50 + step)
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        y = torch.randn(8, len(NAMES), generator=g, dtype=torch.float64)
        y = y * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)
        z = torch.relu(self.shared(x))
        return torch.stack(
            [((head(z).squeeze(1) - y[:, k]) ** 2).mean() for k, head in enumerate(self.heads)]
        )


def official_total(losses: Tensor, p: Tensor, first: Tensor, mode: str, lamb: float) -> Tensor:
    """The official loop's objective (NYUv2 ratio, QM9 log, CelebA none), sum detached."""
    w = torch.sigmoid(p)
    if mode == "ratio":
        normalized = losses / (first / first.min())
    elif mode == "log":
        normalized = torch.log(losses / first)
    else:
        normalized = losses
    wl = w * normalized
    return w @ normalized / w.sum().detach() + lamb * torch.abs(wl[:-1] - wl[1:]).sum()


@pytest.mark.parametrize(
    ("mode", "reference", "lamb"),
    [("ratio", "first_step", 0.05), ("log", "every_epoch", 0.05), ("none", "first_step", 0.3)],
)
def test_training_matches_the_official_loop(mode: str, reference: str, lamb: float) -> None:
    epoch_starts = {0, 3}  # "every_epoch": L^0 is read again at the first step of an epoch
    ours, theirs = Net(), Net()
    balancer = build({"normalization": mode, "reference": reference, "penalty": lamb})
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt_ours = torch.optim.Adam([*ours.parameters(), *balancer.parameters()], lr=0.01)
    opt_theirs = torch.optim.Adam([*theirs.parameters(), p], lr=0.01)
    first = torch.empty(0)
    for step in range(6):
        if step in epoch_starts:
            balancer.on_epoch_start(step)
        losses = theirs.losses(step)
        if step == 0 or (reference == "every_epoch" and step in epoch_starts):
            first = losses.detach().clone()
        opt_theirs.zero_grad()
        official_total(losses, p, first, mode, lamb).backward()
        opt_theirs.step()

        opt_ours.zero_grad()
        ours_losses = ours.losses(step)
        balancer.backward(dict(zip(NAMES, ours_losses, strict=True)), CTX)
        opt_ours.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
        logits = torch.stack([balancer.logits[i] for i in range(3)]).double()
        assert torch.allclose(logits, p.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(p.detach(), torch.ones(3, dtype=torch.float64))  # they moved
    if mode != "none":
        assert torch.allclose(balancer.reference_losses, first, rtol=1e-12)


@pytest.mark.parametrize("mode", ["ratio", "log", "none"])
def test_logged_weights_are_the_derivatives_of_the_objective(mode: str) -> None:
    balancer = build({"normalization": mode, "penalty": 0.2})
    with torch.no_grad():
        for i, value in enumerate((0.3, -1.2, 2.0)):
            balancer.logits[i].fill_(value)
    first = {
        t: torch.tensor(v, dtype=torch.float64) for t, v in zip(NAMES, (2.0, 0.5, 7.0), strict=True)
    }
    balancer.combine(first)  # reads L^0
    values = {"a": 1.7, "b": 0.9, "c": 3.1}
    leaves = {
        t: torch.tensor(v, dtype=torch.float64, requires_grad=True) for t, v in values.items()
    }
    total, logged = balancer.combine(leaves)
    total.backward()
    for t in NAMES:
        assert leaves[t].grad is not None
        assert float(logged[t]) == pytest.approx(float(leaves[t].grad), rel=1e-12)
        assert not logged[t].requires_grad
    detached = balancer.weights(leaves)
    for t in NAMES:
        assert float(detached[t]) == pytest.approx(float(logged[t]), rel=1e-12)
    expected = official_total(
        torch.tensor(list(values.values()), dtype=torch.float64),
        torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64),
        torch.tensor([2.0, 0.5, 7.0], dtype=torch.float64),
        mode,
        0.2,
    )
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_missing_tasks_couple_the_present_neighbours_and_leave_the_absent_one_alone() -> None:
    balancer = build({"normalization": "none", "penalty": 0.5})
    leaves = {
        t: torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for t, v in (("a", 2.0), ("c", 0.5))
    }
    total, _ = balancer.combine(leaves)
    total.backward()
    s = torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))
    # equal weights: (s 2 + s 0.5) / 2s + 0.5 |2 s - 0.5 s|
    assert float(total.detach()) == pytest.approx(1.25 + 0.5 * 1.5 * float(s), rel=1e-6)
    assert balancer.logits[1].grad is None
    assert balancer.logits[0].grad is not None and balancer.logits[2].grad is not None


def test_log_normalisation_refuses_a_non_positive_loss() -> None:
    balancer = build({"normalization": "log"})
    with pytest.raises(ConfigError, match="normalization=ratio"):
        balancer.combine({t: torch.tensor(v) for t, v in zip(NAMES, (1.0, 0.0, 2.0), strict=True)})


def test_options_are_validated() -> None:
    for options, key in [
        ({"penalty": -0.1}, "penalty"),
        ({"penalty": "big"}, "penalty"),
        ({"normalization": "mean"}, "normalization"),
        ({"reference": "epoch"}, "reference"),
        ({"init": float("nan")}, "init"),
    ]:
        with pytest.raises(ConfigError, match=key):
            build(options)
    with pytest.raises(ConfigError):
        build({"lamb": 0.05})  # the official flag's name is not an option here


def test_state_round_trip_after_training() -> None:
    balancer = build({"reference": "every_epoch"})
    net = Net()
    opt = torch.optim.Adam([*net.parameters(), *balancer.parameters()], lr=0.05)
    balancer.on_epoch_start(0)
    for step in range(3):
        opt.zero_grad()
        balancer.backward(dict(zip(NAMES, net.losses(step), strict=True)), CTX)
        opt.step()
    balancer.on_epoch_start(1)  # a re-read is pending when the checkpoint is written
    state = balancer.state_dict()
    restored = build({"reference": "every_epoch"})
    restored.load_state_dict(state)
    assert restored.get_extra_state() == balancer.get_extra_state()
    assert restored.get_extra_state()["reread"] is True
    assert torch.equal(restored.reference_losses, balancer.reference_losses)
    assert bool(torch.isfinite(restored.reference_losses).all())
    losses = dict(zip(NAMES, net.losses(9), strict=True))
    a, wa = balancer.combine(losses)
    b, wb = restored.combine(losses)
    assert torch.equal(a, b) and all(torch.equal(wa[t], wb[t]) for t in NAMES)
    assert torch.allclose(restored.reference_losses, torch.stack(list(losses.values())).detach())
    for bad in (
        {"reread": "yes", "references": {}},
        {"reread": True},
        {"reread": True, "references": {"z": 1.0}},
    ):
        with pytest.raises(CheckpointError):
            restored.set_extra_state(bad)


def test_is_a_balancer_with_one_parameter_per_task() -> None:
    balancer = build({})
    assert isinstance(balancer, Balancer) and balancer.lr is None
    assert sum(p.numel() for p in balancer.parameters()) == 3
    w = balancer.weight("a")
    assert float(w.detach()) == pytest.approx(float(torch.sigmoid(torch.tensor(1.0))))
