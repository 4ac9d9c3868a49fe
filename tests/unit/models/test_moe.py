"""MMoE and PLE: shapes, the parameter partition, gradient isolation, gates against naive
formulas, exact equivalences (MMoE with one expert = hard sharing, CGC without task experts =
MMoE), the feature-level gradient engine, and training through the command line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from polytask.balancing.base import BackwardContext
from polytask.balancing.gradient import GramianWeighting, Level
from polytask.cli import main
from polytask.errors import ConfigError
from polytask.losses import CrossEntropyLoss
from polytask.metrics.classification import Accuracy
from polytask.models import (
    ARCHITECTURES,
    MultiTaskModel,
    capture_representation,
    check_parameter_partition,
)
from polytask.models.backbones import MLP, SmallCNN
from polytask.models.heads import linear_head
from polytask.models.sharing import PLE, HardSharing, MMoE
from polytask.models.sharing.ple import FeatureExpert
from polytask.tasks import Task

TASKS = {
    name: Task(name=name, loss=CrossEntropyLoss(), metrics={"accuracy": Accuracy}, output_dim=dim)
    for name, dim in [("a", 3), ("b", 5), ("c", 4)]
}
SHAPE = (6,)

#: (architecture, options): CGC, two- and three-level PLE, MMoE
CASES = [
    ("mmoe", {"num_experts": 3}),
    ("ple", {"num_levels": 1}),
    ("ple", {"num_levels": 2}),
    ("ple", {"num_levels": 3, "shared_experts": 1, "task_experts": 2}),
]
RECIPE = Path(__file__).resolve().parents[3] / "configs" / "multidigits.yaml"
IDS = ["mmoe", "cgc", "ple2", "ple3"]


def _mlp() -> nn.Module:
    return MLP(input_shape=SHAPE, hidden=(8,))


def _build(arch: str, seed: int = 0, **options: Any) -> MultiTaskModel:
    torch.manual_seed(seed)
    model: MultiTaskModel = ARCHITECTURES.get(arch)(
        tasks=TASKS, backbone=_mlp, head=linear_head, input_shape=SHAPE, **options
    )
    return model


def _batch(n: int = 10) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *SHAPE, generator=g)
    return x, {t: torch.randint(0, TASKS[t].output_dim, (n,), generator=g) for t in TASKS}


def _losses(model: MultiTaskModel) -> dict[str, Tensor]:
    x, y = _batch()
    out = model(x)
    return {t: TASKS[t].compute_loss(out[t], y[t]) for t in TASKS}


def _total(losses: dict[str, Tensor]) -> Tensor:
    return torch.stack(list(losses.values())).sum()


def _nonzero(grads: Sequence[Tensor | None]) -> list[bool]:
    return [g is not None and bool(torch.count_nonzero(g) > 0) for g in grads]


# -- shapes, partition, isolation ---------------------------------------------------------


@pytest.mark.parametrize(("arch", "options"), CASES, ids=IDS)
def test_outputs_partition_and_single_task_mode(arch: str, options: dict[str, Any]) -> None:
    model = _build(arch, **options)
    x, _ = _batch()
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (10, 3), "b": (10, 5), "c": (10, 4)}
    check_parameter_partition(model)
    only_b = model(x, task="b")
    assert set(only_b) == {"b"}
    torch.testing.assert_close(only_b["b"], out["b"], rtol=0, atol=0)


def test_image_experts_and_options_from_the_registry() -> None:
    torch.manual_seed(0)
    for arch in ("mmoe", "ple"):
        model = ARCHITECTURES.get(arch)(
            tasks=TASKS,
            backbone=lambda: SmallCNN(input_shape=(1, 8, 8), channels=(4,), out_features=5),
            head=linear_head,
            input_shape=(1, 8, 8),
        )
        out = model(torch.randn(2, 1, 8, 8))
        assert {k: tuple(v.shape) for k, v in out.items()} == {
            "a": (2, 3),
            "b": (2, 5),
            "c": (2, 4),
        }
    mmoe = _build("mmoe")
    assert isinstance(mmoe, MMoE) and len(mmoe.experts) == 4
    ple = _build("ple")
    assert isinstance(ple, PLE) and len(ple.levels) == 1


@pytest.mark.parametrize(("arch", "options"), CASES, ids=IDS)
def test_task_parameters_get_gradient_only_from_their_task(
    arch: str, options: dict[str, Any]
) -> None:
    model = _build(arch, **options)
    losses = _losses(model)
    shared = list(model.shared_parameters())
    assert shared
    reached_by = {id(p): 0 for p in shared}
    for name, loss in losses.items():
        grads = torch.autograd.grad(
            loss, list(model.parameters()), allow_unused=True, retain_graph=True
        )
        by_id = {id(p): g for p, g in zip(model.parameters(), grads, strict=True)}
        for other in TASKS:
            got = _nonzero([by_id[id(p)] for p in model.task_parameters(other)])
            assert all(got) if other == name else not any(got), (name, other)
        for p in shared:
            reached_by[id(p)] += _nonzero([by_id[id(p)]])[0]
    # every shared parameter is reached by several tasks' losses
    assert min(reached_by.values()) >= 2


def test_ple_task_experts_below_the_last_level_are_shared() -> None:
    model = _build("ple", num_levels=2)
    assert isinstance(model, PLE)
    shared = {id(p) for p in model.shared_parameters()}
    low, top = model.level(0), model.level(1)
    assert all(id(p) in shared for p in low.experts_of("a").parameters())  # via the shared gate
    assert all(id(p) not in shared for p in low.task_gates["a"].parameters())
    assert all(id(p) not in shared for p in top.experts_of("a").parameters())
    assert top.shared_gate is None and low.shared_gate is not None
    cgc = _build("ple", num_levels=1)
    own = {id(p) for p in cgc.task_parameters("a")}
    assert isinstance(cgc, PLE)
    assert {id(p) for p in cgc.level(0).experts_of("a").parameters()} <= own


# -- gates ---------------------------------------------------------------------------------


def _softmax_gate(gate: nn.Module, z: Tensor) -> Tensor:
    """softmax(W z + b) written out."""
    assert isinstance(gate, nn.Linear)
    logits = z.flatten(1) @ gate.weight.T + gate.bias
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _weighted_sum(w: Tensor, outputs: Sequence[Tensor]) -> Tensor:
    total = w[:, 0:1] * outputs[0]
    for i in range(1, len(outputs)):
        total = total + w[:, i : i + 1] * outputs[i]
    return total


def test_mmoe_gates_are_softmax_rows_and_usage_is_their_batch_mean() -> None:
    model = _build("mmoe", num_experts=3)
    assert isinstance(model, MMoE)
    assert model.gate_usage() == {}
    x, _ = _batch()
    model(x)
    usage = model.gate_usage()
    assert set(usage) == set(TASKS)
    for t in TASKS:
        w = model.gate_weights(x, t)
        torch.testing.assert_close(w.sum(dim=1), torch.ones(10))
        assert bool((w > 0).all())
        naive = _softmax_gate(model.gates[t], x)
        torch.testing.assert_close(w, naive)
        torch.testing.assert_close(usage[t], naive.mean(dim=0))
        assert not usage[t].requires_grad


def test_mmoe_output_is_the_gated_sum_of_experts() -> None:
    model = _build("mmoe", num_experts=3)
    assert isinstance(model, MMoE)
    x, _ = _batch()
    out = model(x)
    experts = [e(x) for e in model.experts]
    for t in TASKS:
        mixture = _weighted_sum(_softmax_gate(model.gates[t], x), experts)
        torch.testing.assert_close(out[t], model.heads[t](mixture))


def _naive_ple(
    model: PLE, x: Tensor
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]], list[Tensor]]:
    """The PLE equations with explicit loops: outputs, task-gate means, shared-gate means."""
    names = list(TASKS)
    h = {t: x for t in names}
    s = x
    usage: list[dict[str, Tensor]] = []
    shared_usage: list[Tensor] = []
    for j in range(len(model.levels)):
        level = model.level(j)

        def expert(e: nn.Module, z: Tensor, first: bool = j == 0) -> Tensor:
            if first:
                out: Tensor = e(z)
                return out
            assert isinstance(e, FeatureExpert)
            return torch.relu(z @ e.linear.weight.T + e.linear.bias)

        shared = [expert(e, s) for e in level.shared_experts]
        own = {t: [expert(e, h[t]) for e in level.experts_of(t)] for t in names}
        usage.append({})
        new_h = {}
        for t in names:
            w = _softmax_gate(level.task_gates[t], h[t])
            usage[-1][t] = w.mean(dim=0)
            new_h[t] = _weighted_sum(w, own[t] + shared)
        if level.shared_gate is not None:
            w = _softmax_gate(level.shared_gate, s)
            shared_usage.append(w.mean(dim=0))
            s = _weighted_sum(w, [z for t in names for z in own[t]] + shared)
        h = new_h
    return {t: model.heads[t](h[t]) for t in names}, usage, shared_usage


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_ple_matches_the_naive_equations_and_records_gate_usage(levels: int) -> None:
    model = _build("ple", num_levels=levels, shared_experts=2, task_experts=2)
    assert isinstance(model, PLE)
    x, _ = _batch()
    out = model(x)
    expected, usage, shared_usage = _naive_ple(model, x)
    for t in TASKS:
        torch.testing.assert_close(out[t], expected[t])
    for j in range(levels):
        got = model.gate_usage(j)
        for t in TASKS:
            assert got[t].shape == (4,)
            torch.testing.assert_close(got[t].sum(), torch.tensor(1.0))
            torch.testing.assert_close(got[t], usage[j][t])
    got_shared = model.shared_gate_usage()
    assert len(got_shared) == levels - 1
    for a, b in zip(got_shared, shared_usage, strict=True):
        assert a.shape == (3 * 2 + 2,)
        torch.testing.assert_close(a, b)


# -- exact equivalences --------------------------------------------------------------------


def test_mmoe_with_one_expert_is_hard_sharing_of_that_expert() -> None:
    mmoe = _build("mmoe", num_experts=1)
    assert isinstance(mmoe, MMoE)
    torch.manual_seed(5)
    hps = HardSharing(tasks=TASKS, backbone=_mlp, head=linear_head)
    mmoe.experts[0].load_state_dict(hps.encoder.state_dict())
    mmoe.heads.load_state_dict(hps.heads.state_dict())
    x, y = _batch()
    out_m, out_h = mmoe(x), hps(x)
    for t in TASKS:
        assert torch.equal(out_m[t], out_h[t])
    _total({t: TASKS[t].compute_loss(out_m[t], y[t]) for t in TASKS}).backward()
    _total({t: TASKS[t].compute_loss(out_h[t], y[t]) for t in TASKS}).backward()
    pairs = [
        *zip(mmoe.experts[0].parameters(), hps.encoder.parameters(), strict=True),
        *zip(mmoe.heads.parameters(), hps.heads.parameters(), strict=True),
    ]
    for pm, ph in pairs:
        assert pm.grad is not None and ph.grad is not None
        assert torch.equal(pm.grad, ph.grad)
    for p in mmoe.gates.parameters():  # a softmax over one expert is constant
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_cgc_without_task_experts_is_mmoe() -> None:
    mmoe = _build("mmoe", num_experts=2)
    cgc = _build("ple", seed=3, num_levels=1, shared_experts=2, task_experts=0)
    assert isinstance(mmoe, MMoE) and isinstance(cgc, PLE)
    level = cgc.level(0)
    level.shared_experts.load_state_dict(mmoe.experts.state_dict())
    level.task_gates.load_state_dict(mmoe.gates.state_dict())
    cgc.heads.load_state_dict(mmoe.heads.state_dict())
    x, _ = _batch()
    out_c, out_m = cgc(x), mmoe(x)
    for t in TASKS:
        assert torch.equal(out_c[t], out_m[t])


# -- training ------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "options"), [CASES[0], CASES[2]], ids=["mmoe", "ple2"])
def test_overfits_one_batch(arch: str, options: dict[str, Any]) -> None:
    model = _build(arch, **options)
    x, y = _batch(8)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(80):  # about 30 steps suffice
        opt.zero_grad()
        _total(_losses_on(model, x, y)).backward()
        opt.step()
    with torch.no_grad():
        out = model(x)
    for t in TASKS:
        assert torch.equal(out[t].argmax(1), y[t]), t


def _losses_on(model: MultiTaskModel, x: Tensor, y: dict[str, Tensor]) -> dict[str, Tensor]:
    out = model(x)
    return {t: TASKS[t].compute_loss(out[t], y[t]) for t in TASKS}


# -- the feature-level engine --------------------------------------------------------------


class FixedWeights(GramianWeighting):
    """Fixed task weights; remembers the Gramian it was given."""

    def __init__(self, level: Level, w: Sequence[float]) -> None:
        super().__init__(list(TASKS), level)
        self.w = torch.tensor(w, dtype=torch.float64)
        self.seen: Tensor | None = None

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        self.seen = gramian
        return self.w.to(gramian.device)


EXPECTED_POINTS = {
    "mmoe": ["experts.0", "experts.1", "experts.2"],
    "cgc": ["levels.0.shared.0", "levels.0.shared.1"],
    "ple2": [
        "levels.0.shared.0",
        "levels.0.shared.1",
        *[f"levels.0.{t}.0" for t in TASKS],
        "levels.1.shared.0",
        "levels.1.shared.1",
    ],
    "ple3": [
        "levels.1.shared.0",
        *[f"levels.1.{t}.{i}" for t in TASKS for i in range(2)],
        *[f"levels.1.{t}.input" for t in TASKS],
        "levels.2.shared.0",
    ],
}


@pytest.mark.parametrize(
    ("arch", "options", "case"), [(*c, i) for c, i in zip(CASES, IDS, strict=True)], ids=IDS
)
def test_every_path_from_shared_to_task_modules_crosses_a_marked_point(
    arch: str, options: dict[str, Any], case: str
) -> None:
    model = _build(arch, **options)
    with capture_representation(model) as rep:
        losses = _losses(model)
    assert rep is not None
    assert sorted(rep.names()) == sorted(EXPECTED_POINTS[case])
    shared = list(model.shared_parameters())
    leaves = rep.leaves()
    for loss in losses.values():
        grads = torch.autograd.grad(loss, shared + leaves, allow_unused=True, retain_graph=True)
        assert not any(_nonzero(grads[: len(shared)]))  # only through the leaves
        assert any(_nonzero(grads[len(shared) :]))
    for point in rep.points:  # each copy of each point is read by some task
        for leaf in point.leaves.values():
            assert point.original.shape == leaf.shape and point.original.grad_fn is not None
            assert any(
                _nonzero(torch.autograd.grad(loss, [leaf], allow_unused=True, retain_graph=True))[0]
                for loss in losses.values()
            )


def _engine_grads(
    arch: str, options: dict[str, Any], level: Level, w: Sequence[float]
) -> dict[str, Tensor]:
    model = _build(arch, **options)
    with capture_representation(model, level == "feature") as rep:
        losses = _losses(model)
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    balancer = FixedWeights(level, w)
    ctx = BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep)
    balancer.backward(losses, ctx)
    assert balancer.seen is not None and balancer.seen.shape == (3, 3)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("arch", "options"), CASES, ids=IDS)
@pytest.mark.parametrize("level", ["parameter", "feature"])
def test_fixed_weights_through_the_engine_equal_the_weighted_loss_gradient(
    arch: str, options: dict[str, Any], level: Level
) -> None:
    w = (0.5, 2.0, 1.0)
    got = _engine_grads(arch, options, level, w)
    # shared parameters: the gradient of sum_k w_k L_k; a task's own: that of its loss
    model = _build(arch, **options)
    losses = _losses(model)
    weighted = _total({t: wk * losses[t] for wk, t in zip(w, TASKS, strict=True)})
    params = list(model.parameters())
    g_weighted = torch.autograd.grad(weighted, params, retain_graph=True)
    g_plain = torch.autograd.grad(_total(losses), params)
    shared = {id(p) for p in model.shared_parameters()}
    for (name, p), gw, gp in zip(model.named_parameters(), g_weighted, g_plain, strict=True):
        expected = gw if id(p) in shared else gp
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6, msg=name)


# -- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "options", "message"),
    [
        ("mmoe", {"num_experts": 0}, "`num_experts`"),
        ("mmoe", {"num_experts": True}, "`num_experts`"),
        ("ple", {"num_levels": 0}, "`num_levels`"),
        ("ple", {"shared_experts": -1}, "`shared_experts`"),
        ("ple", {"task_experts": 1.5}, "`task_experts`"),
        ("ple", {"shared_experts": 0, "task_experts": 0}, "both 0"),
    ],
)
def test_bad_options_are_config_errors_naming_the_option(
    arch: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _build(arch, **options)


def test_bad_input_shape_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="`input_shape`"):
        MMoE(tasks=TASKS, backbone=_mlp, head=linear_head, input_shape=(0, 3))


# -- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        ["model.architecture=mmoe", "model.options={num_experts: 2}"],
        ["model.architecture=ple", "model.options={num_levels: 2}"],
    ],
    ids=["mmoe", "ple"],
)
def test_trains_through_the_command_line(tmp_path: Path, options: list[str]) -> None:
    code = main(
        [
            "train",
            str(RECIPE),
            *options,
            "model.backbone=mlp",
            "model.backbone_options={hidden: [32]}",
            "train.epochs=1",
            "data.options.n_train=200",
            "data.options.n_val=50",
            "data.options.n_test=50",
            "train.progress=false",
            f"output_dir={tmp_path}",
        ]
    )
    assert code == 0
    (run,) = tmp_path.iterdir()
    assert (run / "results.json").is_file()
