"""Cross-stitch networks (Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for
Multi-task Learning", CVPR 2016, https://arxiv.org/abs/1604.03539).

One column (a fresh copy of a staged backbone) per task. At chosen points between the
stages a cross-stitch unit replaces the K columns' activations ``x_1 .. x_K`` by linear
combinations of them, **each target task with its own mixing row**::

    x'_t = sum_s alpha[t, s] x_s                       (granularity="layer": alpha is K x K)
    x'_t[:, c] = sum_s alpha[t, s, c] x_s[:, c]        (granularity="channel": K x K x C)

at every position; column ``t`` continues from ``x'_t``. The gradient of a loss ``L`` with
respect to the unit is ``dL/dalpha[t, s] = <dL/dx'_t, x_s>`` summed over the batch and the
positions (and, per channel, over everything but the channel).

Initialisation is convex, ``init = (alpha_S, alpha_D)`` with ``alpha_S + alpha_D = 1``: the
diagonal is ``alpha_S`` and ``alpha_D`` is split equally over the other ``K - 1`` sources,
``alpha[t, s] = alpha_D / (K - 1)`` for ``s != t``, so every row sums to 1 (for K = 2 this is
the paper's ``[[alpha_S, alpha_D], [alpha_D, alpha_S]]``; the paper only treats two tasks).
Convexity is not enforced during training. The units learn ``lr_multiplier`` (100) times
faster than the network, through :meth:`CrossStitch.optimizer_param_groups`: the paper
found 10^2 to 10^3 necessary for the units to move at all, and higher rates diverged. The
units are not weight-decayed: decay would pull the mixing towards zero, i.e. towards
silencing the columns, with the multiplier amplifying it.

Placement (``placement="pool"``, the paper's choice: units after pool1, pool2, pool5, fc6
and fc7 of AlexNet, which worked better than after every convolution): a unit after the
downsampling of every encoder stage and, for an encoder-decoder such as SegNet, after every
decoder stage, including the last one, whose output the heads read (the analogue of the
paper's unit after fc7, just before each task's classifier). ``placement="stage"`` puts the
encoder units after each stage's last layer, before its downsampling (for SegNet: each
column then pools, and records pooling indices, from the mixed tensor). Each column's
upsampling uses what its own downsampling recorded.

``variant="mtan_reference"`` is the cross-stitch model of the MTAN reference code
(lorenmt/mtan, also used by the CAGrad code), kept only for comparison with its published
numbers: one scalar per (unit, source task), initialised to 1, and **the same mixture
``sum_s a_s x_s`` fed to every column** (no per-target row), no learning-rate scaling
(``lr_multiplier`` defaults to 1), and no unit on the features the heads read (on SegNet:
after the five encoder poolings and the first four decoder stages, nine units).

Which parameters are shared. The contract's definition (a task's parameters get gradient
from that task's loss only) makes almost the whole network shared: column ``s``'s output at
every unit reaches every task ``t`` through ``alpha[t, s]``, so ``dL_t / dtheta_s != 0`` for
every column parameter ``theta_s`` that lies before a unit (all of them in the paper
variant, whose last unit mixes the features). polytask therefore declares **shared**: the
units and every column's backbone; **task ``t``'s own**: its head only, which only
``L_t`` reaches. The gradients that flow: ``L_t`` -> head ``t`` -> (last unit) -> every
column's last stage and every unit's ``alpha[t, :]`` row -> ... -> every column. (In the
reference variant the last decoder stage of column ``t`` after the last unit reads the
common mixture and feeds head ``t`` only, so strictly it is task ``t``'s; the staged-backbone
protocol does not say which parameters a stage owns, so it is declared shared with the rest
of its column.) The common convention that treats each column as its task's own, with
gradient methods balancing the units only, is ``balancer.shared: ["units.*"]``.

Shared representation: the tensors the heads read (the last unit's outputs; in the
reference variant the columns' features), marked ``features.<task>``. Only these: the
columns read the other units' outputs, and they are shared modules.

The columns are laid out as in :class:`~polytask.models.sharing.single_task.SingleTask`
(``columns.<task>.0`` the backbone, ``columns.<task>.1`` the head), so ``init_columns`` can
start every column from a trained single-task network (the paper found this better than
starting from ImageNet weights); with ``init=(1.0, 0.0)`` the model computes exactly the
single-task networks.

Parameter counts on NYUv2 with SegNet and the three reference heads (13 / 1 / 3 outputs):
the reference variant has 74,941,804 parameters, the three single-task networks
(74,941,777) and 9 units x 3 tasks; the reference code reports 74,941,807 because it also
stores the three uncertainty-weighting log-variances, which polytask keeps in the balancer.
The paper variant per channel has 74,964,241: 10 units (one more, on the features) of
K x K x C = 9 C entries for C = 64, 128, 256, 512, 512 (encoder) and 512, 256, 128, 64, 64
(decoder), i.e. 22,464 unit parameters; per layer, 74,941,867 (10 units of 9).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from ...errors import CheckpointError, ConfigError, did_you_mean
from ...options import Limit
from ...tasks import Task
from ..backbones.staged import StagedBackbone
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel

__all__ = [
    "CrossStitch",
    "CrossStitchUnit",
    "ReferenceCrossStitchUnit",
    "convex_mixing_matrix",
    "load_column_weights",
    "mixing_points",
    "point_widths",
    "run_columns",
]

Placement = Literal["pool", "stage"]
Mixer = Callable[[int, list[Tensor]], list[Tensor]]


def _check_choice(arch: str, option: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
        raise ConfigError(
            f"architecture {arch}: expected option `{option}` to be one of "
            f"{', '.join(map(repr, allowed))}, found {value!r}.{hint}"
        )


def _check_init(arch: str, init: Sequence[float]) -> tuple[float, float]:
    """``init`` as ``(alpha_S, alpha_D)``: two non-negative numbers summing to 1."""
    values = tuple(init) if isinstance(init, (list, tuple)) else ()
    if len(values) != 2 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise ConfigError(
            f"architecture {arch}: expected option `init` to be two numbers "
            f"(alpha_S, alpha_D), found {init!r}."
        )
    same, other = float(values[0]), float(values[1])
    if not (same >= 0 and other >= 0 and abs(same + other - 1.0) <= 1e-6):
        raise ConfigError(
            f"architecture {arch}: option `init` must be a convex pair (alpha_S, alpha_D), "
            f"both >= 0 with alpha_S + alpha_D = 1, found ({same}, {other})."
        )
    return same, other


def convex_mixing_matrix(n: int, init: tuple[float, float]) -> Tensor:
    """The ``n x n`` matrix with ``init[0]`` on the diagonal and ``init[1] / (n - 1)`` elsewhere.

    Every row sums to ``init[0] + init[1]``; ``n`` must be at least 2.
    """
    if n < 2:
        raise ValueError(f"a mixing matrix needs at least 2 sources, found {n}")
    same, other = init
    eye = torch.eye(n)
    return same * eye + (other / (n - 1)) * (1 - eye)


def mixing_points(net: StagedBackbone) -> tuple[str, ...]:
    """The names of the points between the stages of ``net``, in execution order.

    ``encoder.j`` follows encoder stage ``j`` and ``decoder.d`` decoder stage ``d``; the
    last point's tensor is the backbone's features.
    """
    return tuple(
        [f"encoder.{j}" for j in range(len(net.encoder_stages))]
        + [f"decoder.{d}" for d in range(len(net.decoder_stages))]
    )


def point_widths(net: StagedBackbone) -> tuple[int, ...]:
    """The channels of the tensor at every point of :func:`mixing_points`."""
    return tuple(s.out_channels for s in [*net.encoder_stages, *net.decoder_stages])


def run_columns(
    nets: Sequence[StagedBackbone], x: Tensor, placement: Placement, mix: Mixer
) -> list[Tensor]:
    """Run staged columns side by side on ``x``; ``mix(point, tensors)`` acts at every point.

    At point ``i`` (see :func:`mixing_points`) ``mix`` receives the K columns' tensors and
    returns what the columns continue with. Encoder points are after the downsampling
    (``placement="pool"``) or before it (``"stage"``). Returns every column's features.
    """
    n_encoder = len(nets[0].encoder_stages)
    hs = [x] * len(nets)
    states: list[list[object]] = [[] for _ in nets]
    for j in range(n_encoder):
        lasts = [net.encode(j, h).last for net, h in zip(nets, hs, strict=True)]
        if placement == "stage":
            lasts = mix(j, lasts)
        hs = []
        for net, last, recorded in zip(nets, lasts, states, strict=True):
            pooled, state = net.downsample(j, last)
            recorded.append(state)
            hs.append(pooled)
        if placement == "pool":
            hs = mix(j, hs)
    for d in range(len(nets[0].decoder_stages)):
        hs = [
            net.decode(d, net.upsample(d, h, recorded)).last
            for net, h, recorded in zip(nets, hs, states, strict=True)
        ]
        hs = mix(n_encoder + d, hs)
    return hs


class CrossStitchUnit(nn.Module):
    """``x'_t = sum_s alpha[t, s] x_s``, per channel (``alpha``: K x K x C) or per layer (K x K).

    Inputs are K tensors of shape ``(N, C, ...)``; the same coefficients apply at every
    position.
    """

    def __init__(
        self, num_tasks: int, channels: int | None, init: tuple[float, float] = (0.9, 0.1)
    ) -> None:
        super().__init__()
        matrix = convex_mixing_matrix(num_tasks, init)
        if channels is not None:
            matrix = matrix[:, :, None].repeat(1, 1, channels)
        self.alpha = nn.Parameter(matrix)

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        x = torch.stack(list(xs))  # (K, N, C, ...)
        if self.alpha.dim() == 3:
            mixed = torch.einsum("tsc,snc...->tnc...", self.alpha, x)
        else:
            mixed = torch.einsum("ts,s...->t...", self.alpha, x)
        return list(mixed.unbind(0))

    def mixing_matrix(self) -> Tensor:
        """``alpha``: row ``t`` holds the coefficients of target task ``t``."""
        return self.alpha


class ReferenceCrossStitchUnit(nn.Module):
    """The MTAN reference's unit: ``m = sum_s a_s x_s`` (``a``: K scalars, initialised to 1),
    fed to every column alike."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(num_tasks))

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        mixed = torch.einsum("s,s...->...", self.alpha, torch.stack(list(xs)))
        return [mixed] * len(xs)

    def mixing_matrix(self) -> Tensor:
        """The equivalent K x K matrix: every row is ``a``."""
        k = self.alpha.shape[0]
        return self.alpha[None, :].expand(k, k)


def load_column_weights(
    columns: nn.ModuleDict, init_columns: Mapping[str, str | os.PathLike[str]], *, arch: str
) -> None:
    """Load ``columns[task]`` from the ``columns.<task>.*`` entries of a polytask checkpoint.

    A checkpoint written by a ``single_task`` run (``checkpoints/best.pt`` or ``last.pt``)
    holds one ``columns.<task>`` (backbone ``.0``, head ``.1``) per task it trained.

    Raises:
        ConfigError: ``init_columns`` names a task the model does not have.
        CheckpointError: the file is not a readable polytask checkpoint, has no column for
            the task, or its column's entries differ in name or shape from the model's.
    """
    # polytask.training imports the models: import it when the columns are loaded
    from ...training.checkpoint import load_checkpoint

    if not isinstance(init_columns, Mapping):
        raise ConfigError(
            f"architecture {arch}: expected option `init_columns` to map task names to "
            f"checkpoint paths, found {init_columns!r}."
        )
    for task, path in init_columns.items():
        if task not in columns:
            raise ConfigError(
                f"architecture {arch}: `init_columns` names unknown task {task!r}."
                f"{did_you_mean(task, columns.keys())} The tasks are: {', '.join(columns)}."
            )
        data = load_checkpoint(Path(path))
        state = data.get("model")
        if not isinstance(state, Mapping):
            raise CheckpointError(f"checkpoint {path} holds no model weights.")
        prefix = f"columns.{task}."
        own = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        where = f"architecture {arch}: init_columns[{task!r}] = {os.fspath(path)}"
        if not own:
            found = sorted({key.split(".")[1] for key in state if key.startswith("columns.")})
            has = (
                f"it has columns for {', '.join(map(repr, found))}"
                if found
                else "it is not a single_task model (no columns.<task>.* entries)"
            )
            raise CheckpointError(f"{where}: no column for task {task!r}; {has}.")
        column = columns[task]
        expected = {key: list(value.shape) for key, value in column.state_dict().items()}
        found_shapes = {key: list(value.shape) for key, value in own.items()}
        if expected != found_shapes:
            missing = sorted(set(expected) - set(found_shapes))
            unexpected = sorted(set(found_shapes) - set(expected))
            reshaped = sorted(
                k for k in set(expected) & set(found_shapes) if expected[k] != found_shapes[k]
            )
            parts = []
            if missing:
                parts.append(f"{len(missing)} entries missing (e.g. {prefix}{missing[0]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected entries (e.g. {prefix}{unexpected[0]})")
            if reshaped:
                k = reshaped[0]
                parts.append(
                    f"{len(reshaped)} entries of another shape (e.g. {prefix}{k}: "
                    f"{found_shapes[k]} in the checkpoint, {expected[k]} here)"
                )
            raise CheckpointError(
                f"{where}: the column does not match this model's: {'; '.join(parts)}. "
                "Use the backbone, backbone options and head the single-task run used."
            )
        column.load_state_dict(own)


@ARCHITECTURES.register("cross_stitch", limits={"lr_multiplier": Limit(gt=0)})
class CrossStitch(MultiTaskModel):
    """One staged column per task, mixed by cross-stitch units (see the module documentation).

    Args:
        tasks: the tasks, by name (at least two).
        backbone: builds one column; a
            :class:`~polytask.models.backbones.staged.StagedBackbone`.
        head: builds a task's head from the width of the column's features.
        granularity: ``"channel"`` (``alpha``: K x K x C per unit) or ``"layer"`` (K x K);
            paper variant only.
        init: ``(alpha_S, alpha_D)``, convex (the paper's default (0.9, 0.1)); paper variant
            only (the reference's units start at 1).
        lr_multiplier: the units' learning rate over the network's; ``None``: 100 for the
            paper variant, 1 for the reference variant.
        placement: ``"pool"`` (after each encoder downsampling) or ``"stage"`` (before it).
        init_columns: ``{task: checkpoint path}``: start those columns (backbone and head)
            from a ``single_task`` run's checkpoint.
        variant: ``"paper"`` or ``"mtan_reference"`` (the MTAN reference code's model).
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        granularity: Literal["channel", "layer"] = "channel",
        init: tuple[float, float] = (0.9, 0.1),
        lr_multiplier: float | None = None,
        placement: Placement = "pool",
        init_columns: Mapping[str, str] | None = None,
        variant: Literal["paper", "mtan_reference"] = "paper",
    ) -> None:
        super().__init__(list(tasks))
        arch = "cross_stitch"
        if len(tasks) < 2:
            raise ConfigError(
                f"architecture {arch} mixes the columns of several tasks; found "
                f"{len(tasks)} task ({', '.join(tasks)}). Use single_task for one task."
            )
        _check_choice(arch, "granularity", granularity, ("channel", "layer"))
        _check_choice(arch, "placement", placement, ("pool", "stage"))
        _check_choice(arch, "variant", variant, ("paper", "mtan_reference"))
        convex = _check_init(arch, init)
        if lr_multiplier is None:
            lr_multiplier = 100.0 if variant == "paper" else 1.0
        if (
            isinstance(lr_multiplier, bool)
            or not isinstance(lr_multiplier, (int, float))
            or not 0 < lr_multiplier < math.inf
        ):
            raise ConfigError(
                f"architecture {arch}: expected option `lr_multiplier` to be a positive "
                f"number, found {lr_multiplier!r}."
            )
        self.granularity = granularity
        self.placement: Placement = placement
        self.variant = variant
        self.lr_multiplier = float(lr_multiplier)

        self.columns, nets = staged_columns(tasks, backbone, head, arch)

        points = mixing_points(nets[0])
        widths = point_widths(nets[0])
        mixed = range(len(points) if variant == "paper" else len(points) - 1)
        k = len(tasks)
        self.units = nn.ModuleList(
            CrossStitchUnit(k, widths[i] if granularity == "channel" else None, convex)
            if variant == "paper"
            else ReferenceCrossStitchUnit(k)
            for i in mixed
        )
        self.unit_names: tuple[str, ...] = tuple(points[i] for i in mixed)
        self._unit_at = {i: u for u, i in enumerate(mixed)}
        if init_columns:
            load_column_weights(self.columns, init_columns, arch=arch)

    def _backbone(self, task: str) -> nn.Module:
        return cast(nn.Sequential, self.columns[task])[0]

    def _head(self, task: str) -> nn.Module:
        return cast(nn.Sequential, self.columns[task])[1]

    def _nets(self) -> list[StagedBackbone]:
        # validated in __init__
        return [cast(StagedBackbone, self._backbone(t)) for t in self.task_names]

    def _mix(self, point: int, xs: list[Tensor]) -> list[Tensor]:
        u = self._unit_at.get(point)
        if u is None:
            return xs
        out: list[Tensor] = self.units[u](xs)
        return out

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        features = run_columns(self._nets(), x, self.placement, self._mix)
        by_task = dict(zip(self.task_names, features, strict=True))
        names = self.task_names if task is None else (task,)
        out: dict[str, Tensor] = {}
        for name in names:
            z = self.shared_representation(by_task[name], f"features.{name}", name)
            out[name] = self._head(name)(z)
        return out

    def alphas(self) -> dict[str, Tensor]:
        """``{unit name: alpha}``, detached copies: K x K x C (per channel) or K x K.

        Row ``t`` holds target task ``t``'s coefficients over the source tasks, in the order
        of :attr:`task_names`; for the reference variant every row is the common mixture.
        Units are named after their point (``encoder.j``, ``decoder.d``; see
        :attr:`unit_names`).
        """
        units = cast(list[CrossStitchUnit | ReferenceCrossStitchUnit], list(self.units))
        return {
            name: unit.mixing_matrix().detach().clone()
            for name, unit in zip(self.unit_names, units, strict=True)
        }

    def diagnostics(self) -> dict[str, Any]:
        """Per unit and target task ``t``: ``alpha_S`` (``alpha[t, t]``) and ``alpha_D``
        (``sum_{s != t} alpha[t, s]``, what ``t`` takes from the other columns), each the
        mean over channels with per-channel units.

        ``{"alpha_S": {unit: {task: value}}, "alpha_D": {unit: {task: value}}}``; with the
        convex initialisation ``init = (alpha_S, alpha_D)`` these start at ``init``.
        """
        same: dict[str, dict[str, float]] = {}
        other: dict[str, dict[str, float]] = {}
        for unit, alpha in self.alphas().items():
            per_pair = alpha.double().reshape(alpha.shape[0], alpha.shape[1], -1).mean(-1)
            diagonal = per_pair.diagonal()
            rest = per_pair.sum(1) - diagonal
            same[unit] = dict(zip(self.task_names, diagonal.tolist(), strict=True))
            other[unit] = dict(zip(self.task_names, rest.tolist(), strict=True))
        return {"alpha_S": same, "alpha_D": other}

    @torch.no_grad()
    def inspect(self, inputs: Tensor) -> dict[str, Tensor]:
        """Every unit's ``alpha`` (see :meth:`alphas`) as ``alpha/<unit>``; the inputs are
        not needed."""
        return {f"alpha/{unit}": alpha for unit, alpha in self.alphas().items()}

    def optimizer_param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The network at ``lr``; the units at ``lr * lr_multiplier`` without weight decay."""
        units = list(self.units.parameters())
        ids = {id(p) for p in units}
        network = [p for p in self.parameters() if id(p) not in ids]
        return [
            {"params": network, "lr": lr, "name": "model"},
            {
                "params": units,
                "lr": lr * self.lr_multiplier,
                "weight_decay": 0.0,
                "name": "cross_stitch_units",
            },
        ]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.units.parameters()
        for name in self.task_names:
            yield from self._backbone(name).parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self._head(task).parameters()


def staged_columns(
    tasks: Mapping[str, Task], backbone: BackboneFactory, head: HeadFactory, arch: str
) -> tuple[nn.ModuleDict, list[StagedBackbone]]:
    """One column per task (a fresh staged backbone followed by the task's head; the ``mlp``
    backbone staged by its linear layers), and the backbones, checked to have the same stages
    (cross-stitch and sluice mix them)."""
    from .depths import staged_or_mlp

    columns: dict[str, nn.Module] = {}
    nets: list[StagedBackbone] = []
    for name, task in tasks.items():
        net = staged_or_mlp(backbone(), needed_by=f"architecture {arch}")
        nets.append(net)
        columns[name] = nn.Sequential(cast(nn.Module, net), head(task, net.out_features))
    _check_same_stages(nets, arch)
    return nn.ModuleDict(columns), nets


def _check_same_stages(nets: Sequence[StagedBackbone], arch: str) -> None:
    """Columns must have identical stages to be mixed position by position."""
    first = (tuple(nets[0].encoder_stages), tuple(nets[0].decoder_stages))
    for net in nets[1:]:
        if (tuple(net.encoder_stages), tuple(net.decoder_stages)) != first:
            raise ConfigError(
                f"architecture {arch}: the backbone factory built columns with different "
                "stages; every column must have the same stage widths."
            )
