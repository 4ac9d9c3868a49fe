"""A message-passing network for molecular graphs (Gilmer et al., 2017).

The network of the QM9 experiments of Nash-MTL (Navon et al., 2022,
https://arxiv.org/abs/2202.01017) and FAMO (Liu et al., 2023), a form of the MPNN of "Neural
Message Passing for Quantum Chemistry" (Gilmer et al., ICML 2017,
https://arxiv.org/abs/1704.01212): node features are embedded by a linear layer and a ReLU to
``width``; then ``steps`` times, one edge-conditioned convolution (NNConv: each message is
the sender's state times a ``width x width`` matrix that an MLP computes from the edge's
features; messages are averaged) with a ReLU updates every node through one GRU cell, with
the same weights at every step; a Set2Set readout (``set2set_steps`` LSTM steps) turns the
nodes of each graph into a ``2 * width`` vector, and a linear layer with a ReLU brings it back
to ``width``, the features every task's head reads (``out_features``).

It uses torch_geometric's ``NNConv`` and ``Set2Set`` (``pip install 'polytask[graph]'``):
torch_geometric is the field's library for these layers, the papers' code uses exactly these
two, and its pure-Python wheel installs with polytask's pinned torch. It is imported only
when the backbone is built, so polytask itself does not need it.

Input: a graph batch as :func:`polytask.data.graphs.collate_graphs` makes it
(``x``, ``edge_index``, ``edge_attr``, ``batch``, ``num_graphs``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ...errors import ConfigError
from ...options import DEPTH, MAX_WIDTH, WIDTH, Limit, parameters_budget
from ..base import BACKBONES

__all__ = ["MPNN"]

EXTRA = "pip install 'polytask[graph]'  (or: pip install torch_geometric)"


def _geometric() -> Any:
    try:
        import torch_geometric.nn as geometric_nn
    except ImportError as exc:
        raise ConfigError(
            f"backbone mpnn needs torch_geometric, which is not installed ({exc}). Install the "
            f"graph extra: `{EXTRA}`."
        ) from None
    return geometric_nn


@BACKBONES.register(
    "mpnn",
    limits={
        "edge_features": Limit(ge=1, le=MAX_WIDTH),
        "width": Limit(ge=1, le=4096),
        "steps": DEPTH,
        "set2set_steps": DEPTH,
        "edge_hidden": WIDTH,
    },
    # the edge network maps edge_hidden units to a width x width message matrix
    budgets=[
        parameters_budget(
            lambda o: o["edge_hidden"] * o["width"] ** 2 + 6 * o["width"] ** 2,
            "width",
            "edge_hidden",
        )
    ],
)
class MPNN(nn.Module):
    """Edge-network message passing with a GRU update and a Set2Set readout.

    Args:
        input_shape: ``(node_features,)``, the size of a node's feature vector.
        edge_features: the size of an edge's feature vector (QM9 in polytask: 1, the distance).
        width: the node state size (the papers: 64).
        steps: message-passing steps, sharing their weights (the papers: 3).
        set2set_steps: processing steps of the Set2Set readout (the papers: 3).
        edge_hidden: hidden size of the MLP that computes a message matrix from an edge
            (the papers: 128).
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        edge_features: int = 1,
        width: int = 64,
        steps: int = 3,
        set2set_steps: int = 3,
        edge_hidden: int = 128,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1 or input_shape[0] < 1:
            raise ConfigError(
                f"backbone mpnn expects graph inputs of shape (node_features,), found "
                f"{tuple(input_shape)}."
            )
        for name, value in (
            ("edge_features", edge_features),
            ("width", width),
            ("steps", steps),
            ("set2set_steps", set2set_steps),
            ("edge_hidden", edge_hidden),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"Expected `model.backbone_options.{name}` of backbone mpnn to be a "
                    f"positive integer, found {value!r}."
                )
        geometric_nn = _geometric()
        self.embed = nn.Linear(input_shape[0], width)
        self.edge_network = nn.Sequential(
            nn.Linear(edge_features, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, width * width)
        )
        # NNConv would run the edge network again at every step on the same edges; it runs
        # once per forward here and NNConv receives its output (same values, a third of the cost)
        self.conv = geometric_nn.NNConv(width, width, nn.Identity(), aggr="mean")
        self.gru = nn.GRU(width, width)
        self.readout = geometric_nn.Set2Set(width, processing_steps=set2set_steps)
        self.project = nn.Linear(2 * width, width)
        self.steps = steps
        self.out_features = width

    def forward(self, graph: Mapping[str, Any]) -> Tensor:
        h = self.embed(graph["x"]).relu()
        state = h.unsqueeze(0)
        matrices = self.edge_network(graph["edge_attr"])
        for _ in range(self.steps):
            message = self.conv(h, graph["edge_index"], matrices).relu()
            out, state = self.gru(message.unsqueeze(0), state)
            h = out.squeeze(0)
        pooled: Tensor = self.readout(h, graph["batch"], dim_size=graph["num_graphs"])
        out_features: Tensor = self.project(pooled).relu()
        return out_features
