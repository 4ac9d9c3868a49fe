"""GradDrop: keep, coordinate by coordinate, the gradients of one sign chosen at random."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..base import BALANCERS
from ..gradient import GradientBalancer, Level
from ._common import check_int_option, check_number_option, load_generator_state

__all__ = ["GradDrop", "graddrop", "graddrop_uniform"]


def graddrop_uniform(generator: torch.Generator, numel: int, device: torch.device) -> Tensor:
    """The step's uniform draws ``U`` (float32, one per coordinate, on ``device``).

    One 62-bit seed is drawn from ``generator`` (the method's CPU generator), and ``U`` from
    a generator of ``device`` seeded with it: nothing of size N crosses between host and
    device, and the method's state stays one CPU generator state.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    local = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(numel, generator=local, device=device, dtype=torch.float32)


def graddrop(jacobian: Tensor, uniform: Tensor, leak: float = 0.0) -> tuple[Tensor, Tensor]:
    """GradDrop's combination of the rows of ``jacobian`` for given uniform draws.

    ``P = (1 + sum_i g_i / sum_i |g_i|) / 2`` per coordinate (the positive sign purity;
    ``1/2`` where every gradient is zero). Where ``P > U`` the positive components are kept,
    where ``P < U`` the negative ones; row ``i`` contributes
    ``(leak + (1 - leak) M_i) g_i`` with ``M_i`` that mask.

    Returns the combined gradient and, per row, the share of its squared norm that is kept
    (``<contribution_i, g_i> / ||g_i||^2``: ``leak + (1 - leak) ||M_i g_i||^2 / ||g_i||^2``,
    1 for a zero row) as the effective weight.
    """
    k, n = jacobian.shape
    combined = torch.empty(n, dtype=jacobian.dtype, device=jacobian.device)
    kept_squared = torch.zeros(k, dtype=torch.float64, device=jacobian.device)
    squared = torch.zeros(k, dtype=torch.float64, device=jacobian.device)
    # by column blocks, every row at once: the temporaries stay a few MiB whatever N
    width = max(1024, _BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, n, width):
        block = jacobian[:, start : start + width]
        total = block.sum(dim=0)
        magnitude = block.abs().sum(dim=0)
        # 0/0 where every gradient is zero is computed and discarded by the where
        ratio = torch.where(magnitude > 0, total / magnitude, 0.0)
        purity = 0.5 * (1.0 + ratio)
        draws = uniform[start : start + width]
        # the kept sign per coordinate: +1 (positives), -1 (negatives), 0 (P = U: none);
        # kept = s * max(s * g, 0) is g where its sign is s and 0 elsewhere (arithmetic:
        # far cheaper than masked selects on the CPU)
        sign = (purity > draws).to(block.dtype) - (purity < draws).to(block.dtype)
        kept = block * sign
        kept.clamp_(min=0.0).mul_(sign)
        summed = kept.sum(dim=0)
        combined[start : start + width] = (
            summed if leak == 0.0 else leak * total + (1.0 - leak) * summed
        )
        # squares in the Jacobian's precision, summed in float64 (diagnostic weights)
        kept_squared += (kept * kept).sum(dim=1, dtype=torch.float64)
        squared += (block * block).sum(dim=1, dtype=torch.float64)
    share = kept_squared / torch.where(squared > 0, squared, 1.0)
    weights = torch.where(squared > 0, leak + (1.0 - leak) * share, 1.0)
    return combined, weights.to(jacobian.dtype)


# elements of one column block of the Jacobian in :func:`graddrop` (float32: 1 MiB)
_BLOCK_ELEMENTS = 1 << 18


@BALANCERS.register("graddrop")
class GradDrop(GradientBalancer):
    """Gradient sign Dropout (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask
    Models with Gradient Sign Dropout", NeurIPS 2020, https://arxiv.org/abs/2010.06808).

    Per coordinate, the positive sign purity ``P = (1 + sum_i g_i / sum_i |g_i|) / 2`` is the
    probability of keeping the positive components of all task gradients there (and
    dropping the negative ones); otherwise the negative components are kept. A uniform draw
    ``U`` per coordinate decides: positives where ``P > U``, negatives where ``P < U``. With
    ``leak`` ``l``, every task's gradient also passes through with weight ``l``:
    ``d = sum_i (l + (1 - l) M_i) g_i`` (the paper's leak per task, here one value for all;
    ``f`` of the paper is the identity).

    The rule is elementwise, so the method needs the gradients themselves (not only their
    Gramian). The effective weight reported per task is the share of its squared gradient
    norm that survives.

    Conventions and deviations:

    - **Level.** The paper applies GradDrop to the gradients with respect to *activations*
      (a GradDrop layer between the shared trunk and the task heads): ``level=feature`` is
      the faithful setting. ``level=parameter`` applies the same rule to the gradients of
      the shared parameters, as LibMTL and TorchJD do. At the feature level the purity is
      computed per coordinate of the representation (per example and unit); the paper sums
      over the batch only when tasks see different examples, never the case here.
    - **No epsilon.** LibMTL adds a small constant to ``sum |g_i|``, which dominates at small
      gradient scales (TorchJD divides 0 by 0 where every gradient is zero, harmlessly);
      here such coordinates have purity 1/2 and nothing to keep, and ``P`` is a ratio of
      sums, so the result is exactly equivariant to the scale of the gradients.
    - **Randomness.** The method owns a generator (option ``seed``) whose state is saved
      with the checkpoint; each step draws one seed from it and the uniforms on the
      gradients' device (:func:`graddrop_uniform`). Results are reproducible for a seed and
      device, but CPU and CUDA draws differ.

    Args:
        tasks: task names.
        level: ``"parameter"`` or ``"feature"``.
        leak: weight in [0, 1] with which every gradient passes unmasked (0: the paper's
            default GradDrop; 1: plain sum).
        seed: seed of the method's generator.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: Level = "parameter",
        leak: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks, level)
        self.leak = check_number_option("leak", leak, low=0.0, high=1.0)
        self.seed = check_int_option("seed", seed, low=0)
        self.generator = torch.Generator().manual_seed(self.seed)

    def aggregate(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        uniform = graddrop_uniform(self.generator, jacobian.shape[1], jacobian.device)
        return graddrop(jacobian, uniform.to(jacobian.dtype), self.leak)

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        load_generator_state(self.generator, state["generator"], "generator")
