"""Equal weighting: the sum of the task losses."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..base import BALANCERS, LossWeighting

__all__ = ["Equal"]


@BALANCERS.register("equal")
class Equal(LossWeighting):
    """Every task's loss has weight 1: ``L = sum_k L_k`` (the MTAN paper's "Equal")."""

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {
            t: torch.ones((), dtype=loss.dtype, device=loss.device) for t, loss in losses.items()
        }
