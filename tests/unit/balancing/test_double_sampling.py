"""MoDo and SDMGrad: the weights against TorchJD's weightings, a step against a naive
computation from independent per-part autograd, and the trainer's batch parts."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchjd.aggregation import MoDoWeighting, SDMGradWeighting

from helpers import resumed_equals_uninterrupted, tiny_config_dict
from polytask.api import train
from polytask.balancing import BALANCERS
from polytask.balancing.aggregation.double_sampling import MoDo, SDMGrad, cross_product
from polytask.balancing.base import BackwardContext, LossWeighting
from polytask.errors import ConfigError

TASKS = ["a", "b", "c"]


def _jacobians(seed: int, k: int = 3, n: int = 7) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, n, generator=g, dtype=torch.float64) for _ in range(3)]


def test_cross_product_is_the_float64_matrix_product() -> None:
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(4, 5000, generator=g), torch.randn(3, 5000, generator=g)
    expected = left.double() @ right.double().T
    assert torch.allclose(cross_product(left, right), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("gamma, rho", [(0.1, 0.1), (0.5, 0.0), (0.02, 1.0)])
def test_modo_weights_follow_torchjd_over_steps(gamma: float, rho: float) -> None:
    ours = MoDo(TASKS, gamma=gamma, rho=rho)
    oracle = MoDoWeighting(gamma=gamma, rho=rho)
    for step in range(6):
        j1, j2, j3 = _jacobians(step)
        combined, weights = ours._combine(j1, j2, j3, TASKS)
        expected = oracle(j1 @ j2.T)
        assert torch.allclose(weights, expected, rtol=0, atol=1e-12), step
        assert torch.allclose(combined, expected @ j3, rtol=0, atol=1e-12)
    assert ours.step_count == 6


@pytest.mark.parametrize(
    "options",
    [{}, {"lambda_": 0.0}, {"lr": 1.0, "momentum": 0.0, "n_iter": 5}, {"lambda_": 2.0}],
)
def test_sdmgrad_weights_follow_torchjd_over_steps(options: dict[str, float]) -> None:
    ours = SDMGrad(TASKS, **options)  # type: ignore[arg-type]
    oracle = SDMGradWeighting(**{k: v for k, v in options.items()})  # type: ignore[arg-type]
    for step in range(6):
        j1, j2, j3 = _jacobians(10 + step)
        combined, weights = ours._combine(j1, j2, j3, TASKS)
        expected = oracle(j1 @ j2.T)
        assert torch.allclose(weights, expected, rtol=0, atol=1e-10), step
        assert torch.allclose(combined, expected @ j3, rtol=0, atol=1e-10)


def test_sdmgrad_preference_vector_matches_torchjd() -> None:
    pref = [0.5, 0.3, 0.2]
    ours = SDMGrad(TASKS, pref_vector={"a": 5, "b": 3, "c": 2})
    oracle = SDMGradWeighting(pref_vector=torch.tensor(pref, dtype=torch.float64))
    for step in range(4):
        j1, j2, j3 = _jacobians(30 + step)
        _, weights = ours._combine(j1, j2, j3, TASKS)
        assert torch.allclose(weights, oracle(j1 @ j2.T), rtol=0, atol=1e-10)


def test_missing_tasks_keep_their_weight_and_the_others_stay_on_their_mass() -> None:
    modo = MoDo(TASKS, gamma=0.3)
    j1, j2, j3 = _jacobians(3)
    modo._combine(j1, j2, j3, TASKS)
    before = modo.lambdas.clone()
    sub = [0, 2]
    _, weights = modo._combine(j1[sub], j2[sub], j3[sub], ["a", "c"])
    after = modo.lambdas
    assert after[1] == before[1]
    assert float(after[[0, 2]].sum()) == pytest.approx(float(before[[0, 2]].sum()), abs=1e-15)
    # the present tasks move as MoDo on their own simplex, scaled by their mass
    oracle = MoDoWeighting(gamma=0.3, rho=0.1)
    oracle._lambda = before[[0, 2]] / before[[0, 2]].sum()
    oracle._state_key = (2, torch.float64, torch.device("cpu"))
    expected = oracle(j1[sub] @ j2[sub].T)
    assert torch.allclose(weights, expected, atol=1e-12)


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="samples"):
        MoDo(TASKS, samples=4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="level=parameter"):
        MoDo(TASKS, level="feature")
    with pytest.raises(ConfigError, match="gamma"):
        MoDo(TASKS, gamma=0.0)
    with pytest.raises(ConfigError, match="momentum"):
        SDMGrad(TASKS, momentum=1.0)
    with pytest.raises(ConfigError, match="pref_vector"):
        SDMGrad(TASKS, pref_vector=[1.0, 2.0])
    with pytest.raises(ConfigError, match="pref_vector"):
        SDMGrad(TASKS, pref_vector={"z": 1.0})


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 5)
        self.heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in TASKS})

    def losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        z = torch.tanh(self.trunk(x))
        return {
            t: ((self.heads[t](z).squeeze(1) - y[:, i]) ** 2).mean() for i, t in enumerate(TASKS)
        }


def _naive_rows(net: _Net, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Each task's gradient of the trunk (one autograd call per task) and the heads'
    gradients of the summed losses."""
    shared = list(net.trunk.parameters())
    losses = net.losses(x, y)
    rows = []
    for t in TASKS:
        grads = torch.autograd.grad(losses[t], shared, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    heads = [p for t in TASKS for p in net.heads[t].parameters()]
    head_grads = torch.autograd.grad(sum(losses.values()), heads)
    return torch.stack(rows).double(), list(head_grads)


@pytest.mark.parametrize("method", ["modo", "sdmgrad"])
@pytest.mark.parametrize("samples", [3, 2])
def test_a_step_matches_the_naive_double_sampling_update(method: str, samples: int) -> None:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(12, 4, generator=g), torch.randn(12, 3, generator=g)
    cuts = [(0, 4), (4, 8), (8, 12)] if samples == 3 else [(0, 6), (6, 12)]
    net = _Net()
    naive = [_naive_rows(net, x[a:b], y[a:b]) for a, b in cuts]
    j1, j2 = naive[0][0], naive[1][0]
    if samples == 3:
        update, head_grads = naive[2][0], naive[2][1]
    else:
        update = (naive[0][0] + naive[1][0]) / 2
        head_grads = [(u + v) / 2 for u, v in zip(naive[0][1], naive[1][1], strict=True)]
    oracle = MoDoWeighting(gamma=0.1, rho=0.1) if method == "modo" else SDMGradWeighting()
    weights = oracle(j1 @ j2.T)
    expected_trunk = weights @ update

    balancer = BALANCERS.get(method)(tasks=TASKS, samples=samples)
    parts = [net.losses(x[a:b], y[a:b]) for a, b in cuts]
    whole = {t: torch.stack([p[t] for p in parts]).mean() for t in TASKS}
    shared = list(net.trunk.parameters())
    heads = [p for t in TASKS for p in net.heads[t].parameters()]
    ctx = BackwardContext(shared_parameters=shared, other_parameters=heads, parts=parts)
    got = balancer.backward(whole, ctx)
    trunk = torch.cat([p.grad.reshape(-1) for p in shared]).double()
    assert torch.allclose(trunk, expected_trunk, rtol=1e-5, atol=1e-7)
    for p, expected in zip(heads, head_grads, strict=True):
        assert torch.allclose(p.grad, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(torch.stack([got[t] for t in TASKS]).double(), weights, atol=1e-6)


def test_state_round_trips() -> None:
    modo = MoDo(TASKS)
    j1, j2, j3 = _jacobians(8)
    modo._combine(j1, j2, j3, TASKS)
    other = MoDo(TASKS)
    other.set_extra_state(modo.get_extra_state())
    assert torch.equal(other.lambdas, modo.lambdas) and other.step_count == 1
    with pytest.raises(ValueError, match="lambdas"):
        other.set_extra_state({"lambdas": torch.zeros(2), "step_count": 1})


# -- the trainer cuts each batch into the parts a balancer asks for ---------------------

SEEN: list[tuple[int, list[float], dict[str, float], dict[str, float]]] = []


class _PartsRecorder(LossWeighting):
    batch_parts = 3

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {t: torch.ones(()) for t in losses}

    def backward(self, losses: Mapping[str, Tensor], ctx: BackwardContext) -> dict[str, Tensor]:
        SEEN.append(
            (
                len(ctx.parts),
                [float(p["left"].detach()) for p in ctx.parts],
                {t: float(v.detach()) for t, v in losses.items()},
                {t: float(torch.stack([p[t].detach() for p in ctx.parts]).mean()) for t in losses},
            )
        )
        return super().backward(losses, ctx)


@pytest.fixture
def recorder() -> Iterator[None]:
    BALANCERS.register("test_parts_recorder")(_PartsRecorder)
    SEEN.clear()
    yield
    BALANCERS.unregister("test_parts_recorder")


@pytest.mark.usefixtures("recorder")
def test_the_trainer_gives_disjoint_parts_whose_weighted_mean_is_the_batch_loss(
    tmp_path: Path,
) -> None:
    config = tiny_config_dict(
        tmp_path,
        **{
            "balancer.name": "test_parts_recorder",
            "data.options.n_train": 70,  # batches of 32, 32 and 6
            "train.epochs": 1,
        },
    )
    train(config)
    assert [n for n, *_ in SEEN] == [3, 3, 3]
    # 32 = 10 + 11 + 11 and 6 = 2 + 2 + 2: the whole loss is the sample-weighted mean
    sizes = [[10, 11, 11], [10, 11, 11], [2, 2, 2]]
    for (_, part_left, whole, _), size in zip(SEEN, sizes, strict=True):
        weighted = sum(v * n for v, n in zip(part_left, size, strict=True)) / sum(size)
        assert whole["left"] == pytest.approx(weighted, rel=1e-6)


@pytest.mark.usefixtures("recorder")
def test_a_step_smaller_than_the_parts_gets_fewer(tmp_path: Path) -> None:
    config = tiny_config_dict(
        tmp_path,
        **{
            "balancer.name": "test_parts_recorder",
            "data.options.n_train": 66,  # batches of 32, 32 and 2
            "train.epochs": 1,
        },
    )
    train(config)
    assert [n for n, *_ in SEEN] == [3, 3, 2]


@pytest.mark.parametrize("method", ["modo", "sdmgrad"])
def test_an_interrupted_run_resumed_ends_like_an_uninterrupted_one(
    method: str, tmp_path: Path
) -> None:
    config = {"balancer.name": method, "data.options.n_train": 96}  # 3 steps per epoch
    resumed_equals_uninterrupted(tmp_path, config)
