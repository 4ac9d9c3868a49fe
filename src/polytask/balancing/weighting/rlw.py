"""Random Loss Weighting (RLW): fresh random weights on the simplex at every step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import BALANCERS, LossWeighting

__all__ = ["RLW"]

Distribution = Literal["normal", "dirichlet", "uniform"]


@BALANCERS.register("rlw")
class RLW(LossWeighting):
    r"""Random Loss Weighting (Lin, Ye, Xu, Shi and Zhang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022,
    https://arxiv.org/abs/2111.10603, Algorithm 2 for losses).

    At every step (every call of :meth:`weights`, i.e. once per training step) K numbers
    ``x`` are drawn, one per task of the method in the order of ``tasks``, and the total loss
    is ``sum_k lambda_k L_k`` with ``lambda`` on the probability simplex: **the weights are
    positive and sum to 1** (the paper's and LibMTL's convention).

    - ``"normal"`` (default; the paper's main choice and LibMTL's): ``x_k ~ N(0, 1)``,
      ``lambda = softmax(x)``.
    - ``"uniform"``: ``x_k ~ U(0, 1)``, ``lambda = softmax(x)`` (weights close to uniform).
    - ``"dirichlet"``: ``lambda ~ Dirichlet(1, ..., 1)``, uniform on the simplex, sampled as
      ``x_k ~ Exp(1)``, ``lambda = x / sum(x)`` (no softmax).

    Missing tasks: all K numbers are drawn at every step, so the random stream does not
    depend on which tasks a batch has; the weights are then normalised over the present
    tasks only (softmax over their ``x``, or ``x / sum`` for "dirichlet", which is again a
    flat Dirichlet), so the present weights sum to 1.

    The numbers come from a CPU ``torch.Generator`` owned by the method, seeded with
    ``seed``: the weights do not depend on the device or the global random state, and the
    generator's state is saved with checkpoints (``get_extra_state``), so resume is exact.
    The weights are computed on the CPU in float32 and copied to the losses' device.

    Args:
        tasks: task names.
        distribution: ``"normal"``, ``"dirichlet"`` or ``"uniform"``.
        seed: seed of the method's generator (an integer >= 0).
    """

    def __init__(
        self, tasks: Sequence[str], distribution: Distribution = "normal", seed: int = 0
    ) -> None:
        super().__init__(tasks)
        if distribution not in ("normal", "dirichlet", "uniform"):
            raise ConfigError(
                "balancer.options.distribution: expected normal, dirichlet or uniform, found "
                f"{distribution!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"balancer.options.seed: expected an integer >= 0, found {seed!r}.")
        self.distribution: Distribution = distribution
        self.seed = seed
        self._index = {t: i for i, t in enumerate(self.task_names)}
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def extra_repr(self) -> str:
        return f"distribution={self.distribution!r}, seed={self.seed}"

    def _draw(self) -> Tensor:
        k = len(self.task_names)
        if self.distribution == "normal":
            return torch.randn(k, generator=self.generator)
        if self.distribution == "uniform":
            return torch.rand(k, generator=self.generator)
        return torch.empty(k).exponential_(generator=self.generator)

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        unknown = [t for t in losses if t not in self._index]
        if unknown:
            raise ValueError(
                f"RLW: unknown task(s) {unknown}; the method was built for {list(self.task_names)}."
            )
        sample = self._draw()
        if not losses:
            return {}
        # in the order of `tasks`, so that the order of `losses` cannot change a rounding
        names = sorted(losses, key=self._index.__getitem__)
        picked = torch.stack([sample[self._index[t]] for t in names])
        if self.distribution == "dirichlet":
            lam = picked / picked.sum()
        else:
            lam = torch.softmax(picked, dim=0)
        first = next(iter(losses.values()))
        # from pageable CPU memory the copy is staged at once, so non_blocking is safe and
        # avoids a stream synchronisation on accelerators
        lam = lam.to(device=first.device, dtype=first.dtype, non_blocking=True)
        weights = dict(zip(names, lam, strict=True))
        return {t: weights[t] for t in losses}

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"].cpu())
