"""Split (standard, wide, deep) and Dense, the MTAN paper's baselines: reference parameter
counts and structure, shapes, the parameter partition, gradients, the feature-level engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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
from polytask.models.backbones import SegNet
from polytask.models.heads_dense import segnet_head
from polytask.models.sharing import Dense, Split

TASKS = nyuv2_tasks()
NYU_SHAPE = (3, 288, 384)
SMALL_SHAPE = (3, 32, 48)
UNCERTAINTY_LOGVARS = 3  # stored in the reference's multi-task models, here in the balancer

MODELS = [
    ("split", {"variant": "standard"}),
    ("split", {"variant": "wide"}),
    ("split", {"variant": "deep"}),
    ("dense", {}),
]
IDS = ["split-standard", "split-wide", "split-deep", "dense"]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _build(
    arch: str,
    options: Mapping[str, Any] | None = None,
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
            tasks=dict(TASKS),
            backbone=lambda: backbone(input_shape=shape, width=width),
            head=segnet_head,
            **(options or {}),
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


def _convs(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_channels, m.out_channels) for m in module.modules() if isinstance(m, nn.Conv2d)]


# --- parameter counts of the reference (REFERENCE.md section 3), without allocating -------


@pytest.mark.parametrize(
    ("variant", "network", "reference"),
    [
        ("standard", 25_055_185, 25_055_188),
        ("wide", 43_934_161, 43_934_164),
        ("deep", 50_807_761, 50_807_764),
    ],
)
def test_split_matches_the_reference_count_less_the_uncertainty_state(
    variant: str, network: int, reference: int
) -> None:
    model = _build("split", {"variant": variant}, width=1.0, shape=NYU_SHAPE, meta=True)
    check_parameter_partition(model)
    assert _count(model) == network
    assert _count(model) + UNCERTAINTY_LOGVARS == reference
    heads = {"semantic": 37_773, "depth": 36_993, "normal": 37_123}  # the reference heads
    assert model.describe() == {"shared": network - sum(heads.values()), **heads}


def test_dense_matches_the_reference_count_less_the_uncertainty_state() -> None:
    model = _build("dense", width=1.0, shape=NYU_SHAPE, meta=True)
    check_parameter_partition(model)
    assert _count(model) == 123_743_992
    assert _count(model) + UNCERTAINTY_LOGVARS == 123_743_995
    # the shared SegNet with the reference's unread last decoder stage (64 -> 64 -> 13)
    assert model.describe() == {
        "shared": 24_913_767,
        "semantic": 32_943_885,
        "depth": 32_943_105,
        "normal": 32_943_235,
    }
    assert isinstance(model, Dense) and model.unused_stage is not None
    assert _convs(model.unused_stage) == [(64, 64), (64, 13)]
    assert _count(model.unused_stage) == 44_583


def test_dense_without_the_unused_stage() -> None:
    model = _build(
        "dense", {"reference_unused_stage": False}, width=1.0, shape=NYU_SHAPE, meta=True
    )
    check_parameter_partition(model)
    assert _count(model) == 123_743_992 - 44_583


def test_split_wide_and_deep_resize_the_shared_segnet_as_the_reference() -> None:
    def shared(variant: str) -> SegNet:
        model = _build("split", {"variant": variant}, width=1.0, shape=NYU_SHAPE, meta=True)
        assert isinstance(model, Split) and isinstance(model.encoder, SegNet)
        return model.encoder

    standard, wide, deep = shared("standard"), shared("wide"), shared("deep")
    # wide: filters 64-128-256-512-1024; the first decoder stage maps 1024 back to 512
    assert [s.out_channels for s in wide.encoder_stages] == [64, 128, 256, 512, 1024]
    assert _convs(wide.encoder[-1]) == [(512, 1024), (1024, 1024), (1024, 1024)]
    assert _convs(wide.decoder[0]) == [(1024, 512), (512, 512), (512, 512)]
    assert (wide.decoder_stages[0].in_channels, wide.out_features) == (1024, 64)
    assert _convs(wide.encoder[:-1]) == _convs(standard.encoder[:-1])
    # deep: every conv3x3-BN-ReLU layer followed by one of the same width
    doubled = [c for a, b in _convs(standard) for c in ((a, b), (b, b))]
    assert len(_convs(standard)) == 26
    assert _convs(deep) == doubled
    assert deep.encoder_stages == standard.encoder_stages
    norms = [m for m in deep.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 52


def test_dense_task_networks_follow_the_reference_widths() -> None:
    model = _build("dense", width=1.0, shape=NYU_SHAPE, meta=True)
    assert isinstance(model, Dense)
    network: Any = model.task_networks["depth"]
    # each stage reads its own features and the shared ones: the first convolution's input
    # is doubled; the last decoder stage keeps that width (128 -> 128 -> 64)
    assert [_convs(stage) for stage in network.encoder] == [
        [(3, 64), (64, 64)],
        [(128, 128), (128, 128)],
        [(256, 256), (256, 256), (256, 256)],
        [(512, 512), (512, 512), (512, 512)],
        [(1024, 512), (512, 512), (512, 512)],
    ]
    assert [_convs(stage) for stage in network.decoder] == [
        [(1024, 512), (512, 512), (512, 512)],
        [(1024, 256), (256, 256), (256, 256)],
        [(512, 128), (128, 128), (128, 128)],
        [(256, 64), (64, 64)],
        [(128, 128), (128, 64)],
    ]


# --- construction and validation ------------------------------------------------------------


def test_split_rejects_an_unknown_variant() -> None:
    with pytest.raises(ConfigError, match=r"`variant` of architecture split.*'tall'"):
        _build("split", {"variant": "tall"})


@pytest.mark.parametrize(("arch", "options"), [*MODELS[1:]], ids=IDS[1:])
def test_resized_and_dense_models_need_segnet(arch: str, options: dict[str, str]) -> None:
    mlp = BACKBONES.get("mlp")
    with pytest.raises(ConfigError, match="needs the segnet backbone, found MLP"):
        ARCHITECTURES.get(arch)(
            tasks=TASKS, backbone=lambda: mlp(input_shape=(6,)), head=segnet_head, **options
        )


def test_split_standard_works_with_any_backbone() -> None:
    mlp = BACKBONES.get("mlp")
    tasks = {"depth": TASKS["depth"]}
    model = Split(
        tasks=tasks,
        backbone=lambda: mlp(input_shape=(6,), hidden=(8,)),
        head=lambda task, features: nn.Linear(features, task.output_dim),
    )
    assert model(torch.rand(4, 6))["depth"].shape == (4, 1)


# --- forward: shapes, partition, the same model as hard sharing -----------------------------


@pytest.mark.parametrize(("arch", "options"), MODELS, ids=IDS)
def test_dense_outputs_per_task(arch: str, options: dict[str, str]) -> None:
    model = _build(arch, options)
    check_parameter_partition(model)
    out = model(torch.rand(2, *SMALL_SHAPE))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "semantic": (2, 13, 32, 48),
        "depth": (2, 1, 32, 48),
        "normal": (2, 3, 32, 48),
    }
    torch.testing.assert_close(out["normal"].norm(dim=1), torch.ones(2, 32, 48))
    assert set(model(torch.rand(2, *SMALL_SHAPE), task="depth")) == {"depth"}


def test_split_standard_is_hard_sharing() -> None:
    x = torch.rand(2, *SMALL_SHAPE)
    split, hps = _build("split"), _build("hps")
    assert isinstance(split, Split) and split.variant == "standard"
    assert [n for n, _ in split.named_parameters()] == [n for n, _ in hps.named_parameters()]
    out, expected = split(x), hps(x)
    for task in TASKS:
        assert torch.equal(out[task], expected[task]), task


# --- gradients ------------------------------------------------------------------------------


def _unused(model: MultiTaskModel) -> list[nn.Parameter]:
    stage = getattr(model, "unused_stage", None)
    return list(stage.parameters()) if isinstance(stage, nn.Module) else []


@pytest.mark.parametrize(("arch", "options"), MODELS, ids=IDS)
def test_task_parameters_get_gradient_only_from_their_own_loss(
    arch: str, options: dict[str, str]
) -> None:
    model = _build(arch, options)
    x, targets = _batch()
    _losses(model(x), targets)["depth"].backward()
    for task in ("semantic", "normal"):
        for p in model.task_parameters(task):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert all(p.grad is not None for p in model.task_parameters("depth"))
    unused = _unused(model)
    assert all(p.grad is None for p in unused)  # never run, never trained
    shared = [p for p in model.shared_parameters() if all(p is not u for u in unused)]
    assert shared and all(p.grad is not None for p in shared)


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


@pytest.mark.parametrize(
    ("arch", "options", "width"),
    # at width 1/8 the heads of split read 8 shared channels: too few to fit the normals fast
    [(*MODELS[2], 1 / 4), (*MODELS[3], 1 / 8)],
    ids=IDS[2:],
)
def test_overfits_one_batch_of_dense_tasks(
    arch: str, options: dict[str, str], width: float
) -> None:
    model = _build(arch, options, width=width, shape=(3, 32, 32))
    x, targets = _tiled_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first: dict[str, float] = {}
    # 100 steps: at 60 the split-deep normals stopped at 0.33 of the first loss on some CPUs
    # (0.22 on others: kernels differ); the bound below is not the point, fitting is
    for step in range(100):
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


def test_dense_marks_every_shared_tensor_the_task_networks_read() -> None:
    model = _build("dense")
    x, targets = _batch()
    with capture_representation(model) as rep:
        losses = _losses(model(x), targets)
    assert rep is not None
    assert rep.names() == [f"encoder.{j}.pooled" for j in range(4)] + [
        f"decoder.{k}.input" for k in range(5)
    ]
    shared = [p for p in model.shared_parameters() if all(p is not u for u in _unused(model))]
    for task, loss in losses.items():
        # the task's graph reaches the shared network only through the marked points ...
        to_shared = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        assert all(g is None for g in to_shared), task
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


@pytest.mark.parametrize(("arch", "options"), [MODELS[1], MODELS[3]], ids=[IDS[1], IDS[3]])
def test_the_feature_level_engine_runs(arch: str, options: dict[str, str]) -> None:
    """Fixed weights w at the feature level: every shared parameter lies before the marked
    points and gets sum_k w_k dL_k; each task's own modules get their own loss's gradient."""
    w = (0.5, 2.0, 1.0)
    x, targets = _batch()
    model = _build(arch, options)
    with capture_representation(model) as rep:
        losses = _losses(model(x), targets)
    shared = list(model.shared_parameters())
    others = [p for p in model.parameters() if all(p is not s for s in shared)]
    ctx = BackwardContext(shared_parameters=shared, other_parameters=others, representation=rep)
    _FixedWeights(list(TASKS), w).backward(losses, ctx)
    got = _grads(model)
    shared_names = {n for n, p in model.named_parameters() if any(p is s for s in shared)}

    def naive(weights: Sequence[float]) -> dict[str, Tensor]:
        reference = _build(arch, options)
        ls = _losses(reference(x), targets)
        sum(wi * ls[t] for wi, t in zip(weights, TASKS, strict=True)).backward()  # type: ignore[union-attr]
        return _grads(reference)

    weighted, plain = naive(w), naive((1.0, 1.0, 1.0))
    assert shared_names and len(shared_names) < len(got)
    for name, grad in got.items():
        expected = weighted[name] if name in shared_names else plain[name]
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=2e-5, msg=name)
