"""Cross-stitch networks: counts, the units' mixing and gradients, partition, initialisation
from single-task checkpoints, and a tiny end-to-end run.

The end-to-end runs use SegNet at width 1/16 on tiny random dense data, through
``polytask.api.train``; the staged LeNet of the MultiMNIST recipes is covered by the recipe
tests (tests/e2e/test_recipes.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.api import train
from polytask.data.base import DATASETS, DataBundle
from polytask.data.nyuv2_tasks import nyuv2_tasks
from polytask.data.tensor import TensorMTLDataset
from polytask.errors import CheckpointError, ConfigError
from polytask.losses import DepthL1Loss
from polytask.metrics.depth import DepthMetric
from polytask.models import (
    ARCHITECTURES,
    BACKBONES,
    MultiTaskModel,
    capture_representation,
    check_parameter_partition,
)
from polytask.models.backbones import StageOutput, StageSpec
from polytask.models.heads_dense import segnet_head
from polytask.models.sharing import CrossStitch, SingleTask
from polytask.models.sharing.cross_stitch import CrossStitchUnit, ReferenceCrossStitchUnit
from polytask.tasks import Task

TASKS = nyuv2_tasks()
NYU_SHAPE = (3, 288, 384)
SMALL_SHAPE = (3, 32, 48)
SINGLE_TASK_SEGNETS = 24_981_069 + 24_980_289 + 24_980_419  # REFERENCE.md section 3
UNCERTAINTY_LOGVARS = 3  # stored in the reference's multi-task models, here in the balancer
SEGNET_POINT_WIDTHS = (64, 128, 256, 512, 512, 512, 256, 128, 64, 64)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(
    arch: str = "cross_stitch",
    tasks: Mapping[str, Task] = TASKS,
    *,
    width: float = 1 / 8,
    shape: Sequence[int] = SMALL_SHAPE,
    meta: bool = False,
    seed: int = 0,
    **options: Any,
) -> MultiTaskModel:
    torch.manual_seed(seed)
    segnet = BACKBONES.get("segnet")
    with torch.device("meta" if meta else "cpu"):
        model = ARCHITECTURES.get(arch)(
            tasks=dict(tasks),
            backbone=lambda: segnet(input_shape=shape, width=width),
            head=segnet_head,
            **options,
        )
    assert isinstance(model, MultiTaskModel)
    return model


def dense_batch(
    n: int = 2, shape: Sequence[int] = SMALL_SHAPE, seed: int = 1
) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    _, h, w = shape
    x = torch.rand(n, *shape, generator=g)
    label = torch.randint(-1, 13, (n, h, w), generator=g)
    depth = torch.rand(n, 1, h, w, generator=g) * 5
    depth[:, :, :4] = 0
    normal = F.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
    return x, {"semantic": label, "depth": depth, "normal": normal}


def losses_of(out: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {t: TASKS[t].compute_loss(out[t], targets[t]) for t in out}


class TinyStaged(nn.Module):
    """A constant-width staged backbone: two encoder stages (average pooling after the
    first), one decoder stage (nearest upsampling back to the recorded size)."""

    def __init__(self, in_channels: int = 3, width: int = 4) -> None:
        super().__init__()
        self.enc0 = nn.ModuleList(
            [nn.Conv2d(in_channels, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)]
        )
        self.enc1 = nn.Conv2d(width, width, 3, padding=1)
        self.dec0 = nn.Conv2d(width, width, 3, padding=1)
        self.encoder_stages = (StageSpec(in_channels, width, width), StageSpec(width, width, width))
        self.decoder_stages = (StageSpec(width, width, width),)
        self.out_features = width

    def encode(self, stage: int, x: Tensor) -> StageOutput:
        if stage == 0:
            first = torch.relu(self.enc0[0](x))
            return StageOutput(first, torch.relu(self.enc0[1](first)))
        out = torch.relu(self.enc1(x))
        return StageOutput(out, out)

    def downsample(self, stage: int, x: Tensor) -> tuple[Tensor, object]:
        size = x.shape[-2:]
        return (F.avg_pool2d(x, 2) if stage == 0 else x), size

    def upsample(self, stage: int, x: Tensor, states: Sequence[object]) -> Tensor:
        return F.interpolate(x, size=cast(torch.Size, states[0]), mode="nearest")

    def decode(self, stage: int, x: Tensor) -> StageOutput:
        out = torch.relu(self.dec0(x))
        return StageOutput(out, out)


def tiny_model(
    arch: str = "cross_stitch", tasks: Mapping[str, Task] = TASKS, seed: int = 0, **options: Any
) -> MultiTaskModel:
    torch.manual_seed(seed)
    model = ARCHITECTURES.get(arch)(
        tasks=dict(tasks), backbone=TinyStaged, head=segnet_head, **options
    )
    assert isinstance(model, MultiTaskModel)
    return model


def tiny_dense_bundle(n: int = 4, size: int = 32) -> DataBundle:
    """Random images with semantic and depth targets constant on 8 x 8 tiles."""
    g = torch.Generator().manual_seed(3)

    def split() -> TensorMTLDataset:
        cells = size // 8

        def tiles(t: Tensor) -> Tensor:
            return t.repeat_interleave(8, -2).repeat_interleave(8, -1)

        label = tiles(torch.randint(0, 13, (n, cells, cells), generator=g))
        depth = tiles(torch.rand(n, 1, cells, cells, generator=g) * 4 + 1)
        x = torch.rand(n, 3, size, size, generator=g)
        return TensorMTLDataset(x, {"semantic": label, "depth": depth})

    tasks = {t: TASKS[t] for t in ("semantic", "depth")}
    return DataBundle(
        tasks=tasks, train=split(), val=split(), test=split(), input_shape=(3, size, size)
    )


@pytest.fixture
def tiny_dense() -> Iterator[str]:
    """Register the tiny dense data set for one test; yields its name."""
    DATASETS.register("test_tiny_dense")(tiny_dense_bundle)
    yield "test_tiny_dense"
    DATASETS.unregister("test_tiny_dense")


def dense_config(output_dir: Path, architecture: str, **options: Any) -> dict[str, Any]:
    """SegNet at width 1/16 on the tiny dense data, one epoch."""
    return {
        "name": architecture,
        "seed": 0,
        "output_dir": str(output_dir),
        "data": {"name": "test_tiny_dense", "batch_size": 2},
        "model": {
            "architecture": architecture,
            "options": options,
            "backbone": "segnet",
            "backbone_options": {"width": 1 / 16},
            "head": "segnet",
        },
        "optim": {"lr": 1e-3},
        "train": {"epochs": 1, "progress": False},  # max_unpool2d has no deterministic mode
    }


def unit_io(model: nn.Module) -> tuple[list[list[Tensor]], list[list[Tensor]], list[Any]]:
    """Hooks recording every unit's inputs and outputs (outputs retain their gradient)."""
    inputs: list[list[Tensor]] = []
    outputs: list[list[Tensor]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], out: list[Tensor]) -> None:
        inputs.append(list(args[0]))
        for o in {id(o): o for o in out}.values():
            if o.requires_grad:
                o.retain_grad()
        outputs.append(out)

    units = cast(nn.ModuleList, model.units)
    handles = [u.register_forward_hook(hook) for u in units]
    return inputs, outputs, handles


# --- parameter counts (NYUv2, SegNet, full width, meta device) -------------------------------


def test_reference_variant_matches_the_reference_count_less_the_uncertainty_state() -> None:
    model = build(width=1.0, shape=NYU_SHAPE, meta=True, variant="mtan_reference")
    assert isinstance(model, CrossStitch)
    check_parameter_partition(model)
    assert count(model) == 74_941_804
    assert count(model) + UNCERTAINTY_LOGVARS == 74_941_807
    # the three single-task networks and one scalar per (unit, source task), nine units
    assert count(model) == SINGLE_TASK_SEGNETS + 9 * 3
    assert model.unit_names == tuple(
        [f"encoder.{j}" for j in range(5)] + [f"decoder.{d}" for d in range(4)]
    )


@pytest.mark.parametrize(
    ("granularity", "expected"), [("channel", 74_964_241), ("layer", 74_941_867)]
)
def test_paper_variant_count(granularity: str, expected: int) -> None:
    """Ten units (the nine of the reference and one on the features the heads read), each
    with a mixing row per target task: K x K x C entries per channel, K x K per layer."""
    model = build(width=1.0, shape=NYU_SHAPE, meta=True, granularity=granularity)
    per_unit = [9 * c for c in SEGNET_POINT_WIDTHS] if granularity == "channel" else [9] * 10
    assert count(model) == expected == SINGLE_TASK_SEGNETS + sum(per_unit)
    assert sum(per_unit) == (22_464 if granularity == "channel" else 90)


def test_partition_units_and_columns_are_shared_heads_are_the_tasks() -> None:
    model = build(width=1.0, shape=NYU_SHAPE, meta=True)
    assert isinstance(model, CrossStitch)
    check_parameter_partition(model)
    groups = model.describe()
    backbones = 3 * 24_943_296
    assert groups["shared"] == backbones + 22_464
    heads = {"semantic": 24_981_069, "depth": 24_980_289, "normal": 24_980_419}
    assert {t: groups[t] for t in TASKS} == {t: n - 24_943_296 for t, n in heads.items()}


# --- forward ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"granularity": "layer"},
        {"placement": "stage"},
        {"variant": "mtan_reference"},
    ],
)
def test_dense_outputs_per_task(options: dict[str, Any]) -> None:
    model = build(**options)
    check_parameter_partition(model)
    out = model(torch.rand(2, *SMALL_SHAPE))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "semantic": (2, 13, 32, 48),
        "depth": (2, 1, 32, 48),
        "normal": (2, 3, 32, 48),
    }
    torch.testing.assert_close(out["normal"].norm(dim=1), torch.ones(2, 32, 48))
    assert set(model(torch.rand(2, *SMALL_SHAPE), task="depth")) == {"depth"}


def test_a_tiny_staged_backbone() -> None:
    model = tiny_model()
    assert isinstance(model, CrossStitch)
    check_parameter_partition(model)
    assert model.unit_names == ("encoder.0", "encoder.1", "decoder.0")
    assert {n: tuple(a.shape) for n, a in model.alphas().items()} == dict.fromkeys(
        model.unit_names, (3, 3, 4)
    )
    out = model(torch.rand(2, 3, 8, 8))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "semantic": (2, 13, 8, 8),
        "depth": (2, 1, 8, 8),
        "normal": (2, 3, 8, 8),
    }


# --- the units at initialisation --------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["channel", "layer"])
def test_each_unit_computes_the_stated_convex_combination_at_initialisation(
    granularity: str,
) -> None:
    """x'_t = 0.9 x_t + 0.05 sum_{s != t} x_s: alpha_D = 0.1 split over K - 1 = 2 sources."""
    model = build(granularity=granularity)
    assert isinstance(model, CrossStitch)
    for alpha in model.alphas().values():
        matrix = alpha if alpha.dim() == 2 else alpha[..., 0]
        assert torch.equal(alpha.sum(dim=1), torch.ones_like(alpha.sum(dim=1)))
        torch.testing.assert_close(matrix, torch.full((3, 3), 0.05) + 0.85 * torch.eye(3))
        if alpha.dim() == 3:
            assert torch.equal(alpha, matrix[..., None].expand_as(alpha))
    inputs, outputs, _ = unit_io(model)
    model(torch.rand(2, *SMALL_SHAPE))
    assert len(inputs) == 10
    for xs, mixed in zip(inputs, outputs, strict=True):
        for t in range(3):
            expected = 0.9 * xs[t] + sum(0.05 * xs[s] for s in range(3) if s != t)
            torch.testing.assert_close(mixed[t], expected, rtol=1e-6, atol=1e-6)


def test_the_init_rule_for_more_than_two_tasks() -> None:
    """K = 4, init (0.7, 0.3): 0.7 on the diagonal, 0.1 for each of the 3 other sources."""
    tasks = dict(
        TASKS,
        depth2=Task(name="depth2", loss=DepthL1Loss(), metrics={"d": DepthMetric}, output_dim=1),
    )
    model = tiny_model(tasks=tasks, init=(0.7, 0.3), granularity="layer")
    assert isinstance(model, CrossStitch)
    for alpha in model.alphas().values():
        torch.testing.assert_close(alpha, torch.full((4, 4), 0.1) + 0.6 * torch.eye(4))
        torch.testing.assert_close(alpha.sum(dim=1), torch.ones(4))


def test_the_reference_variant_feeds_the_same_mixture_to_every_column() -> None:
    model = build(variant="mtan_reference")
    assert isinstance(model, CrossStitch)
    for alpha in model.alphas().values():
        assert torch.equal(alpha, torch.ones(3, 3))  # every row the common mixture, a_s = 1
    inputs, outputs, _ = unit_io(model)
    model(torch.rand(2, *SMALL_SHAPE))
    assert len(inputs) == 9
    for xs, mixed in zip(inputs, outputs, strict=True):
        assert mixed[0] is mixed[1] is mixed[2]
        torch.testing.assert_close(mixed[0], xs[0] + xs[1] + xs[2])


def test_identity_units_compute_exactly_the_single_task_networks() -> None:
    """With init (1, 0) no column reads another: the predictions are those of single_task
    with the same weights, bit for bit (the columns have single_task's layout)."""
    model = build(init=(1.0, 0.0))
    single = build("single_task", seed=5)
    assert isinstance(single, SingleTask)
    single.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k.startswith("columns.")}
    )
    x = torch.rand(2, *SMALL_SHAPE)
    out, expected = model(x), single(x)
    for task in TASKS:
        assert torch.equal(out[task], expected[task]), task


def test_alphas_are_detached_copies() -> None:
    model = build(granularity="layer")
    assert isinstance(model, CrossStitch)
    alphas = model.alphas()
    assert all(not a.requires_grad for a in alphas.values())
    alphas["encoder.0"].zero_()
    assert float(model.alphas()["encoder.0"].sum()) == pytest.approx(3.0)


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"granularity": "channel"}, {"granularity": "layer"}, {"variant": "mtan_reference"}],
)
def test_alpha_gradients_match_the_closed_form(options: dict[str, Any]) -> None:
    """dL/dalpha[t, s] = <dL/dx'_t, x_s>, summed over batch and positions (per channel: over
    all but the channel); for the reference's common mixture, dL/da_s = <dL/dm, x_s>."""
    model = build(**options)
    inputs, outputs, _ = unit_io(model)
    x, targets = dense_batch()
    sum(losses_of(model(x), targets).values()).backward()  # type: ignore[union-attr]
    units = cast(nn.ModuleList, model.units)
    for unit, xs, mixed in zip(units, inputs, outputs, strict=True):
        grad = unit.alpha.grad
        assert grad is not None
        k = len(xs)
        if isinstance(unit, ReferenceCrossStitchUnit):
            upstream = mixed[0].grad
            assert upstream is not None
            expected = torch.stack([(upstream * xs[s]).sum() for s in range(k)])
        else:
            assert isinstance(unit, CrossStitchUnit)
            rows = []
            for t in range(k):
                upstream = mixed[t].grad
                assert upstream is not None
                if grad.dim() == 3:
                    rows.append(
                        torch.stack(
                            [
                                torch.stack(
                                    [
                                        (upstream[:, c] * xs[s][:, c]).sum()
                                        for c in range(xs[s].shape[1])
                                    ]
                                )
                                for s in range(k)
                            ]
                        )
                    )
                else:
                    rows.append(torch.stack([(upstream * xs[s]).sum() for s in range(k)]))
            expected = torch.stack(rows)
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_gradients_flow_as_the_partition_says() -> None:
    """One task's loss reaches every column's backbone (so they are shared) and every unit,
    but no other task's head."""
    model = build()
    assert isinstance(model, CrossStitch)
    x, targets = dense_batch()
    losses_of(model(x), targets)["depth"].backward()
    for task in ("semantic", "normal"):
        assert all(p.grad is None for p in model.task_parameters(task))
        backbone = model.columns[task][0]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
    assert all(p.grad is not None for p in model.task_parameters("depth"))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.units.parameters())


def test_the_heads_read_the_marked_shared_representation() -> None:
    model = build()
    x, targets = dense_batch()
    with capture_representation(model) as rep:
        losses = losses_of(model(x), targets)
    assert rep is not None
    assert rep.names() == [f"features.{t}" for t in TASKS]
    leaves = rep.leaves()
    shared = list(model.shared_parameters())
    for i, (task, loss) in enumerate(losses.items()):
        to_shared = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        assert all(g is None for g in to_shared), task
        to_points = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        assert [g is not None for g in to_points] == [j == i for j in range(3)], task


# --- learning rates ---------------------------------------------------------------------------


def test_the_lr_multiplier_shows_in_the_optimizer_groups() -> None:
    model = build(granularity="layer")
    assert isinstance(model, CrossStitch)
    groups = model.optimizer_param_groups(1e-3)
    assert [g["name"] for g in groups] == ["model", "cross_stitch_units"]
    assert groups[0]["lr"] == 1e-3
    assert groups[1]["lr"] == pytest.approx(0.1)
    assert groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.units.parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    # Adam's first step moves every parameter by about its learning rate
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(groups)
    x, targets = dense_batch()
    sum(losses_of(model(x), targets).values()).backward()  # type: ignore[union-attr]
    opt.step()
    unit_step = (model.units[0].alpha - before["units.0.alpha"]).abs()
    torch.testing.assert_close(unit_step, torch.full((3, 3), 0.1), rtol=1e-3, atol=0)
    head_bias = "columns.depth.1.pred.bias"
    step = (model.get_parameter(head_bias) - before[head_bias]).abs()
    torch.testing.assert_close(step, torch.full_like(step, 1e-3), rtol=1e-3, atol=0)


def test_lr_multiplier_defaults_per_variant_and_can_be_set() -> None:
    for options, multiplier in [
        ({}, 100.0),
        ({"variant": "mtan_reference"}, 1.0),
        ({"lr_multiplier": 1000}, 1000.0),
    ]:
        model = build(**options)
        assert model.optimizer_param_groups(0.5)[1]["lr"] == pytest.approx(0.5 * multiplier)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"granularity": "channels"}, "Did you mean 'channel'"),
        ({"placement": "conv"}, "`placement`"),
        ({"variant": "mtan"}, "`variant`"),
        ({"init": (0.9, 0.2)}, "convex pair"),
        ({"init": (1.2, -0.2)}, "convex pair"),
        ({"init": (0.9,)}, "two numbers"),
        ({"init": (float("nan"), 0.1)}, "convex pair"),
        ({"lr_multiplier": 0}, "`lr_multiplier`"),
        ({"lr_multiplier": float("inf")}, "`lr_multiplier`"),
        ({"init_columns": {"sematic": "x.pt"}}, "Did you mean 'semantic'"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_model(**options)


def test_needs_two_tasks_and_a_staged_backbone() -> None:
    with pytest.raises(ConfigError, match="several tasks"):
        tiny_model(tasks={"depth": TASKS["depth"]})
    flat = BACKBONES.get("mpnn")
    with pytest.raises(ConfigError, match="needs a staged backbone"):
        CrossStitch(tasks=TASKS, backbone=lambda: flat(input_shape=(6,)), head=segnet_head)


def _mlp_cross_stitch(init: tuple[float, float]) -> CrossStitch:
    from polytask.losses import MSELoss
    from polytask.metrics import RegressionMetric
    from polytask.models import linear_head

    mlp = BACKBONES.get("mlp")
    tasks = {
        t: Task(
            name=t, loss=MSELoss(), metrics={"r": RegressionMetric}, output_dim=2, kind="regression"
        )
        for t in ("a", "b")
    }
    torch.manual_seed(0)
    return CrossStitch(
        tasks=tasks,
        backbone=lambda: mlp(input_shape=(6,), hidden=(8, 5)),
        head=linear_head,
        init=init,
    )


def test_on_the_mlp_backbone_units_mix_after_each_linear_layer() -> None:
    """The mlp backbone is staged by its linear layers: with identity units each column is
    its own MLP and head (MLP.forward, to rounding); with init (a, b) each layer's ReLU
    output is mixed as a h_t + b h_s before the next layer, computed here by hand."""
    x = torch.rand(4, 6)
    model = _mlp_cross_stitch((1.0, 0.0))
    out = model(x)
    for t in ("a", "b"):
        column = model.columns[t]
        # to rounding: the mixed activations may reach the next layer's matrix product in
        # another memory layout, which changes the order of its sums
        torch.testing.assert_close(out[t], column[1](column[0].mlp(x)), rtol=1e-6, atol=1e-7)
    model = _mlp_cross_stitch((0.7, 0.3))
    out = model(x)
    linears = {
        t: [m for m in model.columns[t][0].mlp.net if isinstance(m, nn.Linear)] for t in "ab"
    }
    h = {t: x for t in "ab"}
    for layer in range(2):
        z = {t: torch.relu(linears[t][layer](h[t])) for t in "ab"}
        h = {"a": 0.7 * z["a"] + 0.3 * z["b"], "b": 0.7 * z["b"] + 0.3 * z["a"]}
    for t in "ab":
        torch.testing.assert_close(out[t], model.columns[t][1](h[t]), rtol=1e-6, atol=1e-7)


# --- initialisation from single-task checkpoints and end-to-end runs ---------------------------


def test_init_columns_loads_single_task_checkpoints_exactly(
    tmp_path: Path, tiny_dense: str
) -> None:
    run, _ = train(dense_config(tmp_path, "single_task"), console=False)
    path = run.best_checkpoint
    saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    tasks = {t: TASKS[t] for t in ("semantic", "depth")}
    model = build(
        tasks=tasks,
        width=1 / 16,
        shape=(3, 32, 32),
        seed=7,
        init_columns=dict.fromkeys(tasks, str(path)),
    )
    assert isinstance(model, CrossStitch)
    state = model.state_dict()
    columns = [k for k in state if k.startswith("columns.")]
    assert columns and set(columns) == set(saved)
    for key in columns:
        assert torch.equal(state[key], saved[key]), key
    # one column only: the other keeps its fresh initialisation
    partial = build(tasks=tasks, width=1 / 16, shape=(3, 32, 32), init_columns={"depth": str(path)})
    assert isinstance(partial, CrossStitch)
    fresh = partial.state_dict()
    assert torch.equal(
        fresh["columns.depth.0.encoder.0.0.0.weight"], saved["columns.depth.0.encoder.0.0.0.weight"]
    )
    assert not torch.equal(
        fresh["columns.semantic.0.encoder.0.0.0.weight"],
        saved["columns.semantic.0.encoder.0.0.0.weight"],
    )

    with pytest.raises(CheckpointError, match=r"entries of another shape .*columns\.semantic\.0"):
        build(tasks=tasks, width=1 / 8, shape=(3, 32, 32), init_columns={"semantic": str(path)})
    with pytest.raises(
        CheckpointError, match="no column for task 'normal'; it has columns for 'depth', 'semantic'"
    ):
        build(shape=(3, 32, 32), width=1 / 16, init_columns={"normal": str(path)})
    with pytest.raises(CheckpointError, match="not found"):
        build(tasks=tasks, width=1 / 16, init_columns={"depth": str(tmp_path / "missing.pt")})

    # end to end: cross-stitch started from the single-task columns
    config = dense_config(tmp_path, "cross_stitch", init_columns=dict.fromkeys(tasks, str(path)))
    _, results = train(config, console=False)
    assert set(results["test"]["metrics"]) == set(tasks)


def test_end_to_end_training_run_of_the_reference_variant(tmp_path: Path, tiny_dense: str) -> None:
    """(The paper variant runs end to end in the init_columns test above.)"""
    config = dense_config(tmp_path, "cross_stitch", variant="mtan_reference")
    _, results = train(config, console=False)
    metrics = results["test"]["metrics"]
    assert set(metrics) == {"semantic", "depth"}
    assert all(
        isinstance(v, float) and v == v for values in metrics.values() for v in values.values()
    )


def tiled_batch(n: int = 2, size: int = 32, seed: int = 2) -> tuple[Tensor, dict[str, Tensor]]:
    """Random images with semantic and depth targets constant on 8 x 8 tiles."""
    g = torch.Generator().manual_seed(seed)

    def tiles(t: Tensor) -> Tensor:
        return t.repeat_interleave(8, -2).repeat_interleave(8, -1)

    label = tiles(torch.randint(0, 13, (n, size // 8, size // 8), generator=g))
    depth = tiles(torch.rand(n, 1, size // 8, size // 8, generator=g) * 4 + 1)
    return torch.rand(n, 3, size, size, generator=g), {"semantic": label, "depth": depth}


def overfit(
    model: MultiTaskModel, steps: int = 60, lr: float = 1e-2
) -> tuple[dict[str, float], dict[str, float]]:
    """Train on one tiled batch with Adam (the model's own parameter groups)."""
    x, targets = tiled_batch()
    opt = torch.optim.Adam(model.optimizer_param_groups(lr))
    first: dict[str, float] = {}
    for step in range(steps):
        opt.zero_grad()
        losses = losses_of(model(x), targets)
        if step == 0:
            first = {t: float(v.detach()) for t, v in losses.items()}
        total = sum(losses.values())
        penalty = model.regularization()
        if penalty is not None:
            total = total + penalty
        total.backward()  # type: ignore[union-attr]
        opt.step()
    with torch.no_grad():
        last = {t: float(v) for t, v in losses_of(model(x), targets).items()}
    return first, last


def test_overfits_one_batch() -> None:
    tasks = {t: TASKS[t] for t in ("semantic", "depth")}
    model = build(tasks=tasks, shape=(3, 32, 32), lr_multiplier=10)
    first, last = overfit(model, steps=40)
    for task in tasks:
        assert last[task] < 0.25 * first[task], (task, first[task], last[task])
