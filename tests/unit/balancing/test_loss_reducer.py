"""The multi-process contract of stateful methods: state updates read the per-step losses only
through ``Balancer.reduce_losses``, so that a trainer pointing ``loss_reducer`` at a collective
keeps the state identical on every process.

A process's losses and the "global" ones differ here by a fixed map (the stand-in for the
mean over processes); a balancer given the local losses and the reducer must reach the same
state as one fed the global values directly.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import Tensor, nn

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation.gradnorm import GradNorm, gradnorm_weight_grad
from polytask.balancing.base import BackwardContext, Balancer

TASKS = ["a", "b", "c"]


def _global(losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """What the other processes would make of these losses: a fixed, task-dependent map."""
    return {t: 2.5 * v + 0.1 * (i + 1) for i, (t, v) in enumerate(losses.items())}


def _losses(theta: Tensor, step: int) -> dict[str, Tensor]:
    base = [1.0 + 0.3 * step, 2.0 / (1 + step), 0.5 + 0.05 * step * step]
    return {t: base[i] * (theta[i] - 0.2 * i) ** 2 + 0.1 for i, t in enumerate(TASKS)}


def _train(name: str, options: dict[str, object], reducer: bool) -> tuple[Balancer, Balancer]:
    """Seven steps of a toy model driven by a balancer given this process's losses (with or
    without the reducer), and a shadow balancer fed the global losses directly (its own
    gradients are thrown away)."""
    driver = BALANCERS.get(name)(tasks=TASKS, **options)
    shadow = BALANCERS.get(name)(tasks=TASKS, **options)
    if reducer:
        driver.loss_reducer = _global
    theta = nn.Parameter(torch.tensor([1.0, -0.5, 0.7], dtype=torch.float64))
    for step in range(7):
        theta.grad = None
        driver.backward(_losses(theta, step), BackwardContext(shared_parameters=[theta]))
        copy = theta.detach().clone().requires_grad_(True)
        shadow.backward(_global(_losses(copy, step)), BackwardContext(shared_parameters=[copy]))
        with torch.no_grad():
            theta -= 0.05 * theta.grad  # type: ignore[operator]
        after = {t: v.detach() for t, v in _losses(theta, step).items()}
        post = driver.needs_post_step_losses
        driver.after_optimizer_step(after if post else None)
        shadow.after_optimizer_step(_global(after) if post else None)
    return driver, shadow


@pytest.mark.parametrize(
    ("name", "options", "state"),
    [
        ("famo", {}, ("logits", "exp_avg", "exp_avg_sq")),
        ("dwa", {"mode": "window", "window": 2}, ("lambdas", "window_losses", "window_ratios")),
    ],
)
def test_state_follows_the_reduced_losses(
    name: str, options: dict[str, object], state: tuple[str, ...]
) -> None:
    driver, shadow = _train(name, options, reducer=True)
    for key in state:
        torch.testing.assert_close(getattr(driver, key), getattr(shadow, key), msg=key)
    # and the reduction mattered: without it the state is another one
    plain, shadow = _train(name, options, reducer=False)
    assert not torch.allclose(getattr(plain, state[0]), getattr(shadow, state[0]))


def test_gradnorm_learns_from_the_reduced_losses() -> None:
    theta = nn.Parameter(torch.tensor([1.0, -0.5, 0.7]))
    balancer = BALANCERS.get("gradnorm")(tasks=TASKS)
    assert isinstance(balancer, GradNorm)
    balancer.loss_reducer = _global
    grads = []
    for step in range(3):
        theta.grad = None
        balancer.weight.grad = None
        local = _losses(theta, step)
        balancer.backward(local, BackwardContext(shared_parameters=[theta]))
        grads.append(balancer.weight.grad.clone())  # type: ignore[union-attr]
        # the formula on the global losses, the gradient norms of the local rows
        rows = torch.stack([torch.autograd.grad(_losses(theta, step)[t], theta)[0] for t in TASKS])
        glob = _global({t: v.detach() for t, v in local.items()})
        if step == 0:
            initial = torch.stack([glob[t] for t in TASKS]).double()
        expected = gradnorm_weight_grad(
            balancer.weight.detach().double(),
            rows.double().norm(dim=1),
            torch.stack([glob[t] for t in TASKS]).double(),
            initial,
            balancer.alpha,
        )
        torch.testing.assert_close(grads[-1].double(), expected)
    torch.testing.assert_close(balancer.initial_losses, initial)


def test_a_reducer_that_changes_the_tasks_is_refused() -> None:
    balancer = BALANCERS.get("famo")(tasks=TASKS)
    balancer.loss_reducer = lambda losses: {"a": losses["a"]}
    with pytest.raises(ValueError, match="loss_reducer returned tasks"):
        balancer.reduce_losses({t: torch.tensor(1.0) for t in TASKS})


def test_without_a_reducer_the_losses_are_this_processs_detached_values() -> None:
    balancer = BALANCERS.get("famo")(tasks=TASKS)
    x = torch.tensor(2.0, requires_grad=True)
    out = balancer.reduce_losses({"a": x * 3})
    assert not out["a"].requires_grad and float(out["a"]) == 6.0
