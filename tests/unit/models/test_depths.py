"""Tasks at different depths (low supervision, the Joint Many-Task model): forward passes
against naive computations, equality with hard sharing at full depth, the parameter
partition and gradient isolation, the successive-regularisation penalty and its gradient
against a naive computation, and training from the command line."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import tiny_config_dict
from polytask.api import resume, train
from polytask.cli import main
from polytask.errors import ConfigError
from polytask.losses import CrossEntropyLoss, MSELoss
from polytask.metrics import Accuracy, RegressionMetric
from polytask.models import (
    ARCHITECTURES,
    capture_representation,
    check_parameter_partition,
    linear_head,
)
from polytask.models.backbones import MLP, LeNet
from polytask.models.sharing import HardSharing, TaskDepths
from polytask.tasks import Task
from polytask.training.checkpoint import load_checkpoint
from polytask.training.rundir import RunDirectory
from polytask.training.trainer import StepEnd

TASKS = {
    "a": Task(
        name="a",
        loss=CrossEntropyLoss(),
        metrics={"accuracy": Accuracy},
        output_dim=3,
        kind="classification",
    ),
    "b": Task(
        name="b",
        loss=MSELoss(),
        metrics={"regression": RegressionMetric},
        output_dim=2,
        kind="regression",
    ),
    "c": Task(
        name="c",
        loss=CrossEntropyLoss(),
        metrics={"accuracy": Accuracy},
        output_dim=4,
        kind="classification",
    ),
}
DEPTHS = {"a": 1, "b": 2}  # c at the last point, 3


def mlp() -> nn.Module:
    return MLP(input_shape=(2, 3), hidden=(5, 4, 6))


def lenet() -> nn.Module:
    return LeNet(input_shape=(1, 16, 16), channels=(3, 4), kernels=(3, 3), out_features=5)


def build(
    backbone: Callable[[], nn.Module] = mlp,
    shape: tuple[int, ...] = (2, 3),
    arch: str = "task_depths",
    **options: Any,
) -> TaskDepths:
    torch.manual_seed(0)
    model = ARCHITECTURES.get(arch)(
        tasks=TASKS, backbone=backbone, head=linear_head, input_shape=shape, **options
    )
    assert isinstance(model, TaskDepths)
    return model


def x_mlp(n: int = 5) -> Tensor:
    return torch.randn(n, 2, 3, generator=torch.Generator().manual_seed(1))


def linears(model: TaskDepths) -> list[nn.Linear]:
    return [m for m in model.backbone.modules() if isinstance(m, nn.Linear)]


# -- forward passes ----------------------------------------------------------------------------


def test_full_depth_is_hard_sharing() -> None:
    torch.manual_seed(0)
    hps = HardSharing(tasks=TASKS, backbone=mlp, head=linear_head)
    model = build()
    theirs_linears = [m for m in hps.encoder.modules() if isinstance(m, nn.Linear)]
    for mine, theirs in zip(linears(model), theirs_linears, strict=True):
        mine.load_state_dict(theirs.state_dict())
    for task in TASKS:
        model.heads[task].load_state_dict(hps.heads[task].state_dict())
    x = x_mlp()
    for task in TASKS:
        torch.testing.assert_close(model(x)[task], hps(x)[task])


def test_low_supervision_reads_each_task_at_its_depth() -> None:
    """A naive pass: h_1 = relu(W_1 vec(x) + b_1), h_2 = relu(W_2 h_1 + b_2), ...; task a
    reads h_1, b reads h_2, c reads h_3."""
    model = build(depths=DEPTHS)
    x = x_mlp()
    h = x.reshape(5, 6)
    hidden = []
    for layer in linears(model):
        h = torch.relu(h @ layer.weight.T + layer.bias)
        hidden.append(h)
    out = model(x)
    for task, d in {"a": 1, "b": 2, "c": 3}.items():
        head = model.heads[task]
        assert isinstance(head, nn.Linear)
        torch.testing.assert_close(out[task], hidden[d - 1] @ head.weight.T + head.bias)
    torch.testing.assert_close(model(x, task="b")["b"], out["b"])


def test_jmt_forward_against_a_naive_pass() -> None:
    """Stage j > 0 reads h + P_j(vec x) + sum over lower tasks s of Q_{j,s}(E_s p_s), with
    p_s the softmax of a classification task's logits and the regression's raw output."""
    model = build(arch="jmt", depths=DEPTHS, label_embedding=3)
    x = x_mlp()
    v = x.reshape(5, 6)
    layers = linears(model)[:3]

    def lin(module: nn.Module, z: Tensor) -> Tensor:
        assert isinstance(module, nn.Linear)
        out = z @ module.weight.T
        return out if module.bias is None else out + module.bias

    h1 = torch.relu(lin(layers[0], v))
    a = lin(model.heads["a"], h1)
    emb_a = lin(model.embeddings["a"], a.softmax(1))
    u2 = h1 + lin(model.input_maps["1"], v) + lin(model.label_maps["1"]["a"], emb_a)
    h2 = torch.relu(lin(layers[1], u2))
    b = lin(model.heads["b"], h2)
    emb_b = lin(model.embeddings["b"], b)  # regression: the prediction itself
    u3 = (
        h2
        + lin(model.input_maps["2"], v)
        + lin(model.label_maps["2"]["a"], emb_a)
        + lin(model.label_maps["2"]["b"], emb_b)
    )
    h3 = torch.relu(lin(layers[2], u3))
    c = lin(model.heads["c"], h3)
    out = model(x)
    for task, expected in (("a", a), ("b", b), ("c", c)):
        torch.testing.assert_close(out[task], expected)
    torch.testing.assert_close(model(x, task="c")["c"], c)


def test_lenet_points_and_readout() -> None:
    """On LeNet task a reads conv 1's pooled map through a 2 x 2 average-pooled readout."""
    model = build(lenet, (1, 16, 16), depths={"a": 1}, readout_grid=2)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    net = model.backbone
    assert isinstance(net, LeNet)
    pooled = F.max_pool2d(torch.relu(net.convs[0](x)), 2)  # (3, 3, 7, 7)
    head = model.heads["a"]
    assert isinstance(head, nn.Linear) and head.in_features == 3 * 2 * 2
    expected = head(F.adaptive_avg_pool2d(pooled, 2).flatten(1))
    torch.testing.assert_close(model(x)["a"], expected)
    torch.testing.assert_close(model(x)["c"], model.heads["c"](net(x)))


# -- partition and gradient isolation ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["task_depths", "jmt"])
@pytest.mark.parametrize(
    ("backbone", "shape"), [(mlp, (2, 3)), (lenet, (1, 16, 16))], ids=["mlp", "lenet"]
)
def test_partition_matches_the_gradients(
    arch: str, backbone: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    """Each task's loss reaches exactly its own parameters and some shared ones, never another
    task's; a parameter the model declares a task's own is reached by that task only."""
    model = build(backbone, shape, arch, depths=DEPTHS)
    check_parameter_partition(model)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(3))
    reached: dict[str, set[int]] = {}
    for task in TASKS:
        model.zero_grad()
        model(x)[task].square().sum().backward()
        reached[task] = {id(p) for p in model.parameters() if p.grad is not None and p.grad.any()}
        own = {id(p) for p in model.task_parameters(task)}
        assert own <= reached[task], task
        for other in TASKS:
            if other != task:
                assert not reached[task] & {id(p) for p in model.task_parameters(other)}
    shared = [p for p in model.shared_parameters()]
    # every shared parameter is reached by two tasks or more (none is unused here)
    for p in shared:
        assert sum(id(p) in r for r in reached.values()) >= 2


def test_a_task_reaches_only_the_stages_below_its_depth() -> None:
    """Low supervision on mlp: task a reaches linear 1 and its head only; task b linear 1
    and 2 and its head; linear 3 (above b) is c's own."""
    model = build(depths=DEPTHS)
    layers = linears(model)
    x = x_mlp()
    for task, depth in (("a", 1), ("b", 2), ("c", 3)):
        model.zero_grad()
        model(x)[task].sum().backward()
        for j, layer in enumerate(layers):
            assert (layer.weight.grad is not None) == (j < depth), (task, j)
        for other in TASKS:
            assert (model.heads[other].weight.grad is not None) == (other == task)
    groups = model.parameter_groups()
    assert {id(p) for p in groups["c"]} >= {id(layers[2].weight), id(layers[2].bias)}
    assert {id(p) for p in groups["shared"]} == {
        id(p) for layer in layers[:2] for p in layer.parameters()
    }


# -- successive regularisation -------------------------------------------------------------------


def naive_sets(model: TaskDepths) -> tuple[set[str], set[str]]:
    """JMT's penalised parameters, task by task, written out by module for DEPTHS on mlp
    with label embeddings: what a's prediction depends on (linear 1, a's head) for task b;
    what a's and b's depend on (linears 1 and 2, the shortcut maps into linear 2, a's
    embedding, both heads) for task c."""
    named = dict(model.named_parameters())
    stage1 = {n for n in named if n.startswith("backbone.mlp.net.1.")}
    stage2 = {n for n in named if n.startswith("backbone.mlp.net.3.")}
    head_a = {n for n in named if n.startswith("heads.a.")}
    head_b = {n for n in named if n.startswith("heads.b.")}
    emb_a = {n for n in named if n.startswith("embeddings.a.")}
    maps_into_2 = {n for n in named if n.startswith(("input_maps.1.", "label_maps.1."))}
    assert stage1 and stage2 and head_a and head_b and emb_a and len(maps_into_2) == 2
    return stage1 | head_a, stage1 | stage2 | maps_into_2 | emb_a | head_a | head_b


def squared_distance(model: TaskDepths, anchors: dict[str, Tensor], names: set[str]) -> Tensor:
    named = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float64)
    for n in names:
        total = total + (named[n].double() - anchors[n]).square().sum()
    return total


def naive_penalty(model: TaskDepths, anchors: dict[str, Tensor], delta: float) -> Tensor:
    """delta times the sum over tasks of each task's term."""
    return delta * sum(
        (squared_distance(model, anchors, theta) for theta in naive_sets(model)),
        torch.zeros((), dtype=torch.float64),
    )


def test_successive_penalty_and_gradient_against_a_naive_computation() -> None:
    delta = 0.3
    model = build(arch="jmt", depths=DEPTHS, successive=delta)
    anchors = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    penalty = model.regularization()
    assert (
        penalty is not None and float(penalty.detach()) == 0.0
    )  # anchors start at the initial values
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    mine = model.regularization()
    assert mine is not None
    naive = naive_penalty(model, anchors, delta)
    assert float(mine.detach()) == pytest.approx(float(naive.detach()), rel=1e-6)
    mine_grads = torch.autograd.grad(mine, list(model.parameters()), allow_unused=True)
    naive_grads = torch.autograd.grad(naive, list(model.parameters()), allow_unused=True)
    for (name, _), g, h in zip(model.named_parameters(), mine_grads, naive_grads, strict=True):
        if h is None:
            assert g is None, name
        else:
            assert g is not None, name
            torch.testing.assert_close(g.double(), h.double(), rtol=1e-5, atol=1e-7)
    # the closed form: 2 delta c_p (p - p'); the first linear layer lies below b and c
    first = linears(model)[0].weight
    (g_first,) = torch.autograd.grad(model.regularization(), [first])  # type: ignore[arg-type]
    anchor = anchors["backbone.mlp.net.1.weight"]
    torch.testing.assert_close(g_first.double(), 2 * delta * 2 * (first.detach().double() - anchor))
    # the end-of-epoch hook moves the anchors to the current values
    distance = model.anchor_distance()
    union = naive_sets(model)[1]  # task b's set lies in task c's
    assert distance**2 == pytest.approx(
        float(squared_distance(model, anchors, union).detach()), rel=1e-6
    )
    assert model.adapt(object()) is False
    refreshed = model.regularization()
    assert refreshed is not None and float(refreshed.detach()) == 0.0
    assert model.diagnostics() == {"anchor_distance": pytest.approx(distance)}


def test_anchors_are_saved_and_restored() -> None:
    model = build(arch="jmt", depths=DEPTHS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = model.state_dict()
    twin = build(arch="jmt", depths=DEPTHS)
    twin.load_state_dict(state)
    first, second = model.regularization(), twin.regularization()
    assert first is not None and second is not None and float(first.detach()) > 0
    assert float(first.detach()) == pytest.approx(float(second.detach()))


def test_no_penalty_without_successive_regularisation() -> None:
    assert build(depths=DEPTHS).regularization() is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"depths": {"d": 1}}, "unknown task 'd'"),
        ({"depths": {"a": 4}}, "from 1 to 3"),
        ({"depths": {"a": 0}}, "from 1 to 3"),
        ({"successive": -1.0}, "`successive`"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(**options)


# -- end to end --------------------------------------------------------------------------------


def cli(*args: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_jmt_overfits_one_batch_from_the_command_line(tmp_path: Path) -> None:
    """JMT on a staged mlp, left supervised at the first layer, right at the second, one
    batch of 16 digits, 30 epochs: both training losses fall by a factor of more than 100
    (measured: from 2.3 to 5e-5 and 8e-6); the penalised
    parameters move away from their anchors every epoch."""
    code, out, err = cli(
        "train",
        "configs/multidigits.yaml",
        "data.options={n_train: 16, n_val: 16, n_test: 16}",
        "data.batch_size=16",
        "model.architecture=jmt",
        "model.options={depths: {left: 1}, successive: 0.001}",
        "model.backbone=mlp",
        "model.backbone_options={hidden: [32, 32]}",
        "optim.lr=0.03",
        "optim.scheduler=null",
        "train.epochs=30",
        "train.progress=false",
        f"output_dir={tmp_path}",
    )
    assert code == 0, err
    (line,) = [x for x in out.splitlines() if x.startswith("run directory: ")]
    run = Path(line.removeprefix("run directory: "))
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = history[0]["train"]["loss"], history[-1]["train"]["loss"]
    moved = [r["architecture"]["anchor_distance"] for r in history]
    assert all(m > 0 for m in moved), moved
    for task in ("left", "right"):
        assert last[task] < first[task] / 100, (task, first, last)


def test_each_head_reads_its_own_copy_of_its_point() -> None:
    """Without shortcuts, the tensor each head reads is marked once per task at its point,
    and a task's loss reaches its own copy only; with shortcuts nothing is marked."""
    model = build(depths=DEPTHS)
    with capture_representation(model) as rep:
        out = model(x_mlp())
    assert rep is not None
    assert [(p.name, list(p.leaves)) for p in rep.points] == [
        ("point.0", ["a"]),
        ("point.1", ["b"]),
        ("point.2", ["c"]),
    ]
    for task in TASKS:
        leaves = rep.leaves()
        grads = torch.autograd.grad(out[task].sum(), leaves, allow_unused=True, retain_graph=True)
        assert [g is not None for g in grads] == [t == task for t in ("a", "b", "c")]
    jmt = build(arch="jmt", depths=DEPTHS)
    with capture_representation(jmt) as rep:
        jmt(x_mlp())
    assert rep is not None and rep.points == []


def test_an_interrupted_jmt_run_resumed_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    """JMT on the staged small_cnn with successive regularisation: the anchors refreshed at
    the end of epoch 1 are in its checkpoint, so a run stopped in epoch 2 and resumed ends
    with the same weights, anchors and test results."""
    config = {
        "model.architecture": "jmt",
        "model.options": {"depths": {"left": 2}, "successive": 0.1},
        "data.options.n_train": 64,
    }
    first, whole = train(tiny_config_dict(tmp_path / "a", **config), console=False)

    def interrupt(info: StepEnd) -> None:
        if info.global_step == 3:  # in epoch 2 (2 steps per epoch)
            raise KeyboardInterrupt

    run_dir = tmp_path / "b" / "run"
    with pytest.raises(KeyboardInterrupt):
        train(
            tiny_config_dict(tmp_path / "b", **config),
            run_dir=run_dir,
            step_callbacks=[interrupt],
            console=False,
        )
    assert resume(run_dir, console=False)["test"] == whole["test"]
    a = load_checkpoint(first.last_checkpoint)["model"]
    b = load_checkpoint(RunDirectory(run_dir).last_checkpoint)["model"]
    assert any(name.startswith("anchors.") for name in a)
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name
