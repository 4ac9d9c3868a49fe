"""A model's regularization() is added to every step's gradient, unweighted by the balancer."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import tiny_config_dict
from polytask.config import load_config, to_dict
from polytask.training.build import build_components
from polytask.training.rundir import RunDirectory
from polytask.training.trainer import Trainer


def _one_sgd_step(
    tmp_path: Path, name: str, strength: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The change of every parameter after one SGD step, and the initial parameters."""
    config = load_config(
        tiny_config_dict(
            tmp_path / "runs",
            **{
                "data.options": {"n_train": 32, "n_val": 32, "n_test": 32},  # one step per epoch
                "train.epochs": 1,
                "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
                "balancer.name": "uncertainty",  # weights != 1: the penalty must not be weighted
            },
        )
    )
    c = build_components(config)
    initial = {n: p.detach().clone() for n, p in c.model.named_parameters()}
    if strength:
        params = list(c.model.parameters())
        c.model.regularization = lambda: strength * sum(p.square().sum() for p in params)  # type: ignore[method-assign, assignment, return-value]
    Trainer(c, RunDirectory.create(tmp_path / name, to_dict(config)), console=False).fit()
    return {n: p.detach() - initial[n] for n, p in c.model.named_parameters()}, initial


def test_penalty_gradient_is_added_to_the_step(tmp_path: Path) -> None:
    plain, initial = _one_sgd_step(tmp_path, "plain", 0.0)
    with_penalty, _ = _one_sgd_step(tmp_path, "penalty", 0.5)
    for name, delta in plain.items():
        # SGD: the extra step is -lr * d(0.5 * |theta|^2)/dtheta = -0.1 * theta0
        torch.testing.assert_close(
            with_penalty[name] - delta, -0.1 * initial[name], rtol=1e-4, atol=1e-6
        )
