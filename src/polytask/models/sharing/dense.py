"""Dense: the densely connected baseline of the MTAN paper (Liu, Johns and Davison, "End-to-End
Multi-Task Learning with Attention", CVPR 2019, section 5, https://arxiv.org/abs/1803.10704).

A shared SegNet and, for every task, a task-specific network of the same stages that reads,
at every stage, its own features concatenated with the shared network's features of the
same resolution. With ``p_j`` the shared network's encoder stage ``j`` output after
max-pooling and ``v_k`` the input of its decoder stage ``k`` (unpooled features), task
``t``'s network computes::

    e_0 = E_0(x)                 e_j = E_j([down(e_{j-1}) ; p_{j-1}])     j = 1 .. J-1
    d_0 = D_0([up(down(e_{J-1})) ; v_0])     d_k = D_k([up(d_{k-1}) ; v_k])     k = 1 .. K-1

where ``down`` is 2x2 max-pooling and ``up`` unpooling at the task network's own indices;
the task's head reads ``d_{K-1}``. Each ``E_j`` and ``D_k`` has the layers and widths of
the shared stage, its first convolution reading the doubled input.

Two details of the reference (``model_segnet_dense.py``) are specific to it and kept, so that
on NYUv2 the network has 123,743,992 parameters (the reference's 123,743,995 include its
three uncertainty-weighting log-variances, which in polytask belong to the balancer):

- the first convolution of a task network's last decoder stage keeps the width of its
  concatenated input (128 -> 128 -> 64 at full width), where every other stage goes to its
  output width at once;
- the shared network's last decoder stage, whose output no task reads, maps to the first
  task's number of outputs (the reference's 13 classes). Its 44,583 parameters never get a
  gradient; polytask keeps them (and never runs the stage) for the reference's count, and
  ``reference_unused_stage=False`` leaves them out (123,699,409 parameters).

Shared: the shared network (SegNet's encoder, its decoder stages but the last, the unused
stage). Each task owns its network and its head. Shared representation: every shared tensor
a task network reads, ``p_0 .. p_{J-2}`` (``encoder.j.pooled``) and ``v_0 .. v_{K-1}``
(``decoder.k.input``), is marked with
:meth:`~polytask.models.MultiTaskModel.shared_representation`.

The reference initialises this model Xavier-uniform (its other SegNet models Xavier-normal);
polytask initialises it Xavier-normal like the others (the same variance).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Size, Tensor, nn

from ...errors import ConfigError
from ...tasks import Task
from ..backbones.segnet import SegNet, xavier_init_
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel
from .split import _depth, _layers

__all__ = ["Dense"]


class _Pooled(NamedTuple):
    indices: Tensor
    size: Size


def _down(x: Tensor) -> tuple[Tensor, _Pooled]:
    """2x2 max-pooling, and what unpooling needs."""
    pooled, indices = F.max_pool2d(x, kernel_size=2, stride=2, return_indices=True)
    return pooled, _Pooled(indices, x.shape[-2:])


def _up(x: Tensor, state: _Pooled) -> Tensor:
    """2x2 max-unpooling to the size before pooling."""
    return F.max_unpool2d(x, state.indices, (2, 2), (2, 2), output_size=state.size)


class _TaskNetwork(nn.Module):
    """One task's encoder and decoder stages."""

    def __init__(self, encoder: list[nn.Sequential], decoder: list[nn.Sequential]) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList(decoder)


@ARCHITECTURES.register("dense")
class Dense(MultiTaskModel):
    """A shared SegNet and one densely connected task network per task (see the module).

    Args:
        tasks: the tasks, by name.
        backbone: builds the shared network, a :class:`~polytask.models.backbones.SegNet`
            (any width multiplier); the task networks follow its widths and depths.
        head: builds a task's head from the width of its network's output.
        reference_unused_stage: keep the reference's last shared decoder stage, which no
            task reads, for the reference's parameter count.
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        reference_unused_stage: bool = True,
    ) -> None:
        super().__init__(list(tasks))
        net = backbone()
        if not isinstance(net, SegNet):
            raise ConfigError(
                f"architecture dense builds its task networks after SegNet's stages as the "
                f"MTAN reference does and needs the segnet backbone, found {type(net).__name__}."
            )
        encoder, decoder = list(net.encoder_stages), list(net.decoder_stages)
        enc_depths = [_depth(stage) for stage in net.encoder]
        dec_depths = [_depth(stage) for stage in net.decoder]

        self.shared_encoder = net.encoder
        self.shared_decoder = nn.ModuleList(list(net.decoder)[:-1])
        self.unused_stage: nn.Sequential | None = None
        if reference_unused_stage:
            last, outputs = decoder[-1], next(iter(tasks.values())).output_dim
            widths = [last.out_channels] * (dec_depths[-1] - 1) + [outputs]
            self.unused_stage = _layers(last.in_channels, widths)
            xavier_init_(self.unused_stage)

        def task_network() -> _TaskNetwork:
            enc = [
                _layers(
                    spec.in_channels + (encoder[j - 1].out_channels if j else 0),
                    [spec.out_channels] * depth,
                )
                for j, (spec, depth) in enumerate(zip(encoder, enc_depths, strict=True))
            ]
            dec = []
            for k, (spec, depth) in enumerate(zip(decoder, dec_depths, strict=True)):
                widths = [spec.out_channels] * depth
                if k == len(decoder) - 1:
                    widths[0] = 2 * spec.in_channels  # the reference's last stage
                dec.append(_layers(2 * spec.in_channels, widths))
            network = _TaskNetwork(enc, dec)
            xavier_init_(network)
            return network

        self.task_networks = nn.ModuleDict({name: task_network() for name in tasks})
        features = decoder[-1].out_channels
        self.out_features = features
        self.heads = nn.ModuleDict({name: head(task, features) for name, task in tasks.items()})

    def shared_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The shared tensors the task networks read: ``p_j`` and ``v_k`` (see the module)."""
        pooled: list[Tensor] = []
        states: list[_Pooled] = []
        h = x
        for stage in self.shared_encoder:
            h, state = _down(stage(h))
            pooled.append(h)
            states.append(state)
        inputs: list[Tensor] = []
        for k in range(len(self.shared_decoder) + 1):
            inputs.append(_up(h, states[-1 - k]))
            if k < len(self.shared_decoder):
                h = self.shared_decoder[k](inputs[-1])
        return pooled[:-1], inputs

    def task_features(
        self, task: str, x: Tensor, pooled: Sequence[Tensor], inputs: Sequence[Tensor]
    ) -> Tensor:
        """Task ``task``'s network output from the input and the shared ``p_j`` and ``v_k``."""
        network = self.task_networks[task]
        assert isinstance(network, _TaskNetwork)
        states: list[_Pooled] = []
        h = x
        for j, stage in enumerate(network.encoder):
            h, state = _down(stage(h if j == 0 else torch.cat((h, pooled[j - 1]), dim=1)))
            states.append(state)
        for k, stage in enumerate(network.decoder):
            h = stage(torch.cat((_up(h, states[-1 - k]), inputs[k]), dim=1))
        return h

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        pooled, inputs = self.shared_features(x)
        names = self.task_names if task is None else (task,)
        out: dict[str, Tensor] = {}
        for name in names:
            # each task network reads its own copy of the shared tensors
            own_pooled = [
                self.shared_representation(p, f"encoder.{j}.pooled", name)
                for j, p in enumerate(pooled)
            ]
            own_inputs = [
                self.shared_representation(v, f"decoder.{k}.input", name)
                for k, v in enumerate(inputs)
            ]
            out[name] = self.heads[name](self.task_features(name, x, own_pooled, own_inputs))
        return out

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.shared_encoder.parameters()
        yield from self.shared_decoder.parameters()
        if self.unused_stage is not None:
            yield from self.unused_stage.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.task_networks[task].parameters()
        yield from self.heads[task].parameters()
