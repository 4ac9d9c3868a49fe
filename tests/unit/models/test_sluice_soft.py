"""Sluice networks and soft parameter sharing: shapes, mixing and skips against a naive
implementation, penalties against naive formulas, partition, overfitting, end-to-end runs.

As for cross-stitch, the end-to-end runs use SegNet at width 1/16 on tiny random dense data
through ``polytask.api.train``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from test_cross_stitch import (
    SMALL_SHAPE,
    TASKS,
    TinyStaged,
    build,
    dense_batch,
    dense_config,
    losses_of,
    overfit,
    tiny_dense_bundle,
    tiny_model,
)
from torch import Tensor, nn

from polytask.api import train
from polytask.data.base import DATASETS
from polytask.errors import ConfigError
from polytask.models import capture_representation, check_parameter_partition
from polytask.models.sharing import Sluice, SoftSharing
from polytask.models.sharing.sluice import SluiceUnit, subspace_orthogonality


@pytest.fixture
def tiny_dense() -> Iterator[str]:
    DATASETS.register("test_tiny_dense")(tiny_dense_bundle)
    yield "test_tiny_dense"
    DATASETS.unregister("test_tiny_dense")


def two_tasks() -> dict[str, Any]:
    return {t: TASKS[t] for t in ("semantic", "depth")}


# --- sluice: structure ----------------------------------------------------------------------


def test_sluice_on_segnet_shapes_units_and_betas() -> None:
    model = build("sluice")
    assert isinstance(model, Sluice)
    check_parameter_partition(model)
    out = model(torch.rand(2, *SMALL_SHAPE))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "semantic": (2, 13, 32, 48),
        "depth": (2, 1, 32, 48),
        "normal": (2, 3, 32, 48),
    }
    # K = 3 tasks x S = 2 subspaces: a 6 x 6 mixing matrix at each of the ten points
    alphas = model.alphas()
    assert list(alphas) == [f"encoder.{j}" for j in range(5)] + [f"decoder.{d}" for d in range(5)]
    for alpha in alphas.values():
        torch.testing.assert_close(alpha, torch.full((6, 6), 0.02) + 0.88 * torch.eye(6))
        torch.testing.assert_close(alpha.sum(dim=1), torch.ones(6))
    # the layers as wide as the features (64 channels at width 1 / 8: 8) are combined
    assert model.beta_names == ("encoder.0", "decoder.3", "features")
    for beta in model.betas().values():
        torch.testing.assert_close(beta, torch.tensor([0.05, 0.05, 0.9]))
        assert float(beta.sum()) == pytest.approx(1.0)


def test_sluice_unit_splits_channels_into_subspaces() -> None:
    """Row (t, s) of alpha is index t * S + s; subspace s is channels [s c, (s + 1) c)."""
    unit = SluiceUnit(num_tasks=2, subspaces=3)
    with torch.no_grad():
        unit.alpha.copy_(torch.randn(6, 6))
    xs = [torch.randn(2, 6, 3, 5), torch.randn(2, 6, 3, 5)]
    out = unit(xs)
    assert [tuple(o.shape) for o in out] == [(2, 6, 3, 5)] * 2
    blocks = [x[:, 2 * s : 2 * s + 2] for x in xs for s in range(3)]
    for t in range(2):
        for s in range(3):
            expected = sum(unit.alpha[t * 3 + s, b] * blocks[b] for b in range(6))
            torch.testing.assert_close(out[t][:, 2 * s : 2 * s + 2], expected)


def naive_penalty(x: Tensor, subspaces: int) -> Tensor:
    """sum_{s < r} ||G_s^T G_r||_F^2 / P^2 with every entry summed explicitly."""
    c = x.shape[1] // subspaces
    columns = [
        x[:, s * c : (s + 1) * c].permute(0, 2, 3, 1).reshape(-1, c) for s in range(subspaces)
    ]
    rows = columns[0].shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for s in range(subspaces):
        for r in range(s + 1, subspaces):
            for i in range(c):
                for j in range(c):
                    entry = (columns[s][:, i].double() * columns[r][:, j].double()).sum() / rows
                    total = total + entry**2
    return total


def test_subspace_orthogonality_against_the_naive_formula() -> None:
    g = torch.Generator().manual_seed(0)
    for subspaces in (2, 3):
        x = torch.randn(3, 6, 4, 5, generator=g)
        torch.testing.assert_close(
            subspace_orthogonality(x, subspaces).double(), naive_penalty(x, subspaces)
        )
    # orthogonal subspaces (disjoint supports) cost nothing
    x = torch.zeros(1, 4, 2, 2)
    x[:, :2, 0] = 1.0
    x[:, 2:, 1] = 1.0
    assert float(subspace_orthogonality(x, 2)) == 0.0


def naive_sluice(model: Sluice, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The sluice forward on TinyStaged written out with explicit blocks and loops."""
    tasks = model.task_names
    k, s_count = len(tasks), model.subspaces
    nets = [cast(TinyStaged, model.columns[t][0]) for t in tasks]
    units = cast(nn.ModuleList, model.units)
    penalty = torch.zeros((), dtype=torch.float64)

    def mix(unit: nn.Module, xs: list[Tensor]) -> list[Tensor]:
        nonlocal penalty
        for h in xs:
            penalty = penalty + naive_penalty(h, s_count)
        c = xs[0].shape[1] // s_count
        blocks = [h[:, s * c : (s + 1) * c] for h in xs for s in range(s_count)]
        alpha = unit.alpha
        mixed = [
            sum(alpha[a, b] * blocks[b] for b in range(k * s_count)) for a in range(k * s_count)
        ]
        return [torch.cat(mixed[t * s_count : (t + 1) * s_count], dim=1) for t in range(k)]

    m0 = mix(units[0], [F.avg_pool2d(net.encode(0, x).last, 2) for net in nets])
    m1 = mix(units[1], [net.encode(1, h).last for net, h in zip(nets, m0, strict=True)])
    size = x.shape[-2:]
    m2 = mix(
        units[2],
        [
            net.decode(0, F.interpolate(h, size=size, mode="nearest")).last
            for net, h in zip(nets, m1, strict=True)
        ],
    )
    out = {}
    for t, name in enumerate(tasks):
        beta = model.beta[name]

        def up(z: Tensor) -> Tensor:
            return F.interpolate(z, size=size, mode="bilinear", align_corners=True)

        combined = beta[0] * up(m0[t][:]) + beta[1] * up(m1[t]) + beta[2] * m2[t]
        out[name] = model.columns[name][1](combined)
    return out, model.orthogonality_weight * penalty


def test_sluice_matches_a_naive_implementation_with_its_penalty() -> None:
    model = tiny_model("sluice", orthogonality_weight=0.5)
    assert isinstance(model, Sluice)
    assert model.beta_names == ("encoder.0", "encoder.1", "features")
    torch.manual_seed(1)
    with torch.no_grad():  # away from the initialisation, so that every coefficient matters
        for unit in cast(nn.ModuleList, model.units):
            unit.alpha.copy_(torch.randn_like(unit.alpha))
        for beta in model.beta.values():
            beta.copy_(torch.randn_like(beta))
    x = torch.rand(2, 3, 8, 8)
    out = model(x)
    expected, penalty = naive_sluice(model, x)
    for task in TASKS:
        torch.testing.assert_close(out[task], expected[task], rtol=1e-5, atol=1e-5)
    regularization = model.regularization()
    assert regularization is not None and regularization.requires_grad
    torch.testing.assert_close(regularization.double(), penalty, rtol=1e-5, atol=1e-8)


def test_sluice_regularization_follows_the_forward_passes() -> None:
    assert tiny_model("sluice").regularization() is None  # weight 0: no constraint
    model = tiny_model("sluice", orthogonality_weight=0.1)
    with pytest.raises(RuntimeError, match="run one first"):
        model.regularization()
    x = torch.rand(2, 3, 8, 8)
    model(x)
    first = model.regularization()
    with torch.no_grad():  # e.g. evaluation: the training pass's penalty stays
        model(torch.rand(2, 3, 8, 8))
    again = model.regularization()
    assert first is not None and again is not None and torch.equal(again, first)


def test_sluice_penalty_first_with_retain_graph_then_the_losses() -> None:
    """The order a training loop needs: the penalty shares the forward graph, so it is
    backpropagated first, keeping the graph for the task losses; the gradients are those
    of the sum."""
    x, targets = dense_batch(shape=(3, 8, 8))
    model = tiny_model("sluice", orthogonality_weight=0.1)
    losses = losses_of(model(x), targets)
    penalty = model.regularization()
    assert penalty is not None
    penalty.backward(retain_graph=True)
    sum(losses.values()).backward()  # type: ignore[union-attr]
    separate = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = tiny_model("sluice", orthogonality_weight=0.1)
    losses = losses_of(reference(x), targets)
    (sum(losses.values()) + reference.regularization()).backward()  # type: ignore[operator]
    for name, p in reference.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(separate[name], p.grad, msg=name)


def test_sluice_partition_gradients_and_representation() -> None:
    model = build("sluice")
    assert isinstance(model, Sluice)
    check_parameter_partition(model)
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.units.parameters()} | {
        id(p) for t in TASKS for p in model.columns[t][0].parameters()
    }
    own = [id(p) for p in model.task_parameters("depth")]
    assert own == [id(model.beta["depth"])] + [
        id(p) for p in model.columns["depth"][1].parameters()
    ]
    x, targets = dense_batch()
    with capture_representation(model) as rep:
        losses = losses_of(model(x), targets)
    assert rep is not None
    names = rep.names()
    assert names == [f"{layer}.{t}" for t in TASKS for layer in model.beta_names]
    leaves = rep.leaves()
    params = list(model.shared_parameters())
    for i, (task, loss) in enumerate(losses.items()):
        to_shared = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        assert all(g is None for g in to_shared), task
        to_points = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        assert [g is not None for g in to_points] == [j // 3 == i for j in range(9)], task

    model.zero_grad()
    losses = losses_of(model(x), targets)
    losses["depth"].backward()
    for task in ("semantic", "normal"):
        assert all(p.grad is None for p in model.task_parameters(task))
        backbone = model.columns[task][0]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
    assert all(p.grad is not None for p in model.task_parameters("depth"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"subspaces": 3}, "must divide the width"),
        ({"subspaces": 0}, "positive integer"),
        ({"beta_init": 1.5}, "`beta_init`"),
        ({"orthogonality_weight": -1.0}, "`orthogonality_weight`"),
        ({"init": (0.5, 0.6)}, "convex pair"),
        ({"placement": "after"}, "`placement`"),
    ],
)
def test_sluice_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_model("sluice", **options)


def test_sluice_placement_stage_and_more_subspaces() -> None:
    model = tiny_model("sluice", placement="stage", subspaces=4)
    assert {tuple(a.shape) for a in model.alphas().values()} == {(12, 12)}
    assert model(torch.rand(1, 3, 8, 8))["depth"].shape == (1, 1, 8, 8)


# --- soft sharing -----------------------------------------------------------------------------


def naive_soft_penalty(model: SoftSharing) -> Tensor:
    """Pairwise squared L2 distances or per-parameter nuclear norms, from the state dicts."""
    states = [
        {n: p.detach().double() for n, p in model.columns[t][0].named_parameters()}
        for t in model.task_names
    ]
    total = torch.zeros((), dtype=torch.float64)
    for name in states[0]:
        if model.penalty == "l2":
            for s in range(len(states)):
                for t in range(s + 1, len(states)):
                    total = total + ((states[s][name] - states[t][name]) ** 2).sum()
        else:
            matrix = torch.stack([state[name].flatten() for state in states])
            total = total + torch.linalg.svdvals(matrix).sum()
    return model.weight * total


@pytest.mark.parametrize("penalty", ["l2", "trace_norm"])
def test_soft_penalties_against_naive_formulas(penalty: str) -> None:
    model = build("soft", penalty=penalty, weight=0.01)
    assert isinstance(model, SoftSharing)
    value = model.regularization()
    assert value is not None
    torch.testing.assert_close(value.double(), naive_soft_penalty(model), rtol=1e-5, atol=0)


def test_soft_l2_gradient_is_the_closed_form() -> None:
    """d/dtheta_t of w sum_{s<r} ||theta_s - theta_r||^2 is 2 w sum_{s != t} (theta_t - theta_s)."""
    model = build("soft", weight=0.25)
    assert isinstance(model, SoftSharing)
    value = model.regularization()
    assert value is not None
    value.backward()
    for params in model.corresponding_parameters().values():
        for t, p in enumerate(params):
            expected = (
                2 * 0.25 * sum(p.detach() - q.detach() for s, q in enumerate(params) if s != t)
            )
            assert p.grad is not None
            torch.testing.assert_close(p.grad, expected)
    heads = [p for t in TASKS for p in model.columns[t][1].parameters()]
    assert all(p.grad is None for p in heads)


def test_soft_computes_the_single_task_networks_and_shares_nothing() -> None:
    model = build("soft")
    single = build("single_task", seed=3)
    single.load_state_dict(model.state_dict())  # the same layout
    x = torch.rand(2, *SMALL_SHAPE)
    out, expected = model(x), single(x)
    assert all(torch.equal(out[t], expected[t]) for t in TASKS)
    check_parameter_partition(model)
    assert list(model.shared_parameters()) == []
    assert model.describe() == single.describe()
    assert build("soft", weight=0.0).regularization() is None


@pytest.mark.parametrize(
    ("options", "message"),
    [({"penalty": "l1"}, "`penalty`"), ({"weight": -0.1}, "`weight`")],
)
def test_soft_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_model("soft", **options)


def test_soft_and_sluice_need_several_tasks_or_subspaces() -> None:
    with pytest.raises(ConfigError, match="several tasks"):
        tiny_model("soft", tasks={"depth": TASKS["depth"]})
    with pytest.raises(ConfigError, match="two tasks or two subspaces"):
        tiny_model("sluice", tasks={"depth": TASKS["depth"]}, subspaces=1)


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "options"),
    [("sluice", {"orthogonality_weight": 1e-3}), ("soft", {})],
)
def test_overfits_one_batch_with_its_penalty(arch: str, options: dict[str, Any]) -> None:
    model = build(arch, two_tasks(), shape=(3, 32, 32), **options)
    first, last = overfit(model, steps=40)
    for task in first:
        assert last[task] < 0.3 * first[task], (task, first[task], last[task])


@pytest.mark.parametrize(("arch", "options"), [("sluice", {}), ("soft", {"weight": 1e-2})])
def test_end_to_end_training_run(
    tmp_path: Path, tiny_dense: str, arch: str, options: dict[str, Any]
) -> None:
    _, results = train(dense_config(tmp_path, arch, **options), console=False)
    metrics = results["test"]["metrics"]
    assert set(metrics) == {"semantic", "depth"}
    assert all(v == v for values in metrics.values() for v in values.values())
