"""Graph samples and how a list of them becomes one batch.

A graph sample's ``"input"`` is ``{"x": (n, F) node features, "edge_index": (2, E) int64,
"edge_attr": (E, D) edge features}``, with ``edge_index[0]`` the source and ``edge_index[1]``
the target node of every directed edge (torch_geometric's convention), numbered within the
graph. Graphs differ in size, so the default collation cannot stack them: a data set of graphs
defines ``collate = collate_graphs`` (see the sample contract in :mod:`polytask.data.base`).

:func:`collate_graphs` concatenates the graphs into one disjoint graph, the way
torch_geometric batches them: node features are concatenated, edge indices shifted by the
number of nodes before each graph, and ``"batch"`` maps every node to its graph
(``0 .. num_graphs - 1``). Targets and masks are collated as usual, one row per graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from ..errors import DataError

__all__ = ["GRAPH_KEYS", "collate_graphs"]

GRAPH_KEYS = ("x", "edge_index", "edge_attr")
"""The keys of a graph sample's ``"input"``."""


def _check_graph(graph: object, i: int) -> Mapping[str, Tensor]:
    if not isinstance(graph, Mapping) or any(key not in graph for key in GRAPH_KEYS):
        found = sorted(graph) if isinstance(graph, Mapping) else type(graph).__name__
        raise DataError(
            f"Expected the input of graph sample {i} to be a mapping with the keys "
            f"{', '.join(GRAPH_KEYS)}, found {found}."
        )
    x, edge_index, edge_attr = (graph[key] for key in GRAPH_KEYS)
    if x.dim() != 2 or edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise DataError(
            f"Expected graph sample {i} to have `x` of shape (n, F) and `edge_index` of shape "
            f"(2, E), found {tuple(x.shape)} and {tuple(edge_index.shape)}."
        )
    if edge_attr.shape[0] != edge_index.shape[1]:
        raise DataError(
            f"Expected graph sample {i} to have one row of `edge_attr` per edge, found "
            f"{edge_attr.shape[0]} rows for {edge_index.shape[1]} edges."
        )
    return graph


def collate_graphs(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One batch of graph samples: ``{"input": {x, edge_index, edge_attr, batch, num_graphs},
    "targets": ..., "mask": ...}`` (``"mask"`` only when the samples have one).

    ``num_graphs`` is a Python int (pooling layers need the number of graphs without reading
    it from the device). A batch of ``B`` graphs has targets of first dimension ``B``.

    Raises:
        DataError: the list is empty, or a sample's input is not a graph as described in the
            module docstring.
    """
    if not samples:
        raise DataError("Expected at least one graph sample to collate, found none.")
    graphs = [_check_graph(sample["input"], i) for i, sample in enumerate(samples)]
    sizes = torch.tensor([int(g["x"].shape[0]) for g in graphs])
    starts = torch.cumsum(sizes, 0) - sizes
    edge_counts = torch.tensor([int(g["edge_index"].shape[1]) for g in graphs])
    edge_index = torch.cat([g["edge_index"] for g in graphs], dim=1)
    edge_index = edge_index + torch.repeat_interleave(starts, edge_counts)
    batch: dict[str, Any] = {
        "input": {
            "x": torch.cat([g["x"] for g in graphs]),
            "edge_index": edge_index,
            "edge_attr": torch.cat([g["edge_attr"] for g in graphs]),
            "batch": torch.repeat_interleave(torch.arange(len(graphs)), sizes),
            "num_graphs": len(graphs),
        },
        "targets": default_collate([sample["targets"] for sample in samples]),
    }
    if "mask" in samples[0]:
        batch["mask"] = default_collate([sample["mask"] for sample in samples])
    return batch
