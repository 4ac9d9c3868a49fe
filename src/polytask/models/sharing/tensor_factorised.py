"""Tensor-factorised multi-task networks (Yang and Hospedales, "Deep Multi-task
Representation Learning: A Tensor Factorisation Approach", ICLR 2017, DMTRL,
https://arxiv.org/abs/1605.06391).

Every task has its own network, but the weights of corresponding layers are not free: the
K tasks' weights of a layer, stacked along a last **task mode** into a tensor
``W`` of shape ``(d_1, ..., d_{N-1}, K)`` (``(out, in, K)`` for a linear layer,
``(out, in, k_h, k_w, K)`` for a convolution), are one factorised tensor, and only the
factor of the task mode belongs to a task. How much the tasks share is the rank, learned
through the factors instead of chosen by hand:

- ``method="tucker"``: ``W = S x_1 U_1 x_2 U_2 ... x_N U_N``, a core ``S`` of shape
  ``(r_1, ..., r_N)`` and factor matrices ``U_i`` of shape ``(d_i, r_i)``; ``x_i`` is the
  mode-``i`` product. ``S`` and ``U_1 .. U_{N-1}`` are shared; row ``k`` of ``U_N`` (``r_N``
  numbers) is task ``k``'s. Parameters: ``prod_i r_i + sum_i d_i r_i``.
- ``method="tt"`` (tensor train): ``W[i_1, ..., i_N] = G_1[:, i_1, :] G_2[:, i_2, :] ...
  G_N[:, i_N, :]``, cores ``G_i`` of shape ``(r_{i-1}, d_i, r_i)`` with ``r_0 = r_N = 1``;
  ``G_1 .. G_{N-1}`` are shared, ``G_N[:, k, 0]`` (``r_{N-1}`` numbers) is task ``k``'s.
  Parameters: ``sum_i r_{i-1} d_i r_i``.
- ``method="laf"`` (the paper's last-axis flattening): the ``(d_1 ... d_{N-1}) x K``
  matricisation of ``W`` is ``L S``, ``L`` shared (``d_1 ... d_{N-1} x r``), column ``k`` of
  ``S`` (``r x K``) task ``k``'s. Parameters: ``r (d_1 ... d_{N-1} + K)``.

**Ranks.** ``rank`` caps every rank (``r_i = min(rank, full_i)``); ``None`` takes the full
ranks, with which the factorisation represents any stacked weights exactly: Tucker
``full_i = min(d_i, prod_{j != i} d_j)``, TT ``full_i = min(d_1 ... d_i, d_{i+1} ... d_N)``,
LAF ``min(d_1 ... d_{N-1}, K)``.

**Initialisation.** As in the paper, the factors are computed from stacked single-task
weights by a truncated decomposition: the higher-order SVD for Tucker (``U_i``: the leading
``r_i`` left singular vectors of the mode-``i`` unfolding, ``S = W x_1 U_1^T ... x_N
U_N^T``), TT-SVD for the tensor train (sequential truncated SVDs) and a truncated SVD for
LAF (``L = U_r diag(s_r)``, ``S = V_r^T``). With ``init_columns`` (``{task: checkpoint}``,
a ``single_task`` run's ``checkpoints/best.pt``) those weights are the trained single-task
networks', as the paper does; :meth:`TensorFactorised.init_from_single_task` does the same
from networks given in code. The default instead decomposes the stacked weights of freshly
initialised single-task networks (PyTorch's default initialisation): at full rank the model
then starts as exactly those independent networks, and truncated it starts from their
best low-rank approximation, at the scale of the default initialisation.

**Where this deviates from the paper.**

- The paper factorises every layer, output layers included (its tasks have outputs of one
  size). Here the layers of the backbone are factorised, every ``nn.Linear`` and every
  convolution (``nn.Conv1d/2d/3d``) whatever the backbone; each task's head stays its own
  (tasks' outputs differ in size), as do the biases and normalisation parameters.
- The paper chooses the ranks at initialisation from a threshold on the singular values;
  here the rank cap is given.

**Partition.** Shared: every layer's shared factors. Task ``k``'s own: its task-mode
vectors, its backbone's remaining parameters (biases, normalisation) and its head; no other
task's loss reaches them, since task ``k``'s weights ``W[..., k]`` depend on the task
factor only through its ``k``-th row. There is no shared representation in the forward
pass (each task runs its own network), so feature-level balancing does not apply.

**Layout.** The networks are laid out as in ``single_task`` (``columns.<task>.0`` the
backbone, ``columns.<task>.1`` the head) without the factorised weights; those are computed
from ``layers.<layer>`` at every forward pass and set on the columns' modules as plain
tensors (after the pass, detached copies of the current weights).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...options import Limit
from ...tasks import Task
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel, out_features
from .cross_stitch import _check_choice, load_column_weights

__all__ = [
    "FactorisedLayer",
    "Method",
    "TensorFactorised",
    "factorised_parameters",
    "full_ranks",
    "laf_decompose",
    "mode_product",
    "tt_decompose",
    "tt_to_tensor",
    "tucker_decompose",
    "tucker_to_tensor",
]

Method = Literal["tucker", "tt", "laf"]
METHODS: tuple[Method, ...] = ("tucker", "tt", "laf")

#: the modules whose weights are factorised
FACTORISED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def full_ranks(shape: Sequence[int], method: Method) -> tuple[int, ...]:
    """The ranks with which ``method`` represents every tensor of ``shape`` exactly.

    Tucker: one per mode; TT: the ``N - 1`` inner ranks; LAF: one (the last mode is the
    task mode).
    """
    dims = [int(d) for d in shape]
    if method == "tucker":
        total = math.prod(dims)
        return tuple(min(d, total // d) for d in dims)
    if method == "tt":
        return tuple(
            min(math.prod(dims[: i + 1]), math.prod(dims[i + 1 :])) for i in range(len(dims) - 1)
        )
    return (min(math.prod(dims[:-1]), dims[-1]),)


def factorised_parameters(shape: Sequence[int], method: Method, ranks: Sequence[int]) -> int:
    """Numbers held by the factorisation of a tensor of ``shape`` at ``ranks``."""
    dims = [int(d) for d in shape]
    if method == "tucker":
        return math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks, strict=True))
    if method == "tt":
        bounds = [1, *ranks, 1]
        return sum(bounds[i] * d * bounds[i + 1] for i, d in enumerate(dims))
    (r,) = ranks
    return r * (math.prod(dims[:-1]) + dims[-1])


def mode_product(x: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """``x x_mode matrix``: mode ``mode`` of ``x`` (size ``r``) mapped by ``matrix`` (``d x r``)."""
    out: Tensor = torch.tensordot(x, matrix, dims=([mode], [1])).movedim(-1, mode)
    return out


def tucker_to_tensor(core: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``core x_1 factors[0] x_2 factors[1] ...``."""
    out = core
    for mode, factor in enumerate(factors):
        out = mode_product(out, factor, mode)
    return out


def tucker_decompose(w: Tensor, ranks: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """The truncated higher-order SVD of ``w``: ``(core, factors)``, exact at full ranks."""
    factors = []
    for mode, r in enumerate(ranks):
        unfolding = w.movedim(mode, 0).reshape(w.shape[mode], -1)
        u = torch.linalg.svd(unfolding, full_matrices=False)[0]
        factors.append(u[:, :r])
    core = w
    for mode, factor in enumerate(factors):
        core = mode_product(core, factor.T, mode)
    return core, factors


def tt_to_tensor(cores: Sequence[Tensor]) -> Tensor:
    """The tensor of a train of cores ``(r_{i-1}, d_i, r_i)`` with ``r_0 = r_N = 1``."""
    out = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for core in cores[1:]:
        out = torch.tensordot(out, core, dims=([-1], [0]))
    return out.reshape(out.shape[:-1])


def tt_decompose(w: Tensor, ranks: Sequence[int]) -> list[Tensor]:
    """TT-SVD (Oseledets 2011) of ``w`` with inner ranks ``ranks``, exact at full ranks."""
    dims = list(w.shape)
    cores: list[Tensor] = []
    rest = w
    previous = 1
    for i, r in enumerate(ranks):
        rest = rest.reshape(previous * dims[i], -1)
        u, s, vh = torch.linalg.svd(rest, full_matrices=False)
        cores.append(u[:, :r].reshape(previous, dims[i], r))
        rest = s[:r, None] * vh[:r]
        previous = r
    cores.append(rest.reshape(previous, dims[-1], 1))
    return cores


def laf_decompose(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(L, S)`` with ``L S`` the best rank-``rank`` approximation of ``w`` matricised to
    ``(d_1 ... d_{N-1}) x d_N`` (truncated SVD)."""
    matrix = w.reshape(-1, w.shape[-1])
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


class FactorisedLayer(nn.Module):
    """One layer's stacked task weights ``W`` (task mode last), held as factors.

    Args:
        stacked: the weights to start from, shape ``(*weight_shape, K)``; decomposed in
            float64 and stored in its dtype.
        method: ``"tucker"``, ``"tt"`` or ``"laf"``.
        tasks: the K task names, in the order of the task mode.
        rank: the rank cap, or ``None`` for the full ranks.
    """

    def __init__(
        self, stacked: Tensor, method: Method, tasks: Sequence[str], rank: int | None = None
    ) -> None:
        super().__init__()
        if stacked.shape[-1] != len(tasks):
            raise ValueError(
                f"expected the last mode of `stacked` to have one entry per task "
                f"({len(tasks)}), found shape {tuple(stacked.shape)}"
            )
        self.method: Method = method
        self.task_names = tuple(tasks)
        self.shape = tuple(int(d) for d in stacked.shape)
        full = full_ranks(self.shape, method)
        self.ranks = tuple(r if rank is None else min(rank, r) for r in full)
        self.shared = nn.ParameterList()
        self.own = nn.ParameterDict()
        self.initialise(stacked)

    @torch.no_grad()
    def initialise(self, stacked: Tensor) -> None:
        """Set the factors to the truncated decomposition of ``stacked`` (see module docs)."""
        if tuple(stacked.shape) != self.shape:
            raise ValueError(
                f"expected `stacked` of shape {self.shape}, found {tuple(stacked.shape)}"
            )
        dtype = stacked.dtype
        w = stacked.detach().to(torch.float64)
        if self.method == "tucker":
            core, factors = tucker_decompose(w, self.ranks)
            shared, task_matrix = [core, *factors[:-1]], factors[-1]
        elif self.method == "tt":
            cores = tt_decompose(w, self.ranks)
            shared, task_matrix = cores[:-1], cores[-1][:, :, 0].T
        else:
            left, right = laf_decompose(w, self.ranks[0])
            shared, task_matrix = [left], right.T
        values = [t.to(dtype).contiguous() for t in shared]
        if len(self.shared) == 0:
            for v in values:
                self.shared.append(nn.Parameter(v))
            for k, task in enumerate(self.task_names):
                self.own[task] = nn.Parameter(task_matrix[k].to(dtype).contiguous())
            return
        for p, v in zip(self.shared, values, strict=True):
            p.copy_(v)
        for k, task in enumerate(self.task_names):
            self.own[task].copy_(task_matrix[k])

    def task_matrix(self) -> Tensor:
        """The task-mode factor, one row per task: ``(K, r_task)``."""
        return torch.stack([self.own[t] for t in self.task_names])

    def tensor(self) -> Tensor:
        """The stacked weights ``W``, shape ``(*weight_shape, K)``."""
        shared = list(self.shared)
        tasks = self.task_matrix()
        if self.method == "tucker":
            return tucker_to_tensor(shared[0], [*shared[1:], tasks])
        if self.method == "tt":
            return tt_to_tensor([*shared, tasks.T[:, :, None]])
        out: Tensor = (shared[0] @ tasks.T).reshape(self.shape)
        return out

    def num_parameters(self) -> int:
        """``factorised_parameters(shape, method, ranks)``."""
        return factorised_parameters(self.shape, self.method, self.ranks)


def _factorised_paths(net: nn.Module) -> list[str]:
    return [name for name, m in net.named_modules() if isinstance(m, FACTORISED_MODULES)]


@ARCHITECTURES.register("tensor_factorised", limits={"rank": Limit(ge=1)})
class TensorFactorised(MultiTaskModel):
    """One network per task whose layer weights are factorised across tasks (module docs).

    Args:
        tasks: the tasks, by name (at least two).
        backbone: builds one task's backbone; its ``nn.Linear`` and convolution layers are
            factorised.
        head: builds a task's head (not factorised).
        method: ``"tucker"``, ``"tt"`` (tensor train) or ``"laf"`` (last-axis flattening).
        rank: the cap on every rank; ``None``: full ranks.
        init_columns: ``{task: checkpoint path}``: start from a ``single_task`` run's
            networks (backbone and head); the weights of the tasks not named are the
            default initialisation's.
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        method: Method = "tucker",
        rank: int | None = None,
        init_columns: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(list(tasks))
        arch = "tensor_factorised"
        if len(tasks) < 2:
            raise ConfigError(
                f"architecture {arch} factorises the weights of several tasks; found "
                f"{len(tasks)} task ({', '.join(tasks)}). Use single_task for one task."
            )
        _check_choice(arch, "method", method, METHODS)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ConfigError(
                f"architecture {arch}: expected option `rank` to be a positive integer or "
                f"null, found {rank!r}."
            )
        self.method: Method = method
        self.rank = rank
        columns: dict[str, nn.Module] = {}
        for name, task in tasks.items():
            net = backbone()
            columns[name] = nn.Sequential(net, head(task, out_features(net)))
        self.columns = nn.ModuleDict(columns)
        self.layer_paths = tuple(_factorised_paths(self._backbone(self.task_names[0])))
        if not self.layer_paths:
            raise ConfigError(
                f"architecture {arch}: backbone {type(self._backbone(self.task_names[0])).__name__} "
                "has no linear or convolution layer to factorise."
            )
        shapes = [self._dense_shapes(t) for t in self.task_names]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ConfigError(
                f"architecture {arch}: the backbone factory built backbones with different "
                "layers; corresponding layers must have the same weights' shapes."
            )
        if init_columns:
            load_column_weights(self.columns, init_columns, arch=arch)
        self.layers = nn.ModuleDict(
            {
                _key(path): FactorisedLayer(self._stacked(path), method, self.task_names, rank)
                for path in self.layer_paths
            }
        )
        for name in self.task_names:
            for path in self.layer_paths:
                del self._module(name, path)._parameters["weight"]
        self._set_weights(detach=True)

    def _backbone(self, task: str) -> nn.Module:
        return cast(nn.Sequential, self.columns[task])[0]

    def _module(self, task: str, path: str) -> nn.Module:
        return self._backbone(task).get_submodule(path)

    def _dense_shapes(self, task: str) -> list[tuple[int, ...]]:
        net = self._backbone(task)
        return [tuple(_weight(net.get_submodule(p)).shape) for p in _factorised_paths(net)]

    def _stacked(self, path: str) -> Tensor:
        return torch.stack([_weight(self._module(t, path)).detach() for t in self.task_names], -1)

    def _set_weights(self, detach: bool, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Set every column's factorised modules' ``weight`` from the factors; returns the
        stacked weights per layer path (as set: with their graph unless ``detach``)."""
        out: dict[str, Tensor] = {}
        for path in self.layer_paths:
            stacked = cast(FactorisedLayer, self.layers[_key(path)]).tensor()
            if detach:
                stacked = stacked.detach()
            out[path] = stacked
            self._assign(path, stacked, tasks)
        return out

    def _assign(self, path: str, stacked: Tensor, tasks: Sequence[str] | None) -> None:
        for k, task in enumerate(self.task_names):
            if tasks is None or task in tasks:
                # a plain attribute: the module's own parameter was removed
                self._module(task, path).weight = stacked[..., k]

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        names = self.task_names if task is None else (task,)
        built = self._set_weights(detach=False, tasks=names)
        try:
            return {name: self.columns[name](x) for name in names}
        finally:  # the same weights, detached (no second reconstruction from the factors)
            for path, stacked in built.items():
                self._assign(path, stacked.detach(), names)

    def weights(self) -> dict[str, dict[str, Tensor]]:
        """``{layer path: {task: weight}}``: every task's current dense weights (detached)."""
        out: dict[str, dict[str, Tensor]] = {}
        for path in self.layer_paths:
            stacked = cast(FactorisedLayer, self.layers[_key(path)]).tensor().detach()
            out[path] = {t: stacked[..., k].clone() for k, t in enumerate(self.task_names)}
        return out

    @torch.no_grad()
    def init_from_single_task(self, columns: Mapping[str, nn.Module]) -> None:
        """Start from single-task networks given in code, as the paper does.

        ``columns[task]`` is one task's network laid out as in ``single_task`` (an
        ``nn.Sequential`` of the backbone and the head, e.g. ``SingleTask(...).columns``),
        for every task. Its factorised layers' stacked weights are decomposed at this
        model's ranks; everything else (biases, normalisation, heads) is copied.

        Raises:
            ValueError: a task is missing, or a network's entries differ in name or shape
                from this model's.
        """
        missing = [t for t in self.task_names if t not in columns]
        if missing:
            raise ValueError(f"expected a network for every task; missing {missing}")
        weights = {f"0.{path}.weight" for path in self.layer_paths}
        for task in self.task_names:
            state = columns[task].state_dict()
            own = self.columns[task].state_dict()
            expected = {k: tuple(v.shape) for k, v in own.items()}
            found = {k: tuple(v.shape) for k, v in state.items() if k not in weights}
            if expected != found or not weights <= set(state):
                raise ValueError(
                    f"the network given for task {task!r} does not match this model's: "
                    f"expected the entries {sorted(expected)} and {sorted(weights)}, found "
                    f"{sorted(state)}"
                )
            self.columns[task].load_state_dict({k: state[k] for k in own})
        for path in self.layer_paths:
            shapes = {tuple(columns[t].state_dict()[f"0.{path}.weight"].shape) for t in columns}
            layer = cast(FactorisedLayer, self.layers[_key(path)])
            if shapes != {layer.shape[:-1]}:
                raise ValueError(
                    f"layer {path!r}: expected weights of shape {layer.shape[:-1]}, found {shapes}"
                )
            stacked = torch.stack(
                [columns[t].state_dict()[f"0.{path}.weight"] for t in self.task_names], -1
            )
            layer.initialise(stacked)
        self._set_weights(detach=True)

    def diagnostics(self) -> dict[str, Any]:
        """How far apart the tasks' weights are, per layer: ``{"task_distance": {layer:
        value}}``, the mean over pairs of tasks of ``||W_a - W_b|| / sqrt((||W_a||^2 +
        ||W_b||^2) / 2)`` (0 when they share everything, about 1.4 for independent random
        weights of one scale)."""
        distances: dict[str, float] = {}
        for path, per_task in self.weights().items():
            ws = [w.double() for w in per_task.values()]
            values = [
                float((a - b).norm() / ((a.square().sum() + b.square().sum()) / 2).sqrt())
                for i, a in enumerate(ws)
                for b in ws[i + 1 :]
            ]
            distances[path] = sum(values) / len(values)
        return {"task_distance": distances}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield from cast(FactorisedLayer, layer).shared.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.columns[task].parameters()
        for layer in self.layers.values():
            yield cast(FactorisedLayer, layer).own[task]


def _weight(module: nn.Module) -> Tensor:
    """A linear or convolution module's weight."""
    return cast(Tensor, module.weight)


def _key(path: str) -> str:
    """A module path as a ``ModuleDict`` key (no dots)."""
    return path.replace(".", "-")
