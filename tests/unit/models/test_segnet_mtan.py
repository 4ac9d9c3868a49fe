"""SegNet, its dense heads, MTAN and STAN: reference parameter counts, shapes, gradients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import other_copies, own_copies
from polytask.balancing.base import BackwardContext
from polytask.balancing.gradient import GramianWeighting
from polytask.data.nyuv2_tasks import nyuv2_tasks
from polytask.errors import ConfigError
from polytask.models import (
    ARCHITECTURES,
    BACKBONES,
    MultiTaskModel,
    capture_representation,
    check_parameter_partition,
)
from polytask.models.backbones import SegNet, StageOutput, StageSpec
from polytask.models.heads_dense import segnet_head
from polytask.models.sharing import MTAN
from polytask.tasks import Task

TASKS = nyuv2_tasks()
NYU_SHAPE = (3, 288, 384)
SMALL_SHAPE = (3, 32, 48)
UNCERTAINTY_LOGVARS = 3  # stored in the reference's multi-task models, here in the balancer


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _build(
    arch: str,
    tasks: Mapping[str, Task] = TASKS,
    *,
    width: float = 1 / 8,
    shape: Sequence[int] = SMALL_SHAPE,
    meta: bool = False,
    seed: int = 0,
) -> MultiTaskModel:
    torch.manual_seed(seed)
    factory = ARCHITECTURES.get(arch)
    backbone = BACKBONES.get("segnet")
    with torch.device("meta" if meta else "cpu"):
        model = factory(
            tasks=dict(tasks),
            backbone=lambda: backbone(input_shape=shape, width=width),
            head=segnet_head,
        )
    assert isinstance(model, MultiTaskModel)
    return model


def _batch(n: int = 2, shape: Sequence[int] = SMALL_SHAPE) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    _, h, w = shape
    x = torch.rand(n, *shape, generator=g)
    label = torch.randint(-1, 13, (n, h, w), generator=g)  # -1: void, ignored
    depth = torch.rand(n, 1, h, w, generator=g) * 5
    depth[:, :, :4] = 0  # invalid pixels
    normal = F.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
    normal[:, :, -3:] = 0
    return x, {"semantic": label, "depth": depth, "normal": normal}


def _losses(out: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {t: TASKS[t].compute_loss(out[t], targets[t]) for t in out}


# --- parameter counts of the reference (REFERENCE.md section 3), without allocating -------


@pytest.mark.parametrize(
    ("task", "expected"), [("semantic", 24_981_069), ("depth", 24_980_289), ("normal", 24_980_419)]
)
def test_single_task_segnet_matches_the_reference_count(task: str, expected: int) -> None:
    model = _build("single_task", {task: TASKS[task]}, width=1.0, shape=NYU_SHAPE, meta=True)
    assert _count(model) == expected


def test_segnet_backbone_count_and_stages() -> None:
    with torch.device("meta"):
        net = SegNet(input_shape=NYU_SHAPE)
    assert _count(net) == 24_943_296
    assert net.out_features == 64
    assert [(s.in_channels, s.out_channels) for s in net.encoder_stages] == [
        (3, 64),
        (64, 128),
        (128, 256),
        (256, 512),
        (512, 512),
    ]
    assert [(s.in_channels, s.out_channels) for s in net.decoder_stages] == [
        (512, 512),
        (512, 256),
        (256, 128),
        (128, 64),
        (64, 64),
    ]
    layers = [sum(isinstance(m, nn.Conv2d) for m in stage.modules()) for stage in net.encoder]
    assert layers == [2, 2, 3, 3, 3]
    assert [sum(isinstance(m, nn.Conv2d) for m in s.modules()) for s in net.decoder] == [
        3,
        3,
        3,
        2,
        2,
    ]


def test_mtan_matches_the_reference_count_less_the_uncertainty_state() -> None:
    model = _build("mtan", width=1.0, shape=NYU_SHAPE, meta=True)
    check_parameter_partition(model)
    assert _count(model) == 44_229_073
    assert _count(model) + UNCERTAINTY_LOGVARS == 44_229_076
    # shared: SegNet and the shared 3x3 convolutions of the attention streams
    assert model.describe()["shared"] == 24_943_296 + 10_220_160


def test_mtan_attention_widths_follow_the_reference() -> None:
    model = _build("mtan", width=1.0, shape=NYU_SHAPE, meta=True)
    attention: Any = model.attention["semantic"]  # type: ignore[index]

    def widths(blocks: nn.ModuleList) -> list[tuple[int, int]]:
        return [(b[0].in_channels, b[3].out_channels) for b in blocks]  # type: ignore[index]

    assert widths(attention.encoder) == [(64, 64), (256, 128), (512, 256), (1024, 512), (1024, 512)]
    assert widths(attention.decoder) == [(1024, 512), (768, 256), (384, 128), (192, 64), (128, 64)]


def test_stan_matches_the_reference_count_which_has_no_uncertainty_state() -> None:
    model = _build("stan", {"semantic": TASKS["semantic"]}, width=1.0, shape=NYU_SHAPE, meta=True)
    assert _count(model) == 38_185_805


def test_hard_sharing_on_segnet_is_the_reference_split_standard() -> None:
    model = _build("hps", width=1.0, shape=NYU_SHAPE, meta=True)
    assert _count(model) == 25_055_185
    assert _count(model) + UNCERTAINTY_LOGVARS == 25_055_188


# --- construction and validation ------------------------------------------------------------


def test_width_scales_every_stage_and_keeps_one_channel() -> None:
    half = SegNet(input_shape=SMALL_SHAPE, width=0.5)
    assert [s.out_channels for s in half.encoder_stages] == [32, 64, 128, 256, 256]
    tiny = SegNet(input_shape=SMALL_SHAPE, width=1e-3)
    assert [s.out_channels for s in tiny.encoder_stages] == [1, 1, 1, 1, 1]
    assert tiny(torch.rand(1, *SMALL_SHAPE)).shape == (1, 1, 32, 48)


def test_reference_initialisation() -> None:
    net = SegNet(input_shape=SMALL_SHAPE, width=0.25)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(c.bias is not None and torch.count_nonzero(c.bias) == 0 for c in convs)
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in norms)
    weights = torch.cat([c.weight.detach().flatten() / c.weight.detach().std() for c in convs])
    assert abs(float(weights.mean())) < 0.05  # zero-mean Gaussian


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (3, 16, 64)}, "at least 32 x 32"),
        ({"input_shape": (48,)}, "image inputs"),
        ({"input_shape": SMALL_SHAPE, "width": 0.0}, "`width`"),
    ],
)
def test_segnet_rejects_bad_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SegNet(**kwargs)  # type: ignore[arg-type]


def test_mtan_needs_a_staged_backbone_and_stan_one_task() -> None:
    mlp = BACKBONES.get("mlp")
    with pytest.raises(ConfigError, match="needs a staged backbone"):
        MTAN(tasks=TASKS, backbone=lambda: mlp(input_shape=(6,)), head=segnet_head)
    with pytest.raises(ConfigError, match="exactly one task"):
        _build("stan")


# --- forward: shapes, heads -----------------------------------------------------------------


@pytest.mark.parametrize("width", [1 / 8, 3 / 16])
@pytest.mark.parametrize("arch", ["mtan", "single_task", "hps"])
def test_dense_outputs_per_task(arch: str, width: float) -> None:
    model = _build(arch, width=width)
    check_parameter_partition(model)
    out = model(torch.rand(2, *SMALL_SHAPE))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "semantic": (2, 13, 32, 48),
        "depth": (2, 1, 32, 48),
        "normal": (2, 3, 32, 48),
    }
    torch.testing.assert_close(out["normal"].norm(dim=1), torch.ones(2, 32, 48))
    assert set(model(torch.rand(2, *SMALL_SHAPE), task="depth")) == {"depth"}


def test_stan_outputs() -> None:
    model = _build("stan", {"normal": TASKS["normal"]})
    assert model(torch.rand(1, *SMALL_SHAPE))["normal"].shape == (1, 3, 32, 48)


# --- gradients ------------------------------------------------------------------------------


def test_mtan_task_parameters_get_gradient_only_from_their_own_loss() -> None:
    model = _build("mtan")
    x, targets = _batch()
    out = model(x)
    _losses(out, targets)["depth"].backward()
    for task in ("semantic", "normal"):
        for p in model.task_parameters(task):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert all(p.grad is not None for p in model.task_parameters("depth"))
    assert all(p.grad is not None for p in model.shared_parameters())


def _unit_masks(model: MultiTaskModel) -> None:
    """Make every attention mask exactly 1: the last BN outputs 30 and sigmoid(30) == 1.0."""
    assert float(torch.sigmoid(torch.tensor(30.0))) == 1.0
    with torch.no_grad():
        for attention in model.attention.values():  # type: ignore[operator]
            for block in [*attention.encoder, *attention.decoder]:
                block[4].weight.zero_()
                block[4].bias.fill_(30.0)


def test_mtan_with_unit_masks_computes_exactly_the_shared_network() -> None:
    """Masks of 1 let the shared features through unchanged and cut the attention streams
    off: every task's head reads exactly the shared SegNet's output, so the predictions are
    those of hard sharing with the same backbone and heads (bit for bit), and the shared
    stream convolutions get no gradient."""
    model = _build("mtan")
    assert isinstance(model, MTAN)
    _unit_masks(model)
    x, targets = _batch()
    out = model(x)
    for stages in model.mask_statistics().values():
        assert all(float(mean) == 1.0 for mean in stages.values())
    features = model.backbone(x)  # the shared SegNet alone
    for task in TASKS:
        assert torch.equal(out[task], model.heads[task](features)), task
    sum(_losses(out, targets).values()).backward()  # type: ignore[union-attr]
    for conv in [
        *model.shared_encoder_convs.parameters(),
        *model.shared_decoder_convs.parameters(),
    ]:
        assert conv.grad is None or torch.count_nonzero(conv.grad) == 0
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_mask_statistics_are_recorded_per_task_and_stage() -> None:
    model = _build("mtan")
    assert isinstance(model, MTAN)
    assert model.mask_statistics() == {}
    model(torch.rand(2, *SMALL_SHAPE))
    stats = model.mask_statistics()
    assert list(stats) == list(TASKS)
    for stages in stats.values():
        assert (
            tuple(stages)
            == model.stage_names
            == tuple([f"encoder.{j}" for j in range(5)] + [f"decoder.{d}" for d in range(5)])
        )
        assert all(
            m.dim() == 0 and 0 < float(m) < 1 and not m.requires_grad for m in stages.values()
        )
    quiet = MTAN(
        tasks=TASKS,
        backbone=lambda: SegNet(input_shape=SMALL_SHAPE, width=1 / 8),
        head=segnet_head,
        track_masks=False,
    )
    quiet(torch.rand(2, *SMALL_SHAPE))
    assert quiet.mask_statistics() == {}


def _tiled_batch(n: int = 2, size: int = 32, tile: int = 8) -> tuple[Tensor, dict[str, Tensor]]:
    """Random images with targets constant on tiles, with void / invalid pixels."""
    g = torch.Generator().manual_seed(2)
    cells = size // tile

    def tiles(t: Tensor) -> Tensor:
        return t.repeat_interleave(tile, -2).repeat_interleave(tile, -1)

    label = tiles(torch.randint(0, 13, (n, cells, cells), generator=g))
    label[:, :2] = -1
    depth = tiles(torch.rand(n, 1, cells, cells, generator=g) * 4 + 1)
    depth[..., :2] = 0
    normal = tiles(F.normalize(torch.randn(n, 3, cells, cells, generator=g), dim=1))
    normal[..., -2:, :] = 0
    x = torch.rand(n, 3, size, size, generator=g)
    return x, {"semantic": label, "depth": depth, "normal": normal}


def test_mtan_overfits_one_batch_of_dense_tasks() -> None:
    model = _build("mtan", shape=(3, 32, 32))
    x, targets = _tiled_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first: dict[str, float] = {}
    for step in range(80):
        opt.zero_grad()
        losses = _losses(model(x), targets)
        if step == 0:
            first = {t: float(v.detach()) for t, v in losses.items()}
        sum(losses.values()).backward()  # type: ignore[union-attr]
        opt.step()
    with torch.no_grad():  # still in training mode: BN normalises with this batch's statistics
        out = model(x)
    last = {t: float(v) for t, v in _losses(out, targets).items()}
    for task in TASKS:
        assert last[task] < 0.25 * first[task], (task, first[task], last[task])
    valid = targets["semantic"] >= 0
    accuracy = (out["semantic"].argmax(1) == targets["semantic"])[valid].float().mean()
    assert float(accuracy) > 0.97


# --- shared representation and the feature-level engine ------------------------------------


def test_mtan_marks_every_shared_tensor_the_attention_reads() -> None:
    model = _build("mtan")
    x, targets = _batch()
    with capture_representation(model) as rep:
        losses = _losses(model(x), targets)
    assert rep is not None
    names = rep.names()
    assert names == [f"encoder.{j}.{k}" for j in range(5) for k in ("first", "last")] + [
        f"decoder.{d}.{k}" for d in range(5) for k in ("input", "last")
    ]
    trunk = list(cast(nn.Module, model.backbone).parameters())
    for task, loss in losses.items():
        # the task's graph reaches the shared network only through the marked points ...
        to_trunk = torch.autograd.grad(loss, trunk, retain_graph=True, allow_unused=True)
        assert all(g is None for g in to_trunk), task
        # ... depends on every one of its own copies of them ...
        own = own_copies(rep, task)
        assert len(own) == len(rep.points)
        to_points = torch.autograd.grad(loss, own, retain_graph=True, allow_unused=True)
        assert all(g is not None and torch.count_nonzero(g) > 0 for g in to_points), task
        # ... and on no other task's copy (one backward pass then separates the tasks)
        to_others = torch.autograd.grad(
            loss, other_copies(rep, task), retain_graph=True, allow_unused=True
        )
        assert all(g is None for g in to_others), task


class _FixedWeights(GramianWeighting):
    def __init__(self, tasks: Sequence[str], w: Sequence[float]) -> None:
        super().__init__(tasks, "feature")
        self.w = torch.tensor(w, dtype=torch.float64)

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        assert gramian.shape == (len(self.w), len(self.w))
        return self.w


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in model.named_parameters()
    }


def test_the_feature_level_engine_runs_on_mtan() -> None:
    """Fixed weights w at the feature level: the shared network gets sum_k w_k dL_k; the
    shared stream convolutions (outside the marked points) and each task's own modules get
    the unweighted gradients."""
    w = (0.5, 2.0, 1.0)
    x, targets = _batch()
    model = _build("mtan")
    with capture_representation(model) as rep:
        losses = _losses(model(x), targets)
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    ctx = BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep)
    _FixedWeights(list(TASKS), w).backward(losses, ctx)
    got = _grads(model)

    def naive(weights: Sequence[float]) -> dict[str, Tensor]:
        reference = _build("mtan")
        ls = _losses(reference(x), targets)
        sum(wi * ls[t] for wi, t in zip(weights, TASKS, strict=True)).backward()  # type: ignore[union-attr]
        return _grads(reference)

    weighted, plain = naive(w), naive((1.0, 1.0, 1.0))
    assert any(n.startswith("backbone.") for n in got)
    for name, grad in got.items():
        expected = weighted[name] if name.startswith("backbone.") else plain[name]
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=2e-5, msg=name)


# --- any staged backbone: an encoder-only one with strided stages ---------------------------


class _StridedEncoder(nn.Module):
    """Two conv stages, the second strided (resolution changes inside the stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [
                nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)]),
                nn.ModuleList([nn.Conv2d(5, 6, 3, stride=2, padding=1)]),
            ]
        )
        self.encoder_stages = (StageSpec(3, 4, 5), StageSpec(5, 6, 6))
        self.decoder_stages: tuple[StageSpec, ...] = ()
        self.out_features = 6

    def encode(self, stage: int, x: Tensor) -> StageOutput:
        layers = self.stages[stage]
        assert isinstance(layers, nn.ModuleList)
        first = last = torch.relu(layers[0](x))
        for layer in layers[1:]:
            last = torch.relu(layer(last))
        return StageOutput(first, last)

    def downsample(self, stage: int, x: Tensor) -> tuple[Tensor, object]:
        return x, None

    def upsample(self, stage: int, x: Tensor, states: Sequence[object]) -> Tensor:
        raise AssertionError("no decoder")

    def decode(self, stage: int, x: Tensor) -> StageOutput:
        raise AssertionError("no decoder")


def test_mtan_wraps_an_encoder_only_backbone() -> None:
    tasks = {t: TASKS[t] for t in ("semantic", "depth")}
    model = MTAN(tasks=tasks, backbone=_StridedEncoder, head=segnet_head)
    check_parameter_partition(model)
    x, targets = _batch(shape=(3, 8, 8))
    with capture_representation(model) as rep:
        out = model(x)
    assert rep is not None
    # the second stage has one layer: its first output is its last, marked once
    assert rep.names() == ["encoder.0.first", "encoder.0.last", "encoder.1.first"]
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "semantic": (2, 13, 4, 4),
        "depth": (2, 1, 4, 4),
    }
    target = {
        "semantic": targets["semantic"][:, ::2, ::2],
        "depth": targets["depth"][..., ::2, ::2],
    }
    sum(_losses(model(x), target).values()).backward()  # type: ignore[union-attr]
    assert all(p.grad is not None for p in model.parameters())


def test_single_task_network_stan_is_one_reference_stan_per_task() -> None:
    """The MTAN paper's STAN row (#P 4.56) is three single-task attention networks."""
    torch.manual_seed(0)
    backbone = BACKBONES.get("segnet")
    with torch.device("meta"):
        model = ARCHITECTURES.get("single_task")(
            tasks=dict(TASKS),
            backbone=lambda: backbone(input_shape=NYU_SHAPE, width=1.0),
            head=segnet_head,
            network="stan",
        )
    assert isinstance(model, MultiTaskModel)
    check_parameter_partition(model)
    columns = {t: sum(p.numel() for p in model.task_parameters(t)) for t in TASKS}
    assert columns["semantic"] == 38_185_805  # the reference STAN
    for task in TASKS:
        alone = _build("stan", {task: TASKS[task]}, width=1.0, shape=NYU_SHAPE, meta=True)
        assert columns[task] == _count(alone)
    assert _count(model) == sum(columns.values())


def test_single_task_network_stan_forward_and_errors() -> None:
    backbone = BACKBONES.get("segnet")
    model = ARCHITECTURES.get("single_task")(
        tasks=dict(TASKS),
        backbone=lambda: backbone(input_shape=SMALL_SHAPE, width=1 / 8),
        head=segnet_head,
        network="stan",
    )
    out = model(torch.rand(2, *SMALL_SHAPE))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "semantic": (2, 13, 32, 48),
        "depth": (2, 1, 32, 48),
        "normal": (2, 3, 32, 48),
    }
    assert set(model(torch.rand(1, *SMALL_SHAPE), task="depth")) == {"depth"}
    # a task's loss reaches only its own column
    out["depth"].sum().backward()
    assert all(p.grad is None for p in model.task_parameters("semantic"))
    assert any(p.grad is not None for p in model.task_parameters("depth"))
    with pytest.raises(ConfigError, match="cannot nest"):
        ARCHITECTURES.get("single_task")(
            tasks=dict(TASKS), backbone=lambda: None, head=segnet_head, network="single_task"
        )
    with pytest.raises(ConfigError, match="Did you mean 'stan'"):
        ARCHITECTURES.get("single_task")(
            tasks=dict(TASKS), backbone=lambda: None, head=segnet_head, network="stann"
        )
