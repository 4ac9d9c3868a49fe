"""Multi-Task Attention Network (Liu, Johns and Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019, https://arxiv.org/abs/1803.10704).

One shared staged network computes features for every task; each task reads them through
its own soft attention masks, one per stage. For encoder stage ``j`` with first-layer output
``u_j`` and last-layer output ``h_j``, task ``t`` keeps a stream ``s_j`` of its own::

    a_j = attention_tj([u_j ; s_{j-1}])        ([u_0] alone at the first stage)
    s_j = down_j(f_j(a_j * h_j))               f_j: shared conv3x3-BN-ReLU to the next width

and for decoder stage ``d`` with upsampled input ``v_d`` and last-layer output ``h_d``::

    g_d = g'_d(upsample(s_{d-1}))              g'_d: shared conv3x3-BN-ReLU to the stage's width
    s_d = attention_td([v_d ; g_d]) * h_d

where ``attention`` is conv1x1-BN-ReLU-conv1x1-BN-sigmoid, ``down_j`` is the backbone's own
downsampling after stage ``j`` (2x2 max-pooling for SegNet) and ``upsample`` is bilinear
(align_corners=True) to the size of ``v_d`` (x2 for SegNet, as in the reference). The task's
head reads the last ``s``. Without a decoder the head reads the last encoder stream.

Which parameters are shared: the backbone and the convolutions ``f_j``, ``g'_d`` (the
reference's ``encoder_block_att`` / ``decoder_block_att``), which every task's stream passes
through; a task owns its attention modules and its head. This is the partition the CAGrad
code uses for gradient methods; Nash-MTL and FAMO also manipulate the attention modules'
gradients, which ``balancer.shared: ["backbone.*", "shared_*", "attention.*"]`` selects.

Shared representation: the tensors of the shared network that the attention modules read
(``u_j``, ``h_j``, ``v_d``, ``h_d`` of every stage) are marked with
:meth:`~polytask.models.MultiTaskModel.shared_representation`. The convolutions ``f_j`` and
``g'_d`` read task streams, not shared tensors, so at ``level=feature`` they receive the plain
sum of the tasks' gradients.

If every mask is 1 the streams influence nothing: each task's head reads exactly the shared
network's features, i.e. the model is hard parameter sharing with the same backbone.

The reference stores uncertainty-weighting log-variances in the model (3 parameters, in its
reported 44,229,076); here that state belongs to the balancer, so MTAN on SegNet with the
three NYUv2 heads has 44,229,073 parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ...tasks import Task
from ..backbones.segnet import conv_bn_relu, xavier_init_
from ..backbones.staged import StagedBackbone, as_staged, run_stages
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel

__all__ = ["MTAN", "STAN", "AttentionBlock"]


class AttentionBlock(nn.Sequential):
    """conv1x1 -> BN -> ReLU -> conv1x1 -> BN -> sigmoid: a soft mask in (0, 1)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, hidden, kernel_size=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=1),
            nn.BatchNorm2d(out_channels),
            nn.Sigmoid(),
        )


class _TaskAttention(nn.Module):
    """One task's attention modules: one per encoder stage and one per decoder stage."""

    def __init__(self, encoder: list[AttentionBlock], decoder: list[AttentionBlock]) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList(decoder)


def _fit(x: Tensor, size: torch.Size) -> Tensor:
    """``x`` resized to the spatial ``size``: max-pooled down or bilinearly upsampled."""
    if x.shape[-2:] == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_max_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


@ARCHITECTURES.register("mtan")
class MTAN(MultiTaskModel):
    """A shared staged network with per-task attention masks at every stage.

    Args:
        tasks: the tasks, by name.
        backbone: builds the shared network; it must be a
            :class:`~polytask.models.backbones.staged.StagedBackbone` with 4-d feature maps.
        head: builds a task's head from the width of the features it reads.
        track_masks: record the mean of every mask in each forward pass (see
            :meth:`mask_statistics`; device-side means, no host synchronisation).
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        track_masks: bool = True,
    ) -> None:
        super().__init__(list(tasks))
        self.backbone = backbone()
        net = as_staged(self.backbone, needed_by=f"architecture {type(self).__name__}")
        encoder, decoder = list(net.encoder_stages), list(net.decoder_stages)

        # Stream widths: into the next encoder stage's width (the last one keeps its own),
        # then each decoder stage's output width.
        enc_stream = [s.out_channels for s in encoder[1:]] + [encoder[-1].out_channels]
        dec_stream_in = [enc_stream[-1], *(s.out_channels for s in decoder)][:-1]
        self.shared_encoder_convs = nn.ModuleList(
            conv_bn_relu(s.out_channels, w) for s, w in zip(encoder, enc_stream, strict=True)
        )
        self.shared_decoder_convs = nn.ModuleList(
            conv_bn_relu(w, s.out_channels) for s, w in zip(decoder, dec_stream_in, strict=True)
        )
        enc_in = [encoder[0].first_channels] + [
            s.first_channels + w for s, w in zip(encoder[1:], enc_stream[:-1], strict=True)
        ]
        self.attention = nn.ModuleDict(
            {
                name: _TaskAttention(
                    [
                        AttentionBlock(c, s.out_channels, s.out_channels)
                        for s, c in zip(encoder, enc_in, strict=True)
                    ],
                    [
                        AttentionBlock(
                            s.in_channels + s.out_channels, s.out_channels, s.out_channels
                        )
                        for s in decoder
                    ],
                )
                for name in tasks
            }
        )
        xavier_init_(self.shared_encoder_convs)
        xavier_init_(self.shared_decoder_convs)
        xavier_init_(self.attention)
        features = decoder[-1].out_channels if decoder else enc_stream[-1]
        self.out_features = features
        self.heads = nn.ModuleDict({name: head(task, features) for name, task in tasks.items()})
        self.stage_names: tuple[str, ...] = tuple(
            [f"encoder.{j}" for j in range(len(encoder))]
            + [f"decoder.{d}" for d in range(len(decoder))]
        )
        self.track_masks = track_masks
        self._mask_means: dict[str, dict[str, Tensor]] = {}
        self._recorded: dict[str, Tensor] | None = None

    def _net(self) -> StagedBackbone:
        # validated in __init__
        return cast(StagedBackbone, self.backbone)

    def _mark_pair(
        self, a: Tensor, b: Tensor, names: tuple[str, str], task: str
    ) -> tuple[Tensor, Tensor]:
        marked = self.shared_representation(a, names[0], task)
        # a one-layer stage's first output is its last: one point, read twice
        return marked, marked if b is a else self.shared_representation(b, names[1], task)

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        net = self._net()
        trace = run_stages(net, x)
        names = self.task_names if task is None else (task,)
        out: dict[str, Tensor] = {}
        for name in names:
            # each task's attention reads its own copy of the shared tensors
            encoder = [
                self._mark_pair(t.first, t.last, (f"encoder.{j}.first", f"encoder.{j}.last"), name)
                for j, t in enumerate(trace.encoder)
            ]
            decoder = [
                self._mark_pair(t.input, t.last, (f"decoder.{d}.input", f"decoder.{d}.last"), name)
                for d, t in enumerate(trace.decoder)
            ]
            features = self.attend(name, net, encoder, decoder)
            out[name] = self.heads[name](features)
        return out

    def attend(
        self,
        task: str,
        net: StagedBackbone,
        encoder: Sequence[tuple[Tensor, Tensor]],
        decoder: Sequence[tuple[Tensor, Tensor]],
    ) -> Tensor:
        """Task ``task``'s features from the shared ``(first, last)`` encoder tensors and
        ``(input, last)`` decoder tensors of every stage."""
        attention = self.attention[task]
        assert isinstance(attention, _TaskAttention)
        means: dict[str, Tensor] = {}
        stream: Tensor | None = None
        for j, (first, last) in enumerate(encoder):
            inputs = first if stream is None else torch.cat((first, stream), dim=1)
            mask = attention.encoder[j](inputs)
            stream = self.shared_encoder_convs[j](mask * last)
            stream = net.downsample(j, stream)[0]
            if j + 1 < len(encoder):
                stream = _fit(stream, encoder[j + 1][0].shape[-2:])
            if self.track_masks:
                means[f"encoder.{j}"] = mask.detach().mean()
            if self._recorded is not None:
                self._recorded[f"mask/{task}/encoder.{j}"] = mask.detach().mean(dim=1)
        assert stream is not None
        for d, (up, last) in enumerate(decoder):
            shared = self.shared_decoder_convs[d](_fit(stream, up.shape[-2:]))
            mask = attention.decoder[d](torch.cat((up, shared), dim=1))
            stream = mask * last
            if self.track_masks:
                means[f"decoder.{d}"] = mask.detach().mean()
            if self._recorded is not None:
                self._recorded[f"mask/{task}/decoder.{d}"] = mask.detach().mean(dim=1)
        if self.track_masks:
            self._mask_means[task] = means
        return stream

    def mask_statistics(self) -> dict[str, dict[str, Tensor]]:
        """``{task: {stage: mean mask value}}`` of the last forward pass (0-d tensors).

        Stages are named ``encoder.j`` and ``decoder.d`` in execution order
        (:attr:`stage_names`). Empty before the first forward pass or without ``track_masks``.
        """
        return {task: dict(means) for task, means in self._mask_means.items()}

    @torch.no_grad()
    def inspect(self, inputs: Tensor) -> dict[str, Tensor]:
        """Every task's attention masks on ``inputs``, averaged over channels:
        ``mask/<task>/<stage>`` of shape ``(B, H_stage, W_stage)``, values in (0, 1), for
        every stage of :attr:`stage_names` (the MTAN paper's Figure 5 shows such masks)."""
        self._recorded = {}
        try:
            self(inputs)
            return dict(self._recorded)
        finally:
            self._recorded = None

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.backbone.parameters()
        yield from self.shared_encoder_convs.parameters()
        yield from self.shared_decoder_convs.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.attention[task].parameters()
        yield from self.heads[task].parameters()


@ARCHITECTURES.register("stan")
class STAN(MTAN):
    """MTAN with a single task: the MTAN paper's single-task attention network baseline.

    On SegNet with the 13-class segmentation head it has 38,185,805 parameters, exactly the
    reference's count (the reference's STAN stores no uncertainty log-variances).
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        track_masks: bool = True,
    ) -> None:
        if len(tasks) != 1:
            raise ConfigError(
                f"architecture stan learns exactly one task, found {len(tasks)}: "
                f"{', '.join(tasks)}; use mtan for several tasks."
            )
        super().__init__(tasks=tasks, backbone=backbone, head=head, track_masks=track_masks)
