"""Tensor-factorised multi-task networks (DMTRL): the decompositions against element-wise
formulas and closed forms, exact reconstruction at full rank, initialisation from given
single-task networks, parameter counts by formula, gradient isolation, and one-batch
overfitting from the command line."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from polytask.cli import main
from polytask.errors import ConfigError
from polytask.losses import CrossEntropyLoss
from polytask.metrics import Accuracy
from polytask.models import check_parameter_partition, linear_head
from polytask.models.backbones import MLP, LeNet
from polytask.models.sharing import SingleTask, TensorFactorised
from polytask.models.sharing.tensor_factorised import (
    FactorisedLayer,
    full_ranks,
    laf_decompose,
    tt_decompose,
    tt_to_tensor,
    tucker_decompose,
    tucker_to_tensor,
)
from polytask.tasks import Task

TASKS = {
    name: Task(
        name=name,
        loss=CrossEntropyLoss(),
        metrics={"accuracy": Accuracy},
        output_dim=n,
        kind="classification",
    )
    for name, n in (("a", 3), ("b", 4), ("c", 2))
}
METHODS = ("tucker", "tt", "laf")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


# -- the decompositions ----------------------------------------------------------------------


def test_tucker_to_tensor_is_the_elementwise_sum() -> None:
    core = randn(2, 3, 2, seed=1)
    factors = [randn(4, 2, seed=2), randn(3, 3, seed=3), randn(5, 2, seed=4)]
    w = tucker_to_tensor(core, factors)
    s, (u, v, z) = core.tolist(), [f.tolist() for f in factors]
    naive = [
        [
            [
                sum(
                    s[a][b][c] * u[i][a] * v[j][b] * z[k][c]
                    for a, b, c in itertools.product(range(2), range(3), range(2))
                )
                for k in range(5)
            ]
            for j in range(3)
        ]
        for i in range(4)
    ]
    torch.testing.assert_close(w, torch.tensor(naive, dtype=torch.float64), rtol=0, atol=1e-12)


def test_tt_to_tensor_is_the_product_of_core_slices() -> None:
    cores = [randn(1, 4, 2, seed=1), randn(2, 3, 3, seed=2), randn(3, 5, 1, seed=3)]
    w = tt_to_tensor(cores)
    assert w.shape == (4, 3, 5)
    for i, j, k in itertools.product(range(4), range(3), range(5)):
        value = cores[0][:, i, :] @ cores[1][:, j, :] @ cores[2][:, k, :]
        assert abs(float(w[i, j, k]) - float(value)) < 1e-12


@pytest.mark.parametrize("shape", [(4, 6, 2), (3, 2, 3, 3, 3), (5, 1, 2)])
def test_full_rank_decompositions_are_exact(shape: tuple[int, ...]) -> None:
    w = randn(*shape, seed=sum(shape))
    core, factors = tucker_decompose(w, full_ranks(shape, "tucker"))
    torch.testing.assert_close(tucker_to_tensor(core, factors), w, rtol=0, atol=1e-10)
    cores = tt_decompose(w, full_ranks(shape, "tt"))
    torch.testing.assert_close(tt_to_tensor(cores), w, rtol=0, atol=1e-10)
    (rank,) = full_ranks(shape, "laf")
    left, right = laf_decompose(w, rank)
    torch.testing.assert_close((left @ right).reshape(shape), w, rtol=0, atol=1e-10)


def test_full_ranks_by_formula() -> None:
    assert full_ranks((4, 6, 2), "tucker") == (4, 6, 2)
    assert full_ranks((50, 3, 2), "tucker") == (6, 3, 2)  # 50 > 3 * 2
    assert full_ranks((4, 6, 2), "tt") == (4, 2)  # min(4, 12), min(24, 2)
    assert full_ranks((3, 2, 3, 3), "tt") == (3, 6, 3)
    assert full_ranks((4, 6, 5), "laf") == (5,)
    assert full_ranks((2, 1, 3), "laf") == (2,)


def test_truncated_decompositions_recover_low_rank_tensors() -> None:
    """A tensor built with Tucker ranks (2, 2, 2) or TT ranks (2, 2) is recovered exactly at
    those ranks; the HOSVD factors are orthonormal."""
    low_tucker = tucker_to_tensor(
        randn(2, 2, 2, seed=5), [randn(6, 2, seed=6), randn(5, 2, seed=7), randn(3, 2, seed=8)]
    )
    core, factors = tucker_decompose(low_tucker, (2, 2, 2))
    torch.testing.assert_close(tucker_to_tensor(core, factors), low_tucker, rtol=0, atol=1e-10)
    for u in factors:
        torch.testing.assert_close(u.T @ u, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)
    low_tt = tt_to_tensor(
        [randn(1, 6, 2, seed=9), randn(2, 5, 2, seed=10), randn(2, 3, 1, seed=11)]
    )
    cores = tt_decompose(low_tt, (2, 2))
    assert [tuple(c.shape) for c in cores] == [(1, 6, 2), (2, 5, 2), (2, 3, 1)]
    torch.testing.assert_close(tt_to_tensor(cores), low_tt, rtol=0, atol=1e-10)


def test_laf_truncation_is_the_best_low_rank_approximation() -> None:
    """Eckart-Young: the error of the rank-r factors is the norm of the discarded singular
    values of the (d_1 ... d_{N-1}) x K matricisation."""
    w = randn(5, 4, 3, seed=12)
    singular = torch.linalg.svdvals(w.reshape(20, 3))
    for r in (1, 2):
        left, right = laf_decompose(w, r)
        error = float((left @ right - w.reshape(20, 3)).norm())
        assert error == pytest.approx(float(singular[r:].norm()), rel=1e-10)


# -- the architecture ------------------------------------------------------------------------


def mlp() -> nn.Module:
    return MLP(input_shape=(6,), hidden=(4, 3))


def lenet() -> nn.Module:
    return LeNet(input_shape=(1, 16, 16), channels=(3, 4), kernels=(3, 3), out_features=5)


def build(method: str, backbone: Any = mlp, **options: Any) -> TensorFactorised:
    torch.manual_seed(0)
    return TensorFactorised(
        tasks=TASKS, backbone=backbone, head=linear_head, method=method, **options
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("backbone", "shape"), [(mlp, (6,)), (lenet, (1, 16, 16))], ids=["mlp", "lenet"]
)
def test_full_rank_initialisation_reproduces_given_single_task_networks(
    method: str, backbone: Any, shape: tuple[int, ...]
) -> None:
    """Started from single-task networks given in code, the full-rank model computes what
    they compute, and every task's weights are theirs (to float32 rounding)."""
    torch.manual_seed(1)
    single = SingleTask(tasks=TASKS, backbone=backbone, head=linear_head)
    model = build(method, backbone)
    model.init_from_single_task(single.columns)
    x = torch.randn(5, *shape, generator=gen(2))
    expected, found = single(x), model(x)
    for task in TASKS:
        torch.testing.assert_close(found[task], expected[task], rtol=1e-4, atol=1e-5)
    for path, per_task in model.weights().items():
        for task, w in per_task.items():
            dense = single.columns[task][0].get_submodule(path).weight
            torch.testing.assert_close(w, dense.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_default_initialisation_is_independent_default_networks_at_full_rank(method: str) -> None:
    model = build(method, lenet)
    for path, per_task in model.weights().items():
        ws = list(per_task.values())
        assert not torch.allclose(ws[0], ws[1])  # three different random networks
        fan_in = math.prod(ws[0].shape[1:])
        # PyTorch's default: uniform in +-1/sqrt(fan_in), so the entries' std is 1/sqrt(3 fan_in)
        std = float(torch.stack(ws).std())
        assert 0.6 < std * math.sqrt(3 * fan_in) < 1.4, (path, std)


def test_parameter_counts_by_formula() -> None:
    """mlp 6 -> 4 -> 3, three tasks: layer 0 stacks to (4, 6, 3), layer 1 to (3, 4, 3)."""
    per_task = {t: 4 + 3 + 3 * TASKS[t].output_dim + TASKS[t].output_dim for t in TASKS}
    # Tucker, full ranks (4, 6, 3) and (3, 4, 3): cores plus the two shared factors
    tucker = build("tucker")
    assert tucker.describe() == {
        "shared": (4 * 6 * 3 + 4 * 4 + 6 * 6) + (3 * 4 * 3 + 3 * 3 + 4 * 4),
        **{t: n + 3 + 3 for t, n in per_task.items()},
    }
    # TT, full ranks (4, 3) and (3, 3): cores 1 x d1 x r1 and r1 x d2 x r2; r2 per task
    tt = build("tt")
    assert tt.describe() == {
        "shared": (4 * 4 + 4 * 6 * 3) + (3 * 3 + 3 * 4 * 3),
        **{t: n + 3 + 3 for t, n in per_task.items()},
    }
    # TT capped at rank 2: (1 x 4 x 2, 2 x 6 x 2) and (1 x 3 x 2, 2 x 4 x 2)
    assert build("tt", rank=2).describe()["shared"] == (8 + 24) + (6 + 16)
    # LAF at rank 2: L is (24 x 2) and (12 x 2); each task's column of S has 2 numbers
    laf = build("laf", rank=2)
    assert laf.describe() == {
        "shared": 24 * 2 + 12 * 2,
        **{t: n + 2 + 2 for t, n in per_task.items()},
    }
    for layer in laf.layers.values():
        assert isinstance(layer, FactorisedLayer)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_isolation(method: str) -> None:
    """A task's loss reaches the shared factors and its own parameters, no other task's."""
    model = build(method, lenet, rank=2)
    check_parameter_partition(model)
    x = torch.randn(4, 1, 16, 16, generator=gen(3))
    for task in TASKS:
        model.zero_grad()
        model(x)[task].square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.shared_parameters())
        for other in TASKS:
            grads = [p.grad for p in model.task_parameters(other)]
            if other == task:
                assert all(g is not None for g in grads)
            else:
                assert all(g is None or not g.any() for g in grads), (task, other)


def test_multi_input_forward_computes_one_task() -> None:
    model = build("tucker", rank=2)
    x = torch.randn(3, 6, generator=gen(4))
    torch.testing.assert_close(model(x, task="b")["b"], model(x)["b"])
    assert set(model(x, task="b")) == {"b"}


def test_deep_copy_and_state_dict_round_trip() -> None:
    import copy

    model = build("tt", rank=2)
    x = torch.randn(3, 6, generator=gen(5))
    model(x)["a"].sum().backward()  # a forward leaves detached weights on the columns
    twin = copy.deepcopy(model)
    other = build("tt", rank=2)
    other.load_state_dict(twin.state_dict())
    for task in TASKS:
        torch.testing.assert_close(other(x)[task], model(x)[task])


@pytest.mark.parametrize(
    ("options", "message"),
    [({"method": "cp"}, "`method`"), ({"rank": 0}, "`rank`")],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TensorFactorised(tasks=TASKS, backbone=mlp, head=linear_head, **options)


def test_single_task_is_refused() -> None:
    with pytest.raises(ConfigError, match="several tasks"):
        TensorFactorised(tasks={"a": TASKS["a"]}, backbone=mlp, head=linear_head)


# -- end to end --------------------------------------------------------------------------------


def cli(*args: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def one_batch(tmp_path: Path, *overrides: str) -> Path:
    code, out, err = cli(
        "train",
        "configs/multidigits.yaml",
        "data.options={n_train: 16, n_val: 16, n_test: 16}",
        "data.batch_size=16",
        "model.backbone=mlp",
        "model.backbone_options={hidden: [32]}",
        "optim.lr=0.03",
        "optim.scheduler=null",
        "train.progress=false",
        f"output_dir={tmp_path}",
        *overrides,
    )
    assert code == 0, err
    (line,) = [x for x in out.splitlines() if x.startswith("run directory: ")]
    return Path(line.removeprefix("run directory: "))


def test_one_batch_overfitting_from_the_command_line(tmp_path: Path) -> None:
    """Tensor-train factors at rank 4 on one batch of 16 digits, 30 epochs: both tasks'
    training losses fall by a factor of more than 1,000 (measured: from 2.3 to 6e-5 and
    5e-6)."""
    run = one_batch(
        tmp_path,
        "model.architecture=tensor_factorised",
        "model.options={method: tt, rank: 4}",
        "train.epochs=30",
    )
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = history[0]["train"]["loss"], history[-1]["train"]["loss"]
    for task in ("left", "right"):
        assert last[task] < first[task] / 1000, (task, first, last)


def test_init_columns_from_a_single_task_run(tmp_path: Path) -> None:
    """A single_task run's checkpoint, decomposed at full rank, gives back its weights."""
    run = one_batch(tmp_path, "model.architecture=single_task", "train.epochs=1")
    checkpoint = run / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    tasks = {
        t: Task(name=t, loss=CrossEntropyLoss(), metrics={"accuracy": Accuracy}, output_dim=10)
        for t in ("left", "right")
    }
    model = TensorFactorised(
        tasks=tasks,
        backbone=lambda: MLP(input_shape=(1, 16, 16), hidden=(32,)),
        head=linear_head,
        method="tucker",
        init_columns={t: str(checkpoint) for t in tasks},
    )
    weights = model.weights()
    for task in tasks:
        torch.testing.assert_close(
            weights["net.1"][task], state[f"columns.{task}.0.net.1.weight"], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(model.columns[task][1].weight, state[f"columns.{task}.1.weight"])
