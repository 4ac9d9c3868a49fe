"""Fully-Adaptive Feature Sharing (Lu, Kumar, Zhai, Cheng, Javidi and Feris, "Fully-adaptive
Feature Sharing in Multi-Task Networks with Applications in Person Attribute
Classification", CVPR 2017, https://arxiv.org/abs/1611.05377).

Training starts from a thin network in which every task shares every layer (one branch per
layer, one head per task). During training the network is widened layer by layer, **from
the top down** (section 3.2): at a widening round, the active layer ``l`` is the top-most
layer still shared by everyone; its one branch has children (the branches of layer
``l + 1``, or the task heads when ``l`` is the top layer), and the children are grouped so
that children whose tasks find the same samples easy or hard stay together. The branch is
copied once per group (every copy starts with the branch's weights, so the widened network
computes exactly what it computed before) and each group's children read their own copy;
the layer below becomes active. Rounds continue until the bottom layer is decided or a
round keeps its children together (then every lower layer stays shared).

**Task affinity** (section 3.2, "task grouping based on the probability of concurrently
simple or difficult examples"). With ``m_i^n`` the error margin of sample ``n`` for task
``i`` and ``e_i^n = 1`` when ``m_i^n >= E[m_i]`` (a difficult sample), the affinity of
tasks ``i`` and ``j`` is the probability that a sample is difficult for both or easy for
both::

    A(i, j) = P(e_i = 1, e_j = 1) + P(e_i = 0, e_j = 0) = E[e_i e_j + (1 - e_i)(1 - e_j)]

**Branch affinity** (the paper's equations for branches ``k`` and ``l`` holding tasks
``{i_k}`` and ``{j_l}``)::

    A~_b(k, l) = mean_{i_k} min_{j_l} A(i_k, j_l),   A_b(k, l) = (A~_b(k, l) + A~_b(l, k)) / 2

**Grouping criterion.** A grouping ``g_d`` of the ``c`` children into ``d`` groups costs::

    L(g_d) = (d - 1) L_0 2^{p_l} + alpha L_s(g_d),
    L_s(g_d) = (1 / d) sum_k (1 - mean_{i in g_k} min_{j in g_k, j != i} A_b(i, j))

where ``L_0`` is the unit cost of creating a branch, ``p_l`` the number of pooling layers
above layer ``l`` (a branch is dearer where the feature maps are larger) and ``L_s`` the
separation error: for every child, its lowest affinity to the other children of its group.
Only the ratio ``lambda = L_0 / alpha`` matters; polytask fixes ``alpha = 1`` and exposes
``L_0`` as ``branch_cost`` (larger: fewer branches).

Where polytask deviates or the paper leaves a choice open:

- **Thin initialisation.** The paper initialises its thin network from a pre-trained wide
  one by simultaneous orthogonal matching pursuit (section 3.1). polytask has no
  pre-trained wide network: the thin network is the configured backbone, randomly
  initialised.
- **Margin.** The paper's margin is ``|prediction - ground truth|`` of an attribute
  classifier. polytask uses each task's own loss of the sample alone (for a binary task a
  monotone function of that margin), so any task kind works; the threshold ``E[m_i]`` is
  the task's mean loss over the same samples, and ``A`` is estimated on the samples
  labelled for both tasks (0.5, no information, when there is none).
- **The samples.** The paper estimates the expectations over training samples without
  fixing which; polytask uses the first ``affinity_samples`` training samples, evaluated
  by the current network in evaluation mode at the end of the epoch of the round.
- **The singleton group.** ``min_{j != i}`` is over the other children of the group: a
  group of one child has no separation error (nothing more is gained by splitting it at
  this layer).
- **The search.** The paper notes that finding the best grouping is combinatorial and
  searches it approximately. polytask enumerates every partition of the children when
  there are at most ``exact_limit`` of them (Bell(8) = 4,140 partitions) and otherwise
  merges greedily: from one group per child, it repeatedly merges the two groups whose
  union gives the lowest criterion; from the grouping so found for every ``d``, a local
  search then moves one child at a time (to another group or to a group of its own) while
  that lowers the criterion, and the best grouping met is kept. On random affinities of
  6 to 8 children this found the exhaustive optimum in most cases (see the tests).
- **Schedule.** The paper trains for some iterations between rounds; here a round
  happens at the end of epoch ``widen_after`` (1-based) and every ``widen_every`` epochs
  after it, and the network is trained on after the last round.
- **Layers.** The layers are the fully connected layers of the ``mlp`` backbone (each
  ``Linear`` with its activation and dropout); ``p_l = 0`` for all of them.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...options import Limit
from ...tasks import Task
from ..backbones.small import MLP
from ..base import (
    ARCHITECTURES,
    AdaptContext,
    BackboneFactory,
    HeadFactory,
    MultiTaskModel,
    out_features,
)

__all__ = [
    "FAFS",
    "branch_affinity",
    "grouping_loss",
    "partitions",
    "search_grouping",
    "separation_loss",
    "task_affinity",
]

Grouping = tuple[tuple[int, ...], ...]
"""A partition of children ``0..c-1``: groups of child indices."""


def task_affinity(losses: Tensor, labelled: Tensor | None = None) -> Tensor:
    """The paper's task affinity ``A(i, j)`` from per-sample losses ``(N, T)``.

    A sample is difficult for task ``i`` when its loss is at least the task's mean loss
    over its labelled samples. ``A(i, j)`` is the share of the samples labelled for both
    tasks that are difficult for both or easy for both (0.5 where no sample is labelled
    for both). ``labelled`` is a boolean ``(N, T)`` (None: every sample is labelled).
    """
    if losses.dim() != 2:
        raise ValueError(f"Expected `losses` of shape (N, T) but got {tuple(losses.shape)}.")
    x = losses.double()
    valid = torch.ones_like(x, dtype=torch.bool) if labelled is None else labelled.to(torch.bool)
    v = valid.double()
    mean = (x * v).sum(0) / v.sum(0).clamp_min(1.0)
    hard = (x >= mean).double() * v
    easy = (x < mean).double() * v
    agree = hard.T @ hard + easy.T @ easy
    both = v.T @ v
    return torch.where(both > 0, agree / both.clamp_min(1.0), torch.full_like(agree, 0.5))


def branch_affinity(affinity: Tensor, children: Sequence[Sequence[int]]) -> Tensor:
    """``A_b`` between children (each a list of task indices into ``affinity``).

    ``A~_b(k, m) = mean_{i in k} min_{j in m} A(i, j)`` and ``A_b = (A~_b + A~_b^T) / 2``.
    """
    c = len(children)
    directed = torch.empty(c, c, dtype=torch.float64)
    for k, tasks_k in enumerate(children):
        for m, tasks_m in enumerate(children):
            block = affinity[list(tasks_k)][:, list(tasks_m)].double()
            directed[k, m] = block.min(dim=1).values.mean()
    return (directed + directed.T) / 2


def separation_loss(affinity_b: Tensor, grouping: Grouping) -> float:
    """``L_s``: the mean over groups of 1 minus the mean over the group's children of their
    lowest affinity to another child of the group (0 for a group of one)."""
    return _separation(affinity_b.tolist(), grouping)


def _separation(a: list[list[float]], grouping: Grouping) -> float:
    total = 0.0
    for group in grouping:
        if len(group) < 2:
            continue
        lowest = [min(a[i][j] for j in group if j != i) for i in group]
        total += 1.0 - sum(lowest) / len(lowest)
    return total / len(grouping)


def _criterion(a: list[list[float]], grouping: Grouping, cost: float) -> float:
    return (len(grouping) - 1) * cost + _separation(a, grouping)


def grouping_loss(
    affinity_b: Tensor, grouping: Grouping, branch_cost: float, pools_above: int = 0
) -> float:
    """The criterion ``(d - 1) L_0 2^{p_l} + L_s(g_d)`` of a grouping (``alpha = 1``)."""
    return _criterion(affinity_b.tolist(), grouping, branch_cost * 2.0**pools_above)


def partitions(c: int) -> Iterator[Grouping]:
    """Every partition of ``0..c-1`` (restricted-growth strings), groups in order of their
    smallest child."""
    if c == 0:
        return
    labels = [0] * c

    def grow(i: int, used: int) -> Iterator[Grouping]:
        if i == c:
            yield tuple(tuple(k for k in range(c) if labels[k] == g) for g in range(used))
            return
        for g in range(used + 1):
            labels[i] = g
            yield from grow(i + 1, max(used, g + 1))

    labels[0] = 0
    yield from grow(1, 1)


def _canonical(groups: Sequence[Sequence[int]]) -> Grouping:
    return tuple(sorted((tuple(sorted(g)) for g in groups), key=lambda g: g[0]))


def _refine(
    grouping: Grouping,
    a: list[list[float]],
    cost: float,
    consider: Callable[[Grouping], None],
) -> None:
    """Local search from ``grouping``: move the one child (to another group or a group of
    its own) that lowers the criterion most, until no move does; every grouping met is
    passed to ``consider``."""
    current = grouping
    loss = _criterion(a, current, cost)
    while True:
        best = (loss, current)
        groups = [list(g) for g in current]
        for source, group in enumerate(groups):
            for child in group:
                for target in range(len(groups) + 1):
                    if target == source or (target == len(groups) and len(group) == 1):
                        continue
                    moved = [[k for k in g if k != child] for g in groups]
                    if target == len(groups):
                        moved.append([child])
                    else:
                        moved[target].append(child)
                    candidate = _canonical([g for g in moved if g])
                    value = _criterion(a, candidate, cost)
                    consider(candidate)
                    if value < best[0]:
                        best = (value, candidate)
        if best[1] == current:
            return
        loss, current = best


def search_grouping(
    affinity_b: Tensor,
    branch_cost: float,
    *,
    pools_above: int = 0,
    exact_limit: int = 8,
) -> tuple[Grouping, dict[int, float]]:
    """The grouping of the children that minimises the criterion, and the best criterion
    found for every number of groups ``d``.

    Exhaustive over all partitions for at most ``exact_limit`` children, else greedy
    merging followed by a local search (see the module). Ties go to the fewer groups, then
    to the first met.
    """
    c = affinity_b.shape[0]
    a = affinity_b.tolist()
    cost = branch_cost * 2.0**pools_above
    best_per_d: dict[int, tuple[float, Grouping]] = {}

    def consider(grouping: Grouping) -> None:
        loss = _criterion(a, grouping, cost)
        d = len(grouping)
        if d not in best_per_d or loss < best_per_d[d][0]:
            best_per_d[d] = (loss, grouping)

    if c <= exact_limit:
        for grouping in partitions(c):
            consider(grouping)
    else:
        current: list[tuple[int, ...]] = [(k,) for k in range(c)]
        consider(_canonical(current))
        while len(current) > 1:
            best: tuple[float, Grouping] | None = None
            for x, y in itertools.combinations(range(len(current)), 2):
                merged = [g for k, g in enumerate(current) if k not in (x, y)]
                merged.append(current[x] + current[y])
                candidate = _canonical(merged)
                loss = _criterion(a, candidate, cost)
                if best is None or loss < best[0]:
                    best = (loss, candidate)
            assert best is not None
            current = [tuple(g) for g in best[1]]
            consider(best[1])
        for d in sorted(best_per_d):  # then one child at a time, while that lowers the criterion
            _refine(best_per_d[d][1], a, cost, consider)
    chosen_d = min(best_per_d, key=lambda d: (best_per_d[d][0], d))
    return best_per_d[chosen_d][1], {d: v[0] for d, v in sorted(best_per_d.items())}


def _mlp_layers(net: nn.Module) -> list[nn.Sequential]:
    """The ``mlp`` backbone's layers: each ``Linear`` with what follows it up to the next."""
    if not isinstance(net, MLP):
        raise ConfigError(
            f"architecture fafs widens the fully connected layers of the mlp backbone; "
            f"found {type(net).__name__}. Use model.backbone=mlp."
        )
    layers: list[list[nn.Module]] = []
    for module in net.net:
        if isinstance(module, nn.Linear):
            layers.append([module])
        elif isinstance(module, nn.Flatten):
            continue
        else:
            layers[-1].append(module)
    return [nn.Sequential(*modules) for modules in layers]


@ARCHITECTURES.register(
    "fafs",
    limits={
        "branch_cost": Limit(ge=0),
        "widen_after": Limit(ge=1),
        "widen_every": Limit(ge=1),
        "affinity_samples": Limit(ge=2, le=1_000_000),
        "exact_limit": Limit(ge=1, le=10),
    },
)
class FAFS(MultiTaskModel):
    """A thin shared network widened during training by grouping tasks (see the module).

    Args:
        tasks: the tasks, by name.
        backbone: builds the thin network; the ``mlp`` backbone.
        head: builds a task's head from the width of the top layer.
        branch_cost: ``L_0``, the cost of creating one branch against the separation error
            (``alpha = 1``); 0 splits every group whose children are not in full agreement.
        widen_after: the first round is at the end of this epoch (1-based).
        widen_every: epochs between rounds.
        affinity_samples: training samples on which the affinity is estimated.
        exact_limit: up to this many children, every grouping is tried; more are merged
            greedily.

    The structure (the groups of every layer) is saved in checkpoints and shown by
    :meth:`diagnostics`: ``branches`` lists, per layer from the bottom, the tasks of each
    branch; ``decisions`` the rounds so far (epoch, layer, children, affinity between the
    children, the best criterion for every number of groups, the groups chosen).
    """

    def __init__(
        self,
        *,
        tasks: Mapping[str, Task],
        backbone: BackboneFactory,
        head: HeadFactory,
        branch_cost: float = 0.1,
        widen_after: int = 1,
        widen_every: int = 1,
        affinity_samples: int = 512,
        exact_limit: int = 8,
    ) -> None:
        super().__init__(list(tasks))
        net = backbone()
        blocks = _mlp_layers(net)
        self.flatten = nn.Flatten()
        self.layers = nn.ModuleList(nn.ModuleList([block]) for block in blocks)
        features = out_features(net)
        self.heads = nn.ModuleDict({name: head(task, features) for name, task in tasks.items()})
        self.branch_cost = float(branch_cost)
        self.widen_after = int(widen_after)
        self.widen_every = int(widen_every)
        self.affinity_samples = int(affinity_samples)
        self.exact_limit = int(exact_limit)
        everyone = tuple(self.task_names)
        self.groups: list[list[tuple[str, ...]]] = [[everyone] for _ in blocks]
        self.active_layer = len(blocks) - 1
        self.decisions: list[dict[str, Any]] = []
        self._index_paths()

    # -- structure -----------------------------------------------------------------------
    def _index_paths(self) -> None:
        """Each branch's parent (the branch below holding its tasks) and each task's path."""
        self._parents: list[list[int]] = []
        for layer, groups in enumerate(self.groups):
            if layer == 0:
                self._parents.append([0] * len(groups))
                continue
            below = self.groups[layer - 1]
            self._parents.append(
                [next(k for k, g in enumerate(below) if group[0] in g) for group in groups]
            )
        self._path: dict[str, list[int]] = {
            t: [next(k for k, g in enumerate(groups) if t in g) for groups in self.groups]
            for t in self.task_names
        }

    def structure(self) -> dict[str, Any]:
        return {
            "groups": [[list(g) for g in groups] for groups in self.groups],
            "active_layer": self.active_layer,
            "decisions": copy.deepcopy(self.decisions),
        }

    def set_structure(self, structure: dict[str, Any]) -> None:
        groups = [[tuple(g) for g in layer] for layer in structure["groups"]]
        if len(groups) != len(self.layers):
            raise ValueError(
                f"fafs structure with {len(groups)} layers for a network of {len(self.layers)}"
            )
        for layer, layer_groups in enumerate(groups):
            branches = self.layers[layer]
            assert isinstance(branches, nn.ModuleList)
            while len(branches) < len(layer_groups):
                branches.append(copy.deepcopy(branches[0]))
            while len(branches) > len(layer_groups):
                del branches[len(branches) - 1]
        self.groups = groups
        self.active_layer = int(structure["active_layer"])
        self.decisions = copy.deepcopy(list(structure["decisions"]))
        self._index_paths()

    def diagnostics(self) -> dict[str, Any]:
        return {
            "branches": [[list(g) for g in groups] for groups in self.groups],
            "decisions": copy.deepcopy(self.decisions),
        }

    # -- widening ------------------------------------------------------------------------
    def _due(self, epoch: int) -> bool:
        done = epoch + 1  # epochs completed
        return done >= self.widen_after and (done - self.widen_after) % self.widen_every == 0

    def adapt(self, context: AdaptContext) -> bool:
        if self.active_layer < 0 or not self._due(context.epoch):
            return False
        layer = self.active_layer
        top = len(self.layers) - 1
        children = [(t,) for t in self.task_names] if layer == top else list(self.groups[layer + 1])
        if len(children) < 2:  # one child: this layer and every one below stay shared
            self.active_layer = -1
            return False
        per_task = context.sample_losses(self.affinity_samples)
        names = list(self.task_names)
        losses = torch.stack([per_task[t][0].detach().cpu() for t in names], dim=1)
        labelled = torch.stack([per_task[t][1].detach().cpu() for t in names], dim=1)
        affinity = task_affinity(losses, labelled)
        index = {t: i for i, t in enumerate(names)}
        children_idx = [[index[t] for t in child] for child in children]
        a_b = branch_affinity(affinity, children_idx)
        grouping, per_d = search_grouping(a_b, self.branch_cost, exact_limit=self.exact_limit)
        new_groups = [
            tuple(t for t in names if any(t in children[k] for k in group)) for group in grouping
        ]
        self.decisions.append(
            {
                "epoch": context.epoch,
                "layer": layer,
                "children": [list(child) for child in children],
                "samples": int(losses.shape[0]),
                "affinity": [[round(float(v), 6) for v in row] for row in a_b],
                "criterion": {str(d): round(v, 6) for d, v in per_d.items()},
                "groups": [list(g) for g in new_groups],
            }
        )
        self.active_layer = layer - 1 if len(grouping) > 1 else -1
        shown = ", ".join(f"{d}: {v:.4f}" for d, v in per_d.items())
        context.log(
            f"fafs: layer {layer} of {top} (from the bottom, 0-based), {len(children)} children "
            f"-> {len(grouping)} branch(es) "
            + " ".join("{" + ", ".join(g) + "}" for g in new_groups)
            + f"; criterion by number of branches {{{shown}}}"
            + ("" if self.active_layer >= 0 else "; every branch is decided")
        )
        if len(grouping) == 1:
            return False
        self._widen(layer, new_groups)
        return True

    def _widen(self, layer: int, groups: list[tuple[str, ...]]) -> None:
        """Split the one branch of ``layer`` into one copy per group."""
        branches = self.layers[layer]
        assert isinstance(branches, nn.ModuleList) and len(branches) == 1
        for _ in groups[1:]:
            branches.append(copy.deepcopy(branches[0]))
        self.groups[layer] = groups
        self._index_paths()

    @property
    def decided(self) -> bool:
        """True when no round is left (every branch is decided)."""
        return self.active_layer < 0

    def _branches(self, layer: int) -> nn.ModuleList:
        branches = self.layers[layer]
        assert isinstance(branches, nn.ModuleList)
        return branches

    # -- forward -------------------------------------------------------------------------
    def _is_shared(self, layer: int, branch: int) -> bool:
        return len(self.groups[layer][branch]) > 1

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor]:
        names = self.task_names if task is None else (task,)
        needed = [{self._path[t][layer] for t in names} for layer in range(len(self.layers))]
        below: dict[int, Tensor] = {0: self.flatten(x)}
        out: dict[str, Tensor] = {}
        for layer, branches in enumerate(self.layers):
            assert isinstance(branches, nn.ModuleList)
            current: dict[int, Tensor] = {}
            for b in sorted(needed[layer]):
                parent = self._parents[layer][b]
                z = below[parent]
                if (
                    layer > 0
                    and self._is_shared(layer - 1, parent)
                    and not self._is_shared(layer, b)
                ):
                    # a task-specific branch reads the shared features below it
                    (owner,) = self.groups[layer][b]
                    z = self.shared_representation(z, f"layers.{layer - 1}.{parent}", task=owner)
                current[b] = branches[b](z)
            below = current
        top = len(self.layers) - 1
        for t in names:
            b = self._path[t][top]
            z = below[b]
            if self._is_shared(top, b):
                z = self.shared_representation(z, f"layers.{top}.{b}", task=t)
            out[t] = self.heads[t](z)
        return out

    # -- parameters ----------------------------------------------------------------------
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        for layer in range(len(self.layers)):
            for b, module in enumerate(self._branches(layer)):
                if self._is_shared(layer, b):
                    yield from module.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for layer in range(len(self.layers)):
            for b, module in enumerate(self._branches(layer)):
                if self.groups[layer][b] == (task,):
                    yield from module.parameters()
        yield from self.heads[task].parameters()
