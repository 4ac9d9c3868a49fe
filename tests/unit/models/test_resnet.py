"""The ResNet backbone: shapes, residual blocks against their formula, projection shortcuts,
the parameter count of ResNet-20, option errors, and training through the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.cli import main
from polytask.errors import ConfigError
from polytask.models import BACKBONES
from polytask.models.backbones import BasicBlock, ResNet

RECIPE = Path(__file__).resolve().parents[3] / "configs" / "multidigits.yaml"


def _randomize_bn(module: nn.Module, g: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics for every BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g))
            m.running_mean = torch.randn(c, generator=g)
            m.running_var = torch.rand(c, generator=g) + 0.5


def _bn(x: Tensor, bn: nn.BatchNorm2d, train: bool) -> Tensor:
    """Batch normalisation written out: batch statistics in training, running ones in eval."""
    if train:
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
    else:
        assert bn.running_mean is not None and bn.running_var is not None
        mean, var = bn.running_mean, bn.running_var
    shape = (1, -1, 1, 1)
    normed = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    return normed * bn.weight.view(shape) + bn.bias.view(shape)


def _naive_block(block: BasicBlock, x: Tensor, train: bool) -> Tensor:
    stride = block.conv1.stride
    y = F.conv2d(x, block.conv1.weight, stride=stride, padding=1)
    y = torch.relu(_bn(y, block.bn1, train))
    y = _bn(F.conv2d(y, block.conv2.weight, padding=1), block.bn2, train)
    if isinstance(block.shortcut, nn.Identity):
        skip = x
    else:
        assert isinstance(block.shortcut, nn.Sequential)
        conv, bn = block.shortcut[0], block.shortcut[1]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        skip = _bn(F.conv2d(x, conv.weight, stride=conv.stride), bn, train)
    return torch.relu(y + skip)


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "stride", "projection"),
    [(4, 4, 1, False), (4, 6, 1, True), (4, 4, 2, True), (3, 8, 2, True)],
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_a_block_computes_its_formula(
    in_channels: int, out_channels: int, stride: int, projection: bool, train: bool
) -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    block = BasicBlock(in_channels, out_channels, stride)
    _randomize_bn(block, g)
    block.train(train)
    assert isinstance(block.shortcut, nn.Sequential) is projection
    x = torch.randn(3, in_channels, 7, 9, generator=g)
    with torch.no_grad():
        expected = _naive_block(block, x, train)
        got = block(x)
    size = (-(-7 // stride), -(-9 // stride))
    assert got.shape == (3, out_channels, *size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_identity_blocks_have_no_shortcut_parameters() -> None:
    block = BasicBlock(5, 5)
    assert list(block.shortcut.parameters()) == []
    assert sum(p.numel() for p in block.parameters()) == 2 * 5 * 5 * 9 + 2 * 2 * 5
    projected = BasicBlock(5, 7, stride=2)
    assert sum(p.numel() for p in projected.shortcut.parameters()) == 5 * 7 + 2 * 7


@pytest.mark.parametrize(
    ("options", "features"),
    [
        ({}, 64),
        ({"channels": [4, 8], "blocks_per_stage": 2}, 8),
        ({"channels": [4], "out_features": 10}, 10),
    ],
)
def test_output_shapes(options: dict[str, Any], features: int) -> None:
    torch.manual_seed(0)
    net = BACKBONES.get("resnet")(input_shape=(3, 11, 13), **options)
    assert net.out_features == features
    out = net(torch.randn(2, 3, 11, 13))
    assert out.shape == (2, features)
    if "out_features" in options:
        assert bool((out >= 0).all())  # the projection ends with a ReLU


def test_stages_downsample_by_two_after_the_first() -> None:
    net = ResNet(input_shape=(1, 16, 16), channels=(4, 8, 8), blocks_per_stage=2)
    sizes = []
    x = net.stem(torch.randn(1, 1, 16, 16))
    for stage in net.stages:
        assert isinstance(stage, nn.Sequential) and len(stage) == 2
        x = stage(x)
        sizes.append(tuple(x.shape[1:]))
    assert sizes == [(4, 16, 16), (8, 8, 8), (8, 4, 4)]
    blocks = [[block for block in stage.children()] for stage in net.stages.children()]
    assert all(isinstance(b, BasicBlock) for stage in blocks for b in stage)
    # the width stays at 8 from stage 1 to stage 2, but the stride needs a projection
    shortcuts = [[type(b.shortcut) for b in stage] for stage in blocks]
    assert shortcuts == [
        [nn.Identity] * 2,
        [nn.Sequential, nn.Identity],
        [nn.Sequential, nn.Identity],
    ]


def test_resnet20_parameter_count() -> None:
    # stem 3*16*9 + 2*16 = 464; stage 16: 3 * (2*16*16*9 + 4*16) = 14,016;
    # stage 32: (16*32*9 + 32*32*9 + 4*32 + 16*32 + 2*32) + 2 * (2*32*32*9 + 4*32) = 51,648;
    # stage 64: (32*64*9 + 64*64*9 + 4*64 + 32*64 + 2*64) + 2 * (2*64*64*9 + 4*64) = 205,696
    net = ResNet(input_shape=(3, 32, 32), blocks_per_stage=3)
    assert sum(p.numel() for p in net.parameters()) == 464 + 14_016 + 51_648 + 205_696


def test_a_network_residual_is_the_sum_of_its_blocks() -> None:
    torch.manual_seed(0)
    net = ResNet(input_shape=(2, 8, 8), channels=(4, 6), out_features=5).eval()
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        z = net.stem(x)
        for block in net.stages.modules():
            if isinstance(block, BasicBlock):
                z = _naive_block(block, z, train=False)
        expected = net.projection(z.mean(dim=(2, 3)))
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"input_shape": (8, 8)}, "image inputs"),
        ({"channels": []}, "`channels`"),
        ({"channels": [4, 0]}, "`channels`"),
        ({"channels": "16"}, "`channels`"),
        ({"blocks_per_stage": 0}, "`blocks_per_stage`"),
        ({"out_features": 0}, "`out_features`"),
    ],
)
def test_bad_options_are_config_errors_naming_the_option(
    options: dict[str, Any], message: str
) -> None:
    kwargs: dict[str, Any] = {"input_shape": (1, 8, 8), **options}
    with pytest.raises(ConfigError, match=message):
        ResNet(**kwargs)


def test_trains_through_the_command_line_with_hard_sharing(tmp_path: Path) -> None:
    code = main(
        [
            "train",
            str(RECIPE),
            "model.architecture=hps",
            "model.backbone=resnet",
            "model.backbone_options={channels: [8, 16], blocks_per_stage: 1}",
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
