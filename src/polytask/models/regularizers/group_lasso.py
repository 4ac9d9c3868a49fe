"""Block-sparse regularisation: the l1/lq norm over the tasks' weights of each input feature.

Argyriou, Evgeniou and Pontil, "Convex Multi-Task Feature Learning", Machine Learning 73
(2008), https://doi.org/10.1007/s10994-007-5040-8; Obozinski, Taskar and Jordan, "Joint
covariate selection and joint subspace selection for multiple classification problems"
(2010); Ruder, "An Overview of Multi-Task Learning in Deep Neural Networks" (2017), section
3.2 (block-sparse regularisation).

For a layer group whose task weights are ``W_t`` of shape ``(out_t, d, ...)`` (a linear
layer's ``(out, in)``, a convolution's ``(out, in, kh, kw)``), input feature ``j`` of the
layer (a unit or channel of the shared representation the layer reads) is the block
``a_j = [vec W_1[:, j]; ...; vec W_K[:, j]]`` of every task's weights on it, and::

    R = sum_groups sum_j ||a_j||_q        (q = 2: the l1/l2 norm; q = inf: l1/l_inf)

An l1 norm over features of an lq norm over tasks: a feature is kept or dropped by all tasks
together, so the tasks select a common subset of the shared features.

Deviations: Argyriou et al. penalise the *squared* l2,1 norm and learn a feature rotation as
well (their convex relaxation); this is the plain group lasso of Obozinski et al. / Ruder's
survey. The norm is not differentiable where a block is zero; autograd takes the minimum-norm
subgradient there (0 for l2; for l_inf, ties share the subgradient equally). Trained by
(stochastic) subgradient steps rather than a proximal method, blocks become small but not
exactly zero: :meth:`GroupLasso.diagnostics` counts the blocks whose norm is below
``tolerance`` times the largest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ...options import Limit
from .base import REGULARIZERS, TaskRegularizer

__all__ = ["GroupLasso", "feature_blocks"]


def feature_blocks(weights: Sequence[Tensor]) -> Tensor:
    """``(d, n)``: row j is block ``a_j``, every task's weights on input feature j."""
    return torch.cat([w.transpose(0, 1).reshape(w.shape[1], -1) for w in weights], dim=1)


@REGULARIZERS.register("group_lasso", limits={"tolerance": Limit(ge=0, lt=1)})
class GroupLasso(TaskRegularizer):
    """The l1/lq norm of the tasks' weights, grouped by input feature (see module docs).

    Args:
        tasks: the task names.
        shapes: the shapes of the selected weights; within a group every task's weight must
            have the same input size (dimension 1), their outputs may differ.
        norm: ``"l2"`` (the group lasso) or ``"linf"`` (l1/l_inf).
        tolerance: a block counts as inactive in the diagnostics when its norm is below
            ``tolerance`` times the largest block's.
    """

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        shapes: Sequence[Sequence[tuple[int, ...]]],
        norm: Literal["l2", "linf"] = "l2",
        tolerance: float = 1e-2,
    ) -> None:
        super().__init__(tasks, shapes)
        for i, group in enumerate(self.shapes):
            if any(s[1] != group[0][1] for s in group):
                from ...errors import ConfigError

                raise ConfigError(
                    f"group_lasso groups the tasks' weights by input feature; layer group {i} "
                    f"has input sizes {[s[1] for s in group]}."
                )
        self.norm = norm
        self.tolerance = float(tolerance)
        self._last: list[Tensor] = []
        self._per_task: list[Tensor] = []

    def block_norms(self, layers: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """The norms ``||a_j||_q`` of every group's blocks (one ``(d,)`` tensor per group)."""
        ord = 2.0 if self.norm == "l2" else float("inf")
        return [torch.linalg.vector_norm(feature_blocks(g), ord=ord, dim=1) for g in layers]

    def penalty(self, layers: Sequence[Sequence[Tensor]]) -> Tensor:
        norms = self.block_norms(layers)
        self._last = [n.detach() for n in norms]
        with torch.no_grad():
            self._per_task = [
                torch.stack(
                    [
                        torch.linalg.vector_norm(w.transpose(0, 1).reshape(w.shape[1], -1), dim=1)
                        for w in g
                    ]
                )
                for g in layers
            ]
        return torch.stack([n.sum() for n in norms]).sum()

    def diagnostics(self) -> dict[str, Any]:
        if not self._last:
            return {}
        groups = []
        for norms in self._last:
            top = float(norms.max())
            active = int((norms > self.tolerance * top).sum()) if top > 0 else 0
            groups.append(
                {"features": int(norms.numel()), "active": active, "norm": float(norms.sum())}
            )
        return {"groups": groups}

    def inspect(self) -> dict[str, Tensor]:
        """``block_norms/G`` ``(d,)``: ``||a_j||_q`` of layer group G; ``task_norms/G``
        ``(K, d)``: the l2 norm of each task's weights on each input feature (which shared
        features each task uses), both from the latest penalty."""
        result = {f"block_norms/{i}": n.float().cpu() for i, n in enumerate(self._last)}
        result.update({f"task_norms/{i}": n.float().cpu() for i, n in enumerate(self._per_task)})
        return result
