"""FAFS (Lu et al., CVPR 2017): the affinity, the grouping criterion and its search against
naive computations and brute force, and the widening that keeps the network's function."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from helpers import tiny_config_dict
from polytask.balancing import BackwardContext
from polytask.balancing.base import BALANCERS
from polytask.balancing.gradient import GradientBalancer
from polytask.config import Config, from_dict
from polytask.losses import MSELoss
from polytask.metrics import RegressionMetric
from polytask.models import check_parameter_partition, linear_head
from polytask.models.backbones import MLP
from polytask.models.base import AdaptContext, capture_representation
from polytask.models.sharing.fafs import (
    FAFS,
    branch_affinity,
    grouping_loss,
    partitions,
    search_grouping,
    task_affinity,
)
from polytask.tasks import Task
from polytask.training.build import build_optimizer, build_scheduler
from polytask.training.structure import rebuild_optimizer

NAMES = ["a", "b", "c", "d"]


def _naive_affinity(losses: list[list[float]], labelled: list[list[bool]]) -> list[list[float]]:
    """The paper's A(i, j) with plain loops: P(both difficult) + P(both easy)."""
    n, t = len(losses), len(losses[0])
    means = []
    for j in range(t):
        values = [losses[s][j] for s in range(n) if labelled[s][j]]
        means.append(sum(values) / len(values))
    out = [[0.0] * t for _ in range(t)]
    for i in range(t):
        for j in range(t):
            both = [s for s in range(n) if labelled[s][i] and labelled[s][j]]
            agree = sum(1 for s in both if (losses[s][i] >= means[i]) == (losses[s][j] >= means[j]))
            out[i][j] = agree / len(both)
    return out


def test_task_affinity_matches_a_naive_count() -> None:
    gen = torch.Generator().manual_seed(0)
    losses = torch.rand(41, 5, generator=gen)
    labelled = torch.rand(41, 5, generator=gen) > 0.2
    got = task_affinity(losses, labelled)
    want = _naive_affinity(losses.tolist(), labelled.tolist())
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(got.diagonal(), torch.ones(5, dtype=torch.float64))


def test_task_affinity_of_constructed_losses() -> None:
    # a and b are hard on the same samples, c on the opposite ones, d on every other one
    losses = torch.tensor(
        [[1.0, 2.0, 0.0, 1.0], [1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 5.0, 1.0], [0.0, 1.0, 4.0, 0.0]]
    )
    a = task_affinity(losses)
    assert a[0, 1] == 1.0 and a[0, 2] == 0.0 and a[1, 2] == 0.0
    assert a[0, 3] == 0.5 and a[2, 3] == 0.5


def _naive_branch_affinity(a: list[list[float]], children: list[list[int]]) -> list[list[float]]:
    c = len(children)
    directed = [
        [
            sum(min(a[i][j] for j in children[m]) for i in children[k]) / len(children[k])
            for m in range(c)
        ]
        for k in range(c)
    ]
    return [[(directed[k][m] + directed[m][k]) / 2 for m in range(c)] for k in range(c)]


def test_branch_affinity_matches_the_papers_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(6, 6, generator=gen, dtype=torch.float64)
    a = (a + a.T) / 2
    children = [[0, 3], [1], [2, 4, 5]]
    got = branch_affinity(a, children)
    want = torch.tensor(_naive_branch_affinity(a.tolist(), children), dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)


def _brute_force(a: list[list[float]], cost: float) -> tuple[float, set[frozenset[int]]]:
    """The best grouping over every labelling of the children (duplicates included)."""
    c = len(a)
    best: tuple[float, set[frozenset[int]]] | None = None
    for labels in itertools.product(range(c), repeat=c):
        groups = [[k for k in range(c) if labels[k] == g] for g in range(c)]
        groups = [g for g in groups if g]
        d = len(groups)
        errors = []
        for g in groups:
            if len(g) == 1:
                errors.append(0.0)
            else:
                lows = [min(a[i][j] for j in g if j != i) for i in g]
                errors.append(1 - sum(lows) / len(lows))
        loss = (d - 1) * cost + sum(errors) / d
        if best is None or loss < best[0] - 1e-12:
            best = (loss, {frozenset(g) for g in groups})
    assert best is not None
    return best


@pytest.mark.parametrize("c", [3, 4])
@pytest.mark.parametrize("cost", [0.0, 0.05, 0.15, 0.4])
def test_search_finds_the_brute_force_optimum(c: int, cost: float) -> None:
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        a = torch.rand(c, c, generator=gen, dtype=torch.float64)
        a = (a + a.T) / 2
        grouping, per_d = search_grouping(a, cost)
        loss, groups = _brute_force(a.tolist(), cost)
        assert {frozenset(g) for g in grouping} == groups
        assert abs(grouping_loss(a, grouping, cost) - loss) < 1e-12
        assert abs(min(per_d.values()) - loss) < 1e-12


def test_partitions_are_every_set_partition_once() -> None:
    bell = [1, 1, 2, 5, 15, 52, 203]
    for c in range(1, 7):
        found = list(partitions(c))
        assert len(found) == bell[c] == len({frozenset(map(frozenset, p)) for p in found})


def _planted(sizes: list[int], inside: float, across: float) -> torch.Tensor:
    labels = [g for g, n in enumerate(sizes) for _ in range(n)]
    a = torch.tensor(
        [[inside if x == y else across for y in labels] for x in labels], dtype=torch.float64
    )
    a.fill_diagonal_(1.0)
    return a


def test_greedy_merging_recovers_planted_groups_like_the_exhaustive_search() -> None:
    a = _planted([3, 2, 2], inside=0.95, across=0.3)
    gen = torch.Generator().manual_seed(3)
    noise = torch.rand(7, 7, generator=gen, dtype=torch.float64) * 0.05
    a = a + (noise + noise.T) / 2
    exact, _ = search_grouping(a, 0.08, exact_limit=8)
    greedy, _ = search_grouping(a, 0.08, exact_limit=1)
    assert exact == greedy == ((0, 1, 2), (3, 4), (5, 6))
    assert search_grouping(a, 5.0, exact_limit=1)[0] == ((0, 1, 2, 3, 4, 5, 6),)


def _tasks() -> dict[str, Task]:
    return {
        n: Task(name=n, loss=MSELoss(), metrics={"regression": RegressionMetric}, output_dim=2)
        for n in NAMES
    }


def _model(**options: Any) -> FAFS:
    torch.manual_seed(0)
    return FAFS(
        tasks=_tasks(),
        backbone=lambda: MLP(input_shape=(5,), hidden=[8, 6]),
        head=linear_head,
        **{"branch_cost": 0.05, **options},
    )


def _losses_grouping(groups: list[list[str]]) -> Any:
    """Per-sample losses whose difficult samples agree exactly within each group."""
    pattern = [
        [1.0, 0.0, 1.0, 0.0, 1.0, 1.0],
        [1.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        [0.0, 1.0, 1.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0, 1.0, 1.0, 0.0],
    ]

    def sample_losses(n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for g, group in enumerate(groups):
            for t in group:
                loss = torch.tensor(pattern[g][:n])
                out[t] = (loss, torch.ones(len(loss), dtype=torch.bool))
        return out

    return sample_losses


def test_widening_keeps_the_outputs_and_the_partition() -> None:
    model = _model()
    x = torch.randn(7, 5)
    before = model(x)
    lines: list[str] = []
    context = AdaptContext(0, _losses_grouping([["a", "b"], ["c", "d"]]), lines.append)
    assert model.adapt(context)
    assert model.groups[1] == [("a", "b"), ("c", "d")] and model.groups[0] == [NAMES_T]
    after = model(x)
    assert all(torch.equal(before[t], after[t]) for t in NAMES)
    check_parameter_partition(model)
    assert "2 branch(es) {a, b} {c, d}" in lines[0]
    # the lower layer: the two branches' tasks now disagree, a is apart from b
    assert model.adapt(AdaptContext(1, _losses_grouping([["a"], ["b", "c", "d"]]), lines.append))
    assert all(torch.equal(before[t], model(x)[t]) for t in NAMES)
    assert model.decided and len(model.decisions) == 2
    check_parameter_partition(model)
    assert not model.adapt(AdaptContext(2, _losses_grouping([["a", "b", "c", "d"]])))
    # new branches are copies, not the same parameters
    first, second = model.layers[1][0], model.layers[1][1]
    assert first[0].weight is not second[0].weight
    assert torch.equal(first[0].weight, second[0].weight)


NAMES_T = tuple(NAMES)


def test_parameters_follow_the_branches() -> None:
    model = _model()
    model.adapt(AdaptContext(0, _losses_grouping([["a", "b"], ["c"], ["d"]])))
    shared = {id(p) for p in model.shared_parameters()}
    bottom = {id(p) for p in model.layers[0][0].parameters()}
    ab = {id(p) for p in model.layers[1][0].parameters()}
    c_own = {id(p) for p in model.layers[1][1].parameters()}
    assert shared == bottom | ab
    assert c_own <= {id(p) for p in model.task_parameters("c")}
    assert not c_own & {id(p) for p in model.task_parameters("d")}
    # task-specific branches read the shared features below them, marked per task
    with capture_representation(model) as rep:
        model(torch.randn(3, 5))
    assert rep is not None
    marks = {(p.name, tuple(sorted(t for t in p.leaves if t))) for p in rep.points}
    assert marks == {("layers.1.0", ("a", "b")), ("layers.0.0", ("c", "d"))}


def test_a_round_that_keeps_the_children_together_decides_everything() -> None:
    model = _model(branch_cost=10.0)
    assert not model.adapt(AdaptContext(0, _losses_grouping([["a", "b"], ["c", "d"]])))
    assert model.decided and model.groups == [[NAMES_T], [NAMES_T]]


def test_schedule() -> None:
    model = _model(widen_after=2, widen_every=3)
    fn = _losses_grouping([["a"], ["b"], ["c"], ["d"]])
    assert [model._due(e) for e in range(8)] == [
        False,
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert not model.adapt(AdaptContext(0, fn))
    assert model.adapt(AdaptContext(1, fn))


def test_structure_rebuilds_a_fresh_model() -> None:
    model = _model()
    model.adapt(AdaptContext(0, _losses_grouping([["a", "b"], ["c", "d"]])))
    model.adapt(AdaptContext(1, _losses_grouping([["a", "b"], ["c"], ["d"]])))
    fresh = _model()
    fresh.set_structure(model.structure())
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 5)
    assert all(torch.equal(model(x)[t], fresh(x)[t]) for t in NAMES)
    assert fresh.structure() == model.structure()


def test_rebuilt_optimizer_keeps_old_state_and_training_goes_on() -> None:
    config = from_dict(
        Config,
        tiny_config_dict(
            "runs", **{"model.architecture": "fafs", "optim.name": "adam", "optim.lr": 0.01}
        ),
    )
    model = _model()
    opt = build_optimizer(config.optim, model, _NoBalancer(), None)
    sched = build_scheduler(config.optim.scheduler, opt, 3, config.optim.lr)
    x, y = torch.randn(16, 5), {t: torch.randn(16, 2) for t in NAMES}

    def loss() -> torch.Tensor:
        out = model(x)
        return sum(((out[t] - y[t]) ** 2).mean() for t in NAMES)  # type: ignore[return-value]

    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        opt.step()
    sched.step()
    kept = model.layers[0][0][0].weight
    moments = opt.state[kept]["exp_avg"].clone()
    model.adapt(AdaptContext(0, _losses_grouping([["a", "b"], ["c", "d"]])))
    opt, sched = rebuild_optimizer(config, model, _NoBalancer(), opt, sched)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(p) for p in model.parameters()}
    assert torch.equal(opt.state[kept]["exp_avg"], moments)
    new = model.layers[1][1][0].weight
    assert new not in opt.state
    assert sched.last_epoch == 1
    start = loss().item()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert new in opt.state and loss().item() < start


class _NoBalancer(torch.nn.Module):
    lr = None


def test_greedy_search_comes_close_to_the_exhaustive_optimum() -> None:
    worst = 0.0
    for seed, cost in itertools.product(range(10), (0.02, 0.05, 0.15)):
        gen = torch.Generator().manual_seed(seed)
        a = torch.rand(7, 7, generator=gen, dtype=torch.float64)
        a = (a + a.T) / 2
        exact = min(search_grouping(a, cost, exact_limit=8)[1].values())
        greedy = min(search_grouping(a, cost, exact_limit=1)[1].values())
        assert greedy >= exact - 1e-12
        worst = max(worst, greedy - exact)
    assert worst < 0.01


def _feature_step(single_pass: bool) -> dict[str, torch.Tensor]:
    model = _model()
    model.adapt(AdaptContext(0, _losses_grouping([["a", "b"], ["c"], ["d"]])))
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 5, generator=gen), torch.randn(9, 2, generator=gen)
    with capture_representation(model) as rep:
        out = model(x)
    losses = {t: ((out[t] - y * (i + 1)) ** 2).mean() for i, t in enumerate(NAMES)}
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    balancer = BALANCERS.get("upgrad")(tasks=NAMES, level="feature")
    assert isinstance(balancer, GradientBalancer)
    balancer.feature_single_pass = single_pass
    balancer.backward(
        losses,
        BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep),
    )
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_feature_level_one_pass_equals_one_pass_per_task_after_a_split() -> None:
    one, per_task = _feature_step(True), _feature_step(False)
    assert (
        one.keys()
        == per_task.keys()
        == {n for n, _ in _model().named_parameters()}
        | {
            "layers.1.1.0.weight",
            "layers.1.1.0.bias",
            "layers.1.2.0.weight",
            "layers.1.2.0.bias",
        }
    )
    for name in one:
        assert torch.allclose(one[name], per_task[name], atol=1e-6), name
