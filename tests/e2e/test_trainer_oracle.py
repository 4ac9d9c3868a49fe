"""Several trainer steps of MGDA and UPGrad against a naive, independent re-implementation.

The real trainer (:func:`polytask.api.train`) runs one epoch of six plain-SGD steps on a tiny
MultiDigits configuration at ``level=parameter``. The oracle starts from the same initial
model (``build_components`` seeds it from the config alone) and replays the batches the
trainer saw (recorded by a pass-through spy on the trainer's batch iterator), with nothing
from polytask's balancing code: per-task cross-entropy losses, per-task gradients by
``torch.autograd.grad``, the Gramian ``J J^T`` of the encoder's (shared) gradients in
float64, the weights from closed forms for two tasks, ``w @ J`` for the encoder, the summed
gradient for the heads, and ``p -= lr * grad``.

Per-step unit tests cannot see state that leaks from one step into the next (a Gramian
cached on the reused Jacobian buffer once made every step use the first step's Gramian);
comparing every step's weights and the final parameters of a multi-step run does.

Conventions: both closed forms use polytask's conventions, which are also TorchJD's
(MGDA's weights sum to 1; UPGrad is the mean of the projections of the rows onto the dual
cone). ``test_closed_forms_agree_with_torchjd`` checks the closed forms against TorchJD on
the run's Gramians, up to TorchJD's own accuracy (its UPGrad adds a 1e-4 ridge after trace
normalisation; see tests/unit/balancing/test_aggregation_exact_torchjd.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import polytask.training.trainer as trainer_module
from helpers import tiny_config_dict
from polytask.api import train
from polytask.config import load_config
from polytask.data.loading import JOINT
from polytask.training.build import build_components
from polytask.training.checkpoint import load_checkpoint
from polytask.training.trainer import StepEnd

TASKS = ("left", "right")
LR = 0.1
STEPS = 6  # n_train / batch_size
METHODS = ("mgda", "upgrad")


def mgda_weights(g: Tensor) -> Tensor:
    """Min-norm point of the segment [g1, g2]: w1 = clamp((G22 - G12) / |g1 - g2|^2, 0, 1)."""
    w1 = ((g[1, 1] - g[0, 1]) / (g[0, 0] + g[1, 1] - 2 * g[0, 1])).clamp(0, 1)
    return torch.stack([w1, 1 - w1])


def upgrad_weights(g: Tensor) -> Tensor:
    """Mean of the projections of g1 and g2 onto {v : g1.v >= 0, g2.v >= 0}.

    Without conflict both rows already lie in the cone; otherwise g_i's projection is
    g_i - (G12 / G_jj) g_j (it stays on g_i's side by Cauchy-Schwarz).
    """
    if g[0, 1] >= 0:
        return torch.full((2,), 0.5, dtype=g.dtype)
    u1 = torch.stack([torch.ones((), dtype=g.dtype), -g[0, 1] / g[1, 1]])
    u2 = torch.stack([-g[0, 1] / g[0, 0], torch.ones((), dtype=g.dtype)])
    return (u1 + u2) / 2


ORACLES = {"mgda": mgda_weights, "upgrad": upgrad_weights}


def config_for(method: str, output_dir: Path) -> dict[str, Any]:
    return tiny_config_dict(
        output_dir,
        **{
            "balancer.name": method,
            "balancer.options": {"level": "parameter"},
            "data.options": {"n_train": 32 * STEPS, "n_val": 16, "n_test": 16},
            "data.batch_size": 32,
            "optim.name": "sgd",
            "optim.lr": LR,
            "optim.momentum": 0.0,
            "optim.weight_decay": 0.0,
            "train.epochs": 1,
            "train.device": "cpu",
            "train.selection": {"protocol": "last", "metric": "loss"},
        },
    )


def naive_training(config: dict[str, Any], batches: list[dict[str, Any]], method: str) -> dict:
    """Replay ``batches`` from the same initial model with a naive loop."""
    model = build_components(load_config(config)).model  # the trainer's initial weights
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shared = [p for n, p in params if n.startswith("encoder.")]  # hps: one encoder, two heads
    heads = [p for n, p in params if not n.startswith("encoder.")]
    assert shared and heads
    gramians, weights = [], []
    for batch in batches:
        x, targets = batch[JOINT]["input"], batch[JOINT]["targets"]
        preds = model(x)
        losses = [F.cross_entropy(preds[t], targets[t].long()) for t in TASKS]
        rows, head_grad = [], [torch.zeros_like(p) for p in heads]
        for k, loss in enumerate(losses):
            grads = torch.autograd.grad(
                loss, [*shared, *heads], retain_graph=k < len(losses) - 1, allow_unused=True
            )
            rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
            for i, g in enumerate(grads[len(shared) :]):
                if g is not None:
                    head_grad[i] += g
        jacobian = torch.stack(rows).double()
        gramian = jacobian @ jacobian.T
        w = ORACLES[method](gramian)
        combined = w @ jacobian
        shared_grad, offset = [], 0
        for p in shared:
            shared_grad.append(combined[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        with torch.no_grad():
            for p, g in zip([*shared, *heads], [*shared_grad, *head_grad], strict=True):
                p -= LR * g
        gramians.append(gramian)
        weights.append(w)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "gramians": gramians,
        "weights": torch.stack(weights),
    }


@pytest.fixture(scope="module", params=METHODS)
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    method: str = request.param
    tmp = tmp_path_factory.mktemp(method)
    config = config_for(method, tmp / "runs")
    seen: list[dict[str, Any]] = []
    real = trainer_module.iterate_batches

    def spy(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        for batch in real(*args, **kwargs):
            seen.append(batch)
            yield batch

    step_weights: list[Tensor] = []

    def record(info: StepEnd) -> None:
        step_weights.append(torch.stack([info.weights[t].double() for t in TASKS]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "iterate_batches", spy)
        run, _ = train(config, run_dir=tmp / "run", step_callbacks=[record], console=False)
    assert len(seen) == len(step_weights) == STEPS
    trained = load_checkpoint(run.last_checkpoint)["model"]
    oracle = naive_training(config, seen, method)
    return {
        "method": method,
        "trained": trained,
        "weights": torch.stack(step_weights),
        "oracle": oracle,
    }


def test_every_step_weights_match_the_oracle(runs: dict) -> None:
    torch.testing.assert_close(runs["weights"], runs["oracle"]["weights"], rtol=0, atol=1e-5)


def test_final_parameters_match_the_oracle(runs: dict) -> None:
    trained, expected = runs["trained"], runs["oracle"]["state"]
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        # BatchNorm statistics included: same forwards, same running averages
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_the_run_would_expose_a_stale_gramian(runs: dict) -> None:
    """Guard on the test itself: the weights change between steps (the run has conflicting
    and non-conflicting steps), so reusing one step's Gramian would change the weights by far
    more than the tolerance."""
    w = runs["oracle"]["weights"]
    assert float((w - w[0]).abs().max()) > 1e-2
    correlations = [float(g[0, 1] / (g[0, 0] * g[1, 1]).sqrt()) for g in runs["oracle"]["gramians"]]
    assert min(correlations) < -0.05 < 0.05 < max(correlations)


def test_closed_forms_agree_with_torchjd(runs: dict) -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    if runs["method"] == "mgda":
        # Frank-Wolfe with K = 2: the exact line search converges in one step
        oracle, rtol, atol = aggregation.MGDAWeighting(epsilon=1e-9, max_iters=20000), 1e-9, 1e-9
    else:
        # TorchJD's 1e-4 ridge after trace normalisation moves its weights by ~1e-4
        oracle, rtol, atol = aggregation.UPGradWeighting(), 2e-3, 1e-4
    for g, w in zip(runs["oracle"]["gramians"], runs["oracle"]["weights"], strict=True):
        torch.testing.assert_close(w, oracle(g).to(w), rtol=rtol, atol=atol)
