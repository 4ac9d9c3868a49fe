"""The staged small backbones (lenet, small_cnn): stages compute the plain forward pass,
small_cnn is unchanged, and every wrapping architecture builds and trains a step on them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.losses import CrossEntropyLoss
from polytask.metrics.classification import Accuracy
from polytask.models import ARCHITECTURES, BACKBONES, MultiTaskModel, check_parameter_partition
from polytask.models.backbones import LeNet, SmallCNN, StagedBackbone, run_stages
from polytask.models.heads import linear_head
from polytask.tasks import Task

TASKS = {
    name: Task(name=name, loss=CrossEntropyLoss(), metrics={"accuracy": Accuracy}, output_dim=10)
    for name in ("left", "right")
}


def _lenet(size: int = 28, **options: Any) -> LeNet:
    net = BACKBONES.get("lenet")(input_shape=(1, size, size), **options)
    assert isinstance(net, LeNet)
    return net


def _small_cnn(size: int = 20, **options: Any) -> SmallCNN:
    net = BACKBONES.get("small_cnn")(input_shape=(1, size, size), **options)
    assert isinstance(net, SmallCNN)
    return net


@pytest.mark.parametrize(
    ("size", "options", "params"),
    [(36, {}, 30_890), (28, {"kernels": [5, 5]}, 21_330), (28, {}, 14_890)],
)
def test_lenet_parameters(size: int, options: dict[str, Any], params: int) -> None:
    # 36 x 36 with the defaults is the Pareto MTL code's network: conv 1->10 9x9 (820),
    # conv 10->20 5x5 (5,020), linear 500->50 (25,050); 28 x 28 with 5x5 kernels, Sener and
    # Koltun's: conv 1->10 (260), conv 10->20 (5,020), linear 320->50 (16,050)
    net = _lenet(size, **options)
    assert sum(p.numel() for p in net.parameters()) == params


def test_lenet_forward_is_the_reference_computation() -> None:
    torch.manual_seed(0)
    net = _lenet(36)
    x = torch.rand(5, 1, 36, 36)
    c1, c2 = net.convs
    assert isinstance(c1, nn.Conv2d) and isinstance(c2, nn.Conv2d)
    h = F.max_pool2d(F.relu(F.conv2d(x, c1.weight, c1.bias)), 2, 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, c2.weight, c2.bias)), 2, 2)
    expected = F.relu(F.linear(h.reshape(5, 500), net.fc.weight, net.fc.bias))
    torch.testing.assert_close(net(x), expected)
    assert net(x).shape == (5, 50)


@pytest.mark.parametrize("make", [_lenet, _small_cnn])
@pytest.mark.parametrize("train", [True, False])
def test_stages_compute_the_forward_pass(make: Any, train: bool) -> None:
    torch.manual_seed(1)
    net = make()
    assert isinstance(net, StagedBackbone)
    net.train(train)
    x = torch.rand(6, 1, *([28, 28] if make is _lenet else [20, 20]))
    trace = run_stages(net, x)
    assert torch.equal(trace.output, net(x))
    specs = net.encoder_stages
    for spec, stage in zip(specs, trace.encoder, strict=True):
        assert stage.last.dim() == 4 and stage.last.shape[1] == spec.out_channels
    # the last stage is the linear layer, as a 1 x 1 map; its "downsampling" flattens it
    assert trace.encoder[-1].last.shape == (6, net.out_features, 1, 1)
    assert trace.output.shape == (6, net.out_features)


def _reference_small_cnn(net: SmallCNN, x: Tensor) -> Tensor:
    """small_cnn's computation written out with functional ops on its own parameters."""
    layers = list(net.net)
    for layer in layers[:-4]:  # up to the last block's ReLU
        if isinstance(layer, nn.Conv2d):
            x = F.conv2d(x, layer.weight, layer.bias, padding=1)
        elif isinstance(layer, nn.BatchNorm2d):
            x = F.batch_norm(
                x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False
            )
        elif isinstance(layer, nn.ReLU):
            x = F.relu(x)
        elif isinstance(layer, nn.MaxPool2d):
            x = F.max_pool2d(x, 2)
    linear = layers[-2]
    assert isinstance(linear, nn.Linear)
    return F.relu(F.linear(x.mean(dim=(2, 3)), linear.weight, linear.bias))


def test_small_cnn_is_unchanged() -> None:
    torch.manual_seed(0)
    net = _small_cnn(16)
    # the default network: the same modules, names and parameter count as before it was staged
    assert sum(p.numel() for p in net.parameters()) == 64_384
    assert [name for name, _ in net.named_parameters()][:4] == [
        "net.0.weight",
        "net.0.bias",
        "net.1.weight",
        "net.1.bias",
    ]
    assert list(net.state_dict())[-2:] == ["net.13.weight", "net.13.bias"]
    net.eval()
    x = torch.rand(4, 1, 16, 16)
    torch.testing.assert_close(net(x), _reference_small_cnn(net, x))
    torch.testing.assert_close(run_stages(net, x).output, net(x), rtol=0, atol=0)
    assert [s.out_channels for s in net.encoder_stages] == [32, 64, 64, 128]


def _build(arch: str, backbone: Any) -> MultiTaskModel:
    torch.manual_seed(0)
    model: MultiTaskModel = ARCHITECTURES.get(arch)(
        tasks=TASKS, backbone=backbone, head=linear_head
    )
    return model


ARCHS = ["hps", "single_task", "split", "cross_stitch", "sluice", "mtan"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("which", ["lenet", "small_cnn"])
def test_architectures_build_and_train_a_step(arch: str, which: str) -> None:
    if which == "lenet":
        size, backbone = 28, lambda: _lenet(28, kernels=[5, 5])
    else:
        size, backbone = 16, lambda: _small_cnn(16, channels=[4, 8], out_features=12)
    model = _build(arch, backbone)
    check_parameter_partition(model)
    x = torch.rand(8, 1, size, size)
    y = torch.arange(8) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"left": (8, 10), "right": (8, 10)}
    loss = sum(F.cross_entropy(v, y) for v in out.values())
    assert isinstance(loss, Tensor)
    loss.backward()
    optimizer.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2


def test_mtan_attends_at_every_stage_of_lenet() -> None:
    model = _build("mtan", lambda: _lenet(28, kernels=[5, 5]))
    model(torch.rand(4, 1, 28, 28))
    stats = model.mask_statistics()  # type: ignore[operator]
    assert set(stats) == {"left", "right"}
    assert list(stats["left"]) == ["encoder.0", "encoder.1", "encoder.2"]


def test_dense_needs_segnet() -> None:
    with pytest.raises(ConfigError, match="needs the segnet backbone"):
        _build("dense", lambda: _lenet(28))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kernels": [5]}, "as many `kernels` as `channels`"),
        ({"channels": [0, 20]}, "positive"),
        ({"kernels": [9, 9, 9], "channels": [4, 4, 4]}, "too small"),
    ],
)
def test_lenet_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _lenet(28, **options)
