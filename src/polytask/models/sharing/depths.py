"""Tasks at different depths of one shared network: low supervision and the Joint Many-Task
model.

- **Low supervision** (Søgaard and Goldberg, "Deep multi-task learning with low level tasks
  supervised at lower layers", ACL 2016, https://aclanthology.org/P16-2038): one shared
  network, and each task's head reads the output of the layer at **its own depth**; a
  lower-level task is supervised at a lower layer, so the layers above it serve the higher
  tasks only.
- **Joint Many-Task model** (Hashimoto, Xiong, Tsuruoka and Socher, "A Joint Many-Task
  Model: Growing a Neural Network for Multiple NLP Tasks", EMNLP 2017,
  https://arxiv.org/abs/1611.01587), adding to the above (``shortcuts: true``):

  * **shortcut connections from the input**: every layer above the first reads the input
    as well as the layer below;
  * **label embeddings**: a task's prediction is embedded as ``y_s = sum_c p(c | h_s) l_s(c)``,
    the expectation of learned label vectors ``l_s(c)`` (``label_embedding`` numbers each)
    under the predicted distribution, and every layer above the task reads it;
  * **successive regularisation** (``successive: delta > 0``): an L2 penalty keeping the
    parameters the lower tasks were trained with near their values of a moment before,
    ``delta ||theta_lower - theta'_lower||^2``, so training a higher task does not undo
    the lower ones.

**Depths.** The network is any staged backbone
(:class:`~polytask.models.backbones.staged.StagedBackbone`; the ``mlp`` backbone is staged
here one linear layer per stage). Its points are numbered from 1: point ``j`` follows encoder
stage ``j`` (after its downsampling), then come the decoder stages; the last point is the
backbone's features. ``depths: {task: d}`` puts the task's head on point ``d``; tasks not
named read the last point (with every task there, the model is hard sharing). Stages above
the deepest task are not run. A head on an intermediate feature map reads it through a
readout, an adaptive average pooling to ``readout_grid x readout_grid`` then flattened
(``readout_grid: null``: the map itself, for dense heads); the last point is read as it is,
as in every other architecture.

**Formulas.** With ``h_j`` the input of stage ``j`` (0-based; the output of the point
below), JMT's stages read ``h_j + P_j(x) + sum_{s: d_s <= j} Q_{j,s}(y_s)``, where ``P_j``
and ``Q_{j,s}`` are linear maps over the channels (no bias), ``x`` is the input (average
pooled to ``h_j``'s resolution, or flattened where ``h_j`` is a vector) and ``y_s`` is task
``s``'s label embedding (averaged over positions where ``h_j`` is a vector, broadcast where
it is a map). ``p(c | h_s)`` is the softmax of the prediction for a ``classification`` task,
its sigmoid for a ``multilabel`` task and the prediction itself otherwise. The successive
regularisation is::

    R = delta * sum_t sum_{p in Theta_t} ||p - p'||^2

where ``Theta_t`` holds the parameters of everything the predictions of the tasks below
``t`` (``d_s < d_t``) depend on: the stages up to the highest of them, the shortcut maps into
those stages and, with label embeddings, the lower tasks' heads and the embeddings those
stages read; ``p'`` is ``p``'s anchor. A parameter
below several tasks is counted once per task, as in JMT, where each task's objective has its
own term.

**Where this deviates from the papers.**

- JMT concatenates ``[h, x, y_s]`` before a layer; here the shortcuts are added after linear
  maps to the layer's input width (a concatenation followed by the layer's first linear
  map is a sum of linear maps of each part; here the part of ``x`` and ``y`` is ``W P`` with
  ``W`` the layer's own weights), so that any staged backbone takes them unchanged.
- JMT trains the tasks one after the other within an epoch, and the anchor ``theta'`` of a
  lower task's parameters is their value after that task's own pass. polytask trains the
  tasks jointly, every step; the anchors are the values at the end of the previous
  training epoch (at the start, the initial values), refreshed by the trainer's
  end-of-epoch hook (:meth:`TaskDepths.adapt`; :meth:`TaskDepths.refresh_anchors` in code)
  and saved with the checkpoints. Its gradient ``2 delta c_p (p - p')`` is added as is to
  the balanced gradient.
- Both papers stack bidirectional LSTMs over words; here a stage is whatever the backbone's
  stage is.

**Partition.** A module belongs to the tasks whose loss reaches it: stage ``j`` and the
shortcut maps into it are reached by the tasks above it (``d_t > j``), a task's head by the
task itself and, with label embeddings, by every task above it, and its label embedding by
the tasks above it. What exactly one task reaches is that task's; the rest (two or more
tasks, or none: the stages above the deepest task) is shared. Which parameters a stage owns
is found once, at construction, by the gradient of each stage's output alone.

**Shared representation.** Without shortcuts, the tensor each head reads (``point.<j>``,
one copy per task). Tasks at different depths then have their feature-level gradients on
different tensors, which a feature-level method treats as orthogonal (their Gramian has
zeros between them): gradient methods are better used at the parameter level here. With shortcuts the heads of lower tasks feed the shared stages above
them, so no point is marked and feature-level balancing does not apply.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError, did_you_mean
from ...options import Limit
from ...tasks import Task
from ..backbones.small import MLP
from ..backbones.staged import StagedBackbone, StageOutput, StageSpec, as_staged
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel

__all__ = ["JointManyTask", "StagedMLP", "TaskDepths", "staged_or_mlp"]


class StagedMLP(nn.Module):
    """The ``mlp`` backbone as a :class:`StagedBackbone`: one stage per linear layer (with
    its ReLU and dropout), no resolution change; the first stage flattens the input."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.mlp = mlp
        layers = list(mlp.net)
        starts = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
        self._ranges = tuple(zip(starts, [*starts[1:], len(layers)], strict=True))
        self._specs = tuple(
            StageSpec(linear.in_features, linear.out_features, linear.out_features)
            for linear in (cast(nn.Linear, layers[i]) for i in starts)
        )
        self.out_features = mlp.out_features

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.mlp(x)
        return out

    @property
    def encoder_stages(self) -> Sequence[StageSpec]:
        return self._specs

    @property
    def decoder_stages(self) -> Sequence[StageSpec]:
        return ()

    def encode(self, stage: int, x: Tensor) -> StageOutput:
        start, stop = self._ranges[stage]
        h = x.flatten(1) if stage == 0 else x
        first = self.mlp.net[start](h)
        h = first
        for k in range(start + 1, stop):
            h = self.mlp.net[k](h)
        return StageOutput(first, h)

    def downsample(self, stage: int, x: Tensor) -> tuple[Tensor, object]:
        return x, None

    def upsample(self, stage: int, x: Tensor, states: Sequence[object]) -> Tensor:
        raise IndexError(f"mlp has no decoder stage {stage}.")

    def decode(self, stage: int, x: Tensor) -> StageOutput:
        raise IndexError(f"mlp has no decoder stage {stage}.")


def staged_or_mlp(net: nn.Module, *, needed_by: str) -> StagedBackbone:
    """``net`` as a staged backbone; the ``mlp`` backbone is wrapped in :class:`StagedMLP`."""
    if isinstance(net, MLP):
        return cast(StagedBackbone, StagedMLP(net))
    return as_staged(net, needed_by=needed_by)


class ChannelLinear(nn.Linear):
    """A linear map over dimension 1 (the channels) of a tensor of any rank, no bias."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def _pool_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """``x`` average pooled to the spatial ``size`` (``x`` of rank ``2 + len(size)``)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if len(size) == 1:
        return F.adaptive_avg_pool1d(x, list(size))
    if len(size) == 2:
        return F.adaptive_avg_pool2d(x, (size[0], size[1]))
    return F.adaptive_avg_pool3d(x, (size[0], size[1], size[2]))


def _like(source: Tensor, target: Tensor) -> Tensor:
    """``source`` (``(N, C)`` or ``(N, C, ...)``) at ``target``'s resolution: averaged over
    positions for a vector target, broadcast or pooled for a map."""
    if target.dim() == 2:
        return source if source.dim() == 2 else source.flatten(2).mean(2)
    if source.dim() == 2:
        return source.reshape(*source.shape, *([1] * (target.dim() - 2)))
    return _pool_to(source, target.shape[2:])


def _check_number(arch: str, option: str, value: object, low: float, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or not math.isfinite(value)
        or value < low
    ):
        what = "an integer" if integer else "a finite number"
        raise ConfigError(
            f"architecture {arch}: expected option `{option}` to be {what} >= {low}, "
            f"found {value!r}."
        )


@ARCHITECTURES.register(
    "task_depths",
    limits={
        "depths": Limit(ge=1),
        "label_embedding": Limit(ge=1),
        "successive": Limit(ge=0),
        "readout_grid": Limit(ge=1),
    },
)
class TaskDepths(MultiTaskModel):
    """Each task's head at its own depth of one staged network (see the module docs).

    Args:
        tasks: the tasks, by name.
        backbone: builds the shared network; a staged backbone or ``mlp``.
        head: builds a task's head from the width it reads.
        input_shape: the shape of one input sample (polytask passes it).
        depths: ``{task: point}``, points numbered from 1; tasks not named read the last
            point (the backbone's features).
        shortcuts: JMT's shortcut connections from the input and label embeddings.
        label_embedding: the size of a label's embedding (with ``shortcuts``).
        successive: ``delta``, the weight of the successive regularisation (0: none).
        readout_grid: the pooled grid a head reads from an intermediate feature map, or
            ``None`` to read the map itself.
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        input_shape: Sequence[int],
        depths: Mapping[str, int] | None = None,
        shortcuts: bool = False,
        label_embedding: int = 16,
        successive: float = 0.0,
        readout_grid: int | None = 1,
    ) -> None:
        super().__init__(list(tasks))
        arch = "jmt" if shortcuts else "task_depths"
        self.backbone = cast(nn.Module, staged_or_mlp(backbone(), needed_by=f"architecture {arch}"))
        net = self._net
        self._n_encoder = len(net.encoder_stages)
        n_points = self._n_encoder + len(net.decoder_stages)
        self.depths = _check_depths(arch, depths or {}, tasks, n_points)
        _check_number(arch, "label_embedding", label_embedding, 1, integer=True)
        _check_number(arch, "successive", successive, 0, integer=False)
        if readout_grid is not None:
            _check_number(arch, "readout_grid", readout_grid, 1, integer=True)
        if not input_shape or any(int(d) < 1 for d in input_shape):
            raise ConfigError(
                f"architecture {arch}: expected `input_shape` to be positive sizes, found "
                f"{tuple(input_shape)}."
            )
        self.shortcuts = bool(shortcuts)
        self.successive = float(successive)
        self.readout_grid = readout_grid
        self.n_points = n_points
        self.n_run = max(self.depths.values())
        self._kinds = {name: task.kind for name, task in tasks.items()}

        inputs, points, owners = self._trace(input_shape)
        heads: dict[str, nn.Module] = {}
        for name, task in tasks.items():
            shape = points[self.depths[name] - 1]
            width = shape[0]
            if self._reads_out(self.depths[name] - 1, len(shape) + 1):
                width *= cast(int, readout_grid) ** (len(shape) - 1)
            heads[name] = head(task, width)
        self.heads = nn.ModuleDict(heads)

        self.input_maps = nn.ModuleDict()
        self.label_maps = nn.ModuleDict()
        self.embeddings = nn.ModuleDict()
        if self.shortcuts:
            for j in range(1, self.n_run):
                width = inputs[j][0]
                # the input as stage j reads it: flattened for a vector, pooled for a map
                flat = len(inputs[j]) == 1
                x_channels = math.prod(input_shape) if flat else int(input_shape[0])
                self.input_maps[str(j)] = ChannelLinear(x_channels, width)
                below = [t for t in self.task_names if self.depths[t] <= j]
                self.label_maps[str(j)] = nn.ModuleDict(
                    {t: ChannelLinear(label_embedding, width) for t in below}
                )
            for name, task in tasks.items():
                if self.depths[name] < self.n_run:
                    self.embeddings[name] = ChannelLinear(task.output_dim, label_embedding)
        self._stage_params = owners
        self._groups = self._partition()
        self.anchors = nn.Module()
        self._moved: float | None = None
        self._penalised = self._penalty_counts()
        for i, (p, _) in enumerate(self._penalised):
            self.anchors.register_buffer(f"p{i}", p.detach().clone())

    # -- running the stages ------------------------------------------------------------------

    @property
    def _net(self) -> StagedBackbone:
        return cast(StagedBackbone, self.backbone)

    def _stage(self, j: int, h: Tensor, states: list[object]) -> Tensor:
        net = self._net
        if j < self._n_encoder:
            out = net.encode(j, h).last
            h, state = net.downsample(j, out)
            states.append(state)
            return h
        d = j - self._n_encoder
        return net.decode(d, net.upsample(d, h, states)).last

    def _reads_out(self, point: int, rank: int) -> bool:
        return self.readout_grid is not None and rank > 2 and point < self.n_points - 1

    def _readout(self, point: int, z: Tensor) -> Tensor:
        if not self._reads_out(point, z.dim()):
            return z
        grid = [cast(int, self.readout_grid)] * (z.dim() - 2)
        return _pool_to(z, grid).flatten(1)

    def _trace(
        self, input_shape: Sequence[int]
    ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], list[list[nn.Parameter]]]:
        """One dry pass on zeros, in evaluation mode: every stage's input and output shape
        (without the batch dimension) and the parameters each stage's output depends on."""
        was_training = self.backbone.training
        self.backbone.eval()
        params = list(self.backbone.parameters())
        inputs: list[tuple[int, ...]] = []
        points: list[tuple[int, ...]] = []
        owners: list[list[nn.Parameter]] = []
        try:
            with torch.enable_grad():
                h = torch.zeros(2, *(int(d) for d in input_shape))
                states: list[object] = []
                for j in range(self.n_points):
                    h = h.detach()
                    inputs.append(tuple(h.shape[1:]) if j > 0 else tuple(h.flatten(1).shape[1:]))
                    h = self._stage(j, h, states)
                    points.append(tuple(h.shape[1:]))
                    grads = torch.autograd.grad(h.float().sum(), params, allow_unused=True)
                    owners.append([p for p, g in zip(params, grads, strict=True) if g is not None])
        finally:
            self.backbone.train(was_training)
        # the input of stage 0 as its first layer sees it: a map, or flattened for an MLP
        if not isinstance(self.backbone, StagedMLP):
            inputs[0] = tuple(int(d) for d in input_shape)
        return inputs, points, owners

    def _inject(self, j: int, x: Tensor, h: Tensor, embedded: Mapping[str, Tensor]) -> Tensor:
        source = x.flatten(1) if h.dim() == 2 else _pool_to(x, h.shape[2:])
        h = h + self.input_maps[str(j)](source)
        maps = cast(nn.ModuleDict, self.label_maps[str(j)])
        for name, module in maps.items():
            h = h + module(_like(embedded[name], h))
        return h

    def _label_distribution(self, name: str, pred: Tensor) -> Tensor:
        if self._kinds[name] == "classification":
            return pred.softmax(1)
        if self._kinds[name] == "multilabel":
            return pred.sigmoid()
        return pred

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        wanted = self.task_names if task is None else (task,)
        need = max(self.depths[t] for t in wanted)
        h = x
        states: list[object] = []
        preds: dict[str, Tensor] = {}
        embedded: dict[str, Tensor] = {}
        for j in range(need):
            if j > 0 and self.shortcuts:
                h = self._inject(j, x, h, embedded)
            h = self._stage(j, h, states)
            for name in self.task_names:
                if self.depths[name] != j + 1:
                    continue
                feeds = self.shortcuts and self.depths[name] < need
                if name not in wanted and not feeds:
                    continue
                z = h if self.shortcuts else self.shared_representation(h, f"point.{j}", name)
                preds[name] = self.heads[name](self._readout(j, z))
                if feeds:
                    dist = self._label_distribution(name, preds[name])
                    embedded[name] = self.embeddings[name](dist)
        return {name: preds[name] for name in wanted}

    # -- which task reaches what --------------------------------------------------------------

    def reached_by(self) -> list[tuple[list[nn.Parameter], frozenset[str]]]:
        """Every group of parameters with the tasks whose loss reaches it (see module docs)."""
        above = [
            frozenset(t for t in self.task_names if self.depths[t] > j)
            for j in range(self.n_points)
        ]
        groups: list[tuple[list[nn.Parameter], frozenset[str]]] = []
        for j, params in enumerate(self._stage_params):
            groups.append((params, above[j]))
        for key, module in self.input_maps.items():
            groups.append((list(module.parameters()), above[int(key)]))
        for key, maps in self.label_maps.items():
            groups.append((list(maps.parameters()), above[int(key)]))
        for name in self.task_names:
            d = self.depths[name]
            readers = {name} | (set(above[d]) if self.shortcuts and d < self.n_run else set())
            groups.append((list(self.heads[name].parameters()), frozenset(readers)))
            if name in self.embeddings:
                groups.append((list(self.embeddings[name].parameters()), above[d]))
        return groups

    def _partition(self) -> dict[str | None, list[nn.Parameter]]:
        out: dict[str | None, list[nn.Parameter]] = {None: []}
        out.update({t: [] for t in self.task_names})
        seen: set[int] = set()
        for params, readers in self.reached_by():
            key = next(iter(readers)) if len(readers) == 1 else None
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    out[key].append(p)
        # parameters no stage's output depends on (none in the built-in backbones)
        out[None] += [p for p in self.parameters() if id(p) not in seen]
        return out

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self._groups[None])

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return iter(self._groups[task])

    # -- successive regularisation ----------------------------------------------------------

    def lower_parameters(self, task: str) -> list[nn.Parameter]:
        """``Theta_task``: the parameters of everything the tasks below ``task`` depend on."""
        lower = [t for t in self.task_names if self.depths[t] < self.depths[task]]
        if not lower:
            return []
        top = max(self.depths[t] for t in lower)
        params: list[nn.Parameter] = []
        for j in range(top):
            params += self._stage_params[j]
            if str(j) in self.input_maps:
                params += list(self.input_maps[str(j)].parameters())
                params += list(self.label_maps[str(j)].parameters())
        if self.shortcuts:
            for t in self.task_names:
                if self.depths[t] <= top:
                    params += list(self.heads[t].parameters())
                if self.depths[t] < top:  # read by a stage below the top lower task
                    params += list(self.embeddings[t].parameters())
        unique: dict[int, nn.Parameter] = {id(p): p for p in params}
        return list(unique.values())

    def _penalty_counts(self) -> list[tuple[nn.Parameter, int]]:
        counts: dict[int, int] = {}
        by_id: dict[int, nn.Parameter] = {}
        for task in self.task_names:
            for p in self.lower_parameters(task):
                counts[id(p)] = counts.get(id(p), 0) + 1
                by_id[id(p)] = p
        return [(by_id[i], c) for i, c in counts.items()]

    def anchor_values(self) -> list[Tensor]:
        """The anchors ``p'``, in the order of the penalised parameters."""
        return [self.anchors.get_buffer(f"p{i}") for i in range(len(self._penalised))]

    @torch.no_grad()
    def refresh_anchors(self) -> None:
        """Set every anchor to its parameter's current value."""
        for (p, _), anchor in zip(self._penalised, self.anchor_values(), strict=True):
            anchor.copy_(p)

    def adapt(self, context: object) -> bool:
        """At the end of every training epoch: refresh the anchors; the structure stays."""
        self._moved = self.anchor_distance()
        self.refresh_anchors()
        return False

    @torch.no_grad()
    def anchor_distance(self) -> float:
        """``sqrt(sum_p ||p - p'||^2)`` over the penalised parameters (0 without any)."""
        total = sum(
            float((p - a).double().square().sum())
            for (p, _), a in zip(self._penalised, self.anchor_values(), strict=True)
        )
        return math.sqrt(total)

    def regularization(self) -> Tensor | None:
        """``delta * sum_p c_p ||p - p'||^2`` (``c_p``: the tasks ``p`` lies below), or None
        without successive regularisation."""
        if self.successive == 0 or not self._penalised:
            return None
        terms = [
            count * (p - anchor).square().sum()
            for (p, count), anchor in zip(self._penalised, self.anchor_values(), strict=True)
        ]
        return self.successive * torch.stack(terms).sum()

    def diagnostics(self) -> dict[str, Any]:
        """With successive regularisation, ``{"anchor_distance": value}``: how far the
        penalised parameters moved from their anchors during the last epoch (measured by
        :meth:`adapt` before it refreshes them; until then, the distance now)."""
        if self.successive == 0 or not self._penalised:
            return {}
        moved = self._moved
        return {"anchor_distance": self.anchor_distance() if moved is None else moved}


@ARCHITECTURES.register(
    "jmt",
    limits={
        "depths": Limit(ge=1),
        "label_embedding": Limit(ge=1),
        "successive": Limit(ge=0),
        "readout_grid": Limit(ge=1),
    },
)
def JointManyTask(
    *,
    tasks: Mapping[str, Task],
    backbone: BackboneFactory,
    head: HeadFactory,
    input_shape: Sequence[int],
    depths: Mapping[str, int] | None = None,
    label_embedding: int = 16,
    successive: float = 0.01,
    readout_grid: int | None = 1,
) -> TaskDepths:
    """The Joint Many-Task model: :class:`TaskDepths` with shortcuts, label embeddings and
    successive regularisation (``successive``: delta, 0.01 by default; the right value
    depends on the scale of the task losses)."""
    return TaskDepths(
        tasks=tasks,
        backbone=backbone,
        head=head,
        input_shape=input_shape,
        depths=depths,
        shortcuts=True,
        label_embedding=label_embedding,
        successive=successive,
        readout_grid=readout_grid,
    )


def _check_depths(
    arch: str, depths: Mapping[str, int], tasks: Mapping[str, Task], n_points: int
) -> dict[str, int]:
    if not isinstance(depths, Mapping):
        raise ConfigError(
            f"architecture {arch}: expected option `depths` to map task names to points "
            f"(1 to {n_points}), found {depths!r}."
        )
    for name, d in depths.items():
        if name not in tasks:
            raise ConfigError(
                f"architecture {arch}: `depths` names unknown task {name!r}."
                f"{did_you_mean(name, tasks.keys())} The tasks are: {', '.join(tasks)}."
            )
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= n_points:
            raise ConfigError(
                f"architecture {arch}: expected `depths.{name}` to be a point from 1 to "
                f"{n_points} (the backbone's stages), found {d!r}."
            )
    return {name: int(depths.get(name, n_points)) for name in tasks}
