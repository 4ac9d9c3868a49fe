"""Sluice networks (Ruder, Bingel, Augenstein and Søgaard, "Latent Multi-Task Architecture
Learning", AAAI 2019, https://arxiv.org/abs/1705.08142).

One column (a fresh copy of a staged backbone) per task, as in cross-stitch networks, with
three additions that let the network learn what to share:

**Subspaces and alpha.** At every point between the stages (see
:func:`~polytask.models.sharing.cross_stitch.mixing_points`) the output of each column's
layer is split into ``S = subspaces`` equal groups of channels, ``x_t = [x_{t,1}; ..;
x_{t,S}]``, and a learned ``(K S) x (K S)`` matrix mixes all the tasks' subspaces::

    x'_{t,s} = sum_{u, r} alpha[(t, s), (u, r)] x_{u,r}       (row and column (t, s): t S + s)

at every position. Initialisation is convex like cross-stitch's: ``init = (alpha_S,
alpha_D)``, ``alpha_S`` on the diagonal and ``alpha_D / (K S - 1)`` everywhere else (the
reference code's subspace initialisation is written for two tasks only; this is its
generalisation with every row summing to 1). Convexity is not enforced during training.

**Beta (layer skip connections).** Each task's head reads a learned combination of the
outputs of several layers of its own column (after mixing)::

    h_t = sum_l beta_t[l] z_{t,l}

over the points whose width equals the features' (so that they can be added; for SegNet:
``encoder.0``, ``decoder.3`` and the features), each resized to the features' resolution
(bilinear upsampling with aligned corners, average pooling to a smaller size). The last
entry is always the column's features. Initialisation as the reference code's "imbalanced"
scheme: ``beta_init`` (0.9) on the features and ``(1 - beta_init) / (L - 1)`` on the
``L - 1`` other layers, so each task's betas sum to 1 (a single layer gets beta 1).
:attr:`Sluice.beta_names` names the layers.

**Orthogonality.** The subspaces of a layer are encouraged to hold different information
with the penalty ``sum_{t, l} sum_{s < r} ||G_{t,l,s}^T G_{t,l,r}||_F^2 / P^2`` where
``G_{t,l,s}`` is the ``P x (C / S)`` matrix of subspace ``s`` of task ``t``'s layer ``l``
before mixing (one row per sample and position, P rows). The paper's penalty has no
``1 / P^2``; it is added here so that the penalty does not grow with the batch size and the
image size (it is the squared norm of the uncentred cross-correlation of the subspaces). The
reference code constrains LSTM weight matrices instead of layer outputs; a staged backbone
does not say which weights produce a stage's output, so the outputs are used, as in the
paper's formula. :meth:`Sluice.regularization` returns ``orthogonality_weight`` times the
penalty of the last forward pass run with gradient; the default weight 0 (no constraint,
``regularization()`` is None) is the reference code's default.

Which parameters are shared: every point has a unit (including the features), so every
column parameter reaches every task's loss (see
:class:`~polytask.models.sharing.cross_stitch.CrossStitch` for the argument): **shared** are
the alpha units and every column's backbone; **task ``t``'s own** are its betas and its head,
which only ``L_t`` reaches. The shared representation is what the betas read: every
(mixed) layer output a task combines, marked ``<layer>.<task>``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ...options import Limit
from ...tasks import Task
from ..backbones.staged import StagedBackbone
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel
from .cross_stitch import (
    Placement,
    _check_choice,
    _check_init,
    convex_mixing_matrix,
    mixing_points,
    point_widths,
    run_columns,
    staged_columns,
)

__all__ = ["Sluice", "SluiceUnit", "subspace_orthogonality"]


def subspace_orthogonality(x: Tensor, subspaces: int) -> Tensor:
    """``sum_{s < r} ||G_s^T G_r||_F^2 / P^2`` for the channel subspaces of ``x``.

    ``x`` has shape ``(N, C, ...)``; its channels are split into ``subspaces`` contiguous
    groups and ``G_s`` is group ``s`` as a ``P x (C / subspaces)`` matrix, one row per sample
    and position (``P = N * positions``).
    """
    n, c = x.shape[0], x.shape[1]
    width = c // subspaces
    g = x.reshape(n, subspaces, width, -1).permute(1, 2, 0, 3).reshape(subspaces, width, -1)
    rows = g.shape[-1]
    total = x.new_zeros(())
    for s in range(subspaces):
        for r in range(s + 1, subspaces):
            total = total + (g[s] @ g[r].T).div(rows).square().sum()
    return total


class SluiceUnit(nn.Module):
    """Mixes the ``S`` channel subspaces of ``K`` columns with a ``(K S) x (K S)`` matrix."""

    def __init__(
        self, num_tasks: int, subspaces: int, init: tuple[float, float] = (0.9, 0.1)
    ) -> None:
        super().__init__()
        self.subspaces = subspaces
        self.alpha = nn.Parameter(convex_mixing_matrix(num_tasks * subspaces, init))

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        x = torch.stack(list(xs))  # (K, N, C, ...)
        k, n, c, *rest = x.shape
        s = self.subspaces
        blocks = x.reshape(k, n, s, c // s, *rest).movedim(2, 1).reshape(k * s, n, c // s, *rest)
        mixed = torch.einsum("ab,b...->a...", self.alpha, blocks)
        out = mixed.reshape(k, s, n, c // s, *rest).movedim(1, 2).reshape(k, n, c, *rest)
        return list(out.unbind(0))


def _resize(z: Tensor, size: torch.Size) -> Tensor:
    """``z`` at the spatial ``size`` of the features."""
    if z.shape[2:] == size:
        return z
    if z.dim() != 4:
        raise ValueError(
            f"sluice: cannot resize a layer output of shape {tuple(z.shape)} to the "
            f"features' size {tuple(size)}; only 4-d feature maps can be resized."
        )
    if z.shape[2] >= size[0] and z.shape[3] >= size[1]:
        return F.adaptive_avg_pool2d(z, (int(size[0]), int(size[1])))
    return F.interpolate(z, size=size, mode="bilinear", align_corners=True)


@ARCHITECTURES.register(
    "sluice", limits={"subspaces": Limit(ge=1, le=64), "orthogonality_weight": Limit(ge=0)}
)
class Sluice(MultiTaskModel):
    """Staged columns with learned subspace mixing and layer skips (see the module docs).

    Args:
        tasks: the tasks, by name.
        backbone: builds one column; a
            :class:`~polytask.models.backbones.staged.StagedBackbone`.
        head: builds a task's head from the width of the column's features.
        subspaces: channel subspaces per layer output; it must divide every point's width.
        init: ``(alpha_S, alpha_D)``, convex.
        beta_init: the initial beta of the features; the other layers share the rest.
        placement: ``"pool"`` (encoder points after each downsampling) or ``"stage"``.
        orthogonality_weight: weight of the subspace orthogonality penalty (>= 0).
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        subspaces: int = 2,
        init: tuple[float, float] = (0.9, 0.1),
        beta_init: float = 0.9,
        placement: Placement = "pool",
        orthogonality_weight: float = 0.0,
    ) -> None:
        super().__init__(list(tasks))
        arch = "sluice"
        if isinstance(subspaces, bool) or not isinstance(subspaces, int) or subspaces < 1:
            raise ConfigError(
                f"architecture {arch}: expected option `subspaces` to be a positive integer, "
                f"found {subspaces!r}."
            )
        if len(tasks) * subspaces < 2:
            raise ConfigError(
                f"architecture {arch} needs at least two tasks or two subspaces to mix; "
                f"found {len(tasks)} task and {subspaces} subspace."
            )
        _check_choice(arch, "placement", placement, ("pool", "stage"))
        convex = _check_init(arch, init)
        for option, value in (
            ("beta_init", beta_init),
            ("orthogonality_weight", orthogonality_weight),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (option == "beta_init" and value > 1)
            ):
                bound = "in [0, 1]" if option == "beta_init" else "a finite number >= 0"
                raise ConfigError(
                    f"architecture {arch}: expected option `{option}` to be {bound}, "
                    f"found {value!r}."
                )
        self.subspaces = subspaces
        self.placement: Placement = placement
        self.orthogonality_weight = float(orthogonality_weight)

        self.columns, nets = staged_columns(tasks, backbone, head, arch)

        points = mixing_points(nets[0])
        widths = point_widths(nets[0])
        for point, width in zip(points, widths, strict=True):
            if width % subspaces:
                raise ConfigError(
                    f"architecture {arch}: `subspaces`={subspaces} must divide the width of "
                    f"every layer output; {point} has {width} channels."
                )
        self.units = nn.ModuleList(SluiceUnit(len(tasks), subspaces, convex) for _ in points)
        self.unit_names: tuple[str, ...] = points
        features = nets[0].out_features
        # layers the betas combine: those as wide as the features, the features last
        self._beta_points = tuple(i for i, w in enumerate(widths[:-1]) if w == features)
        self.beta_names: tuple[str, ...] = (
            *(points[i] for i in self._beta_points),
            "features",
        )
        n_layers = len(self.beta_names)
        rest = (1.0 - beta_init) / (n_layers - 1) if n_layers > 1 else 0.0
        start = [rest] * (n_layers - 1) + [float(beta_init) if n_layers > 1 else 1.0]
        self.beta = nn.ParameterDict({name: nn.Parameter(torch.tensor(start)) for name in tasks})
        self._penalty: Tensor | None = None

    def _backbone(self, task: str) -> nn.Module:
        return cast(nn.Sequential, self.columns[task])[0]

    def _head(self, task: str) -> nn.Module:
        return cast(nn.Sequential, self.columns[task])[1]

    def _nets(self) -> list[StagedBackbone]:
        # validated in __init__
        return [cast(StagedBackbone, self._backbone(t)) for t in self.task_names]

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        track = torch.is_grad_enabled() and self.orthogonality_weight > 0
        if track:
            self._penalty = None  # free the last pass's graph before building this one
        penalties: list[Tensor] = []
        layers: dict[int, list[Tensor]] = {}

        def mix(point: int, xs: list[Tensor]) -> list[Tensor]:
            if track:
                penalties.extend(subspace_orthogonality(h, self.subspaces) for h in xs)
            mixed: list[Tensor] = self.units[point](xs)
            if point in self._beta_points:
                layers[point] = mixed
            return mixed

        features = run_columns(self._nets(), x, self.placement, mix)
        if track:
            self._penalty = torch.stack(penalties).sum()
        names = self.task_names if task is None else (task,)
        out: dict[str, Tensor] = {}
        for name in names:
            t = self.task_names.index(name)
            size = features[t].shape[2:]
            combined: Tensor | None = None
            candidates = [layers[i][t] for i in self._beta_points] + [features[t]]
            for i, (layer, z) in enumerate(zip(self.beta_names, candidates, strict=True)):
                z = _resize(self.shared_representation(z, f"{layer}.{name}", name), size)
                term = self.beta[name][i] * z
                combined = term if combined is None else combined + term
            assert combined is not None
            out[name] = self._head(name)(combined)
        return out

    def regularization(self) -> Tensor | None:
        """``orthogonality_weight`` times the subspace orthogonality penalty; None at weight 0.

        The penalty is that of the last forward pass run with gradient enabled (0-d). It
        shares that pass's graph: a caller that also backpropagates the task losses through
        it must backpropagate the penalty first with ``retain_graph=True`` (or add the two).
        """
        if self.orthogonality_weight == 0:
            return None
        if self._penalty is None:
            raise RuntimeError(
                "Sluice.regularization() reads the layer outputs of the last forward pass "
                "run with gradient enabled; run one first."
            )
        return self.orthogonality_weight * self._penalty

    def alphas(self) -> dict[str, Tensor]:
        """``{point: alpha}``, detached ``(K S) x (K S)`` copies; row ``t S + s`` holds the
        coefficients of task ``t``'s subspace ``s`` (tasks in :attr:`task_names` order)."""
        units = cast(list[SluiceUnit], list(self.units))
        return {
            name: unit.alpha.detach().clone()
            for name, unit in zip(self.unit_names, units, strict=True)
        }

    def betas(self) -> dict[str, Tensor]:
        """``{task: beta}``, detached copies; entry ``l`` weighs layer ``beta_names[l]``."""
        return {name: self.beta[name].detach().clone() for name in self.task_names}

    def diagnostics(self) -> dict[str, Any]:
        """``{"alpha": {point: (K S) x (K S) nested list}, "beta": {task: [per layer]},
        "beta_layers": beta_names}`` (see :meth:`alphas` and :meth:`betas`)."""
        return {
            "alpha": {unit: alpha.tolist() for unit, alpha in self.alphas().items()},
            "beta": {task: beta.tolist() for task, beta in self.betas().items()},
            "beta_layers": list(self.beta_names),
        }

    @torch.no_grad()
    def inspect(self, inputs: Tensor) -> dict[str, Tensor]:
        """``alpha/<point>`` and ``beta/<task>`` (see :meth:`alphas`, :meth:`betas`); the
        inputs are not needed."""
        out = {f"alpha/{unit}": alpha for unit, alpha in self.alphas().items()}
        out.update({f"beta/{task}": beta for task, beta in self.betas().items()})
        return out

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.units.parameters()
        for name in self.task_names:
            yield from self._backbone(name).parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.beta[task]
        yield from self._head(task).parameters()
