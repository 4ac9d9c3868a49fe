"""ConFIG: the direction with equal cosine to every task gradient, scaled by their projections."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import BALANCERS
from ..gradient import GramianWeighting, Level
from ._qp import correlation, single_thread

__all__ = ["ConFIG", "config_weights"]


def config_weights(gramian: Tensor, eps: float) -> Tensor:
    """ConFIG's weights ``w`` (``d = w @ J``) from the Gramian alone (float64).

    With ``U`` the unit rows ``u_k = g_k / |g_k|`` and ``C = U U^T`` their correlation
    matrix, the paper's direction ``U^+ 1 = U^T (U U^T)^+ 1 = U^T c`` with ``c = C^+ 1``, so
    ``v = sum_k c_k u_k``, ``|v|^2 = c^T C c``, and the projection of ``g_i`` on ``v / |v|`` is
    ``|g_i| (C c)_i / |v|``. Hence::

        d = (sum_i |g_i| (C c)_i / (c^T C c)) sum_k c_k g_k / |g_k|

    ``C^+`` drops the eigenvalues of ``C`` at or below ``K eps lambda_max`` (``eps``: the
    relative precision of the rows): that is ``torch.linalg.pinv(U)``'s cut-off on the
    singular values of ``U`` at ``sqrt(K eps)``. Zero gradients have no direction and get
    weight 0 (TorchJD's ``nan_to_num`` makes their unit row 0, which gives the same update);
    if every gradient is zero, or the direction ``v`` is 0, the weights are 0.
    """
    norms, nonzero, c = correlation(gramian)
    k = norms.shape[0]
    weights = torch.zeros(k, dtype=torch.float64)
    if not bool(nonzero.any()):
        return weights.to(gramian.device)
    n = norms[nonzero]
    with single_thread():
        lam, vec = torch.linalg.eigh(c)
    keep = lam > c.shape[0] * eps * lam.max()
    lam, vec = lam[keep], vec[:, keep]
    coef = vec @ ((vec.T @ torch.ones(c.shape[0], dtype=torch.float64)) / lam)  # C^+ 1
    cc = c @ coef
    quad = float(coef @ cc)
    if not quad > 0:
        return weights.to(gramian.device)
    length = float((n * cc).sum()) / quad
    weights[nonzero] = length * coef / n
    return weights.to(gramian.device)


@BALANCERS.register("config")
class ConFIG(GramianWeighting):
    """ConFIG, the conflict-free inverse gradients method (Liu, Chu & Thuerey, ICLR 2025,
    "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
    https://arxiv.org/abs/2408.11104, Equation 2 / Algorithm 1).

    The update has the same cosine with every task gradient and the sum of the gradients'
    projections on it as its length::

        d_u = U^+ 1 / |U^+ 1|,      U = [g_1/|g_1|; ...; g_K/|g_K|]   (unit rows)
        d = (sum_i g_i . d_u) d_u

    where ``U^+`` is the pseudo-inverse (``U d_u`` is then proportional to ``1``: every unit
    gradient has the same positive projection on ``d_u`` whenever the rows are independent).
    Everything is a function of the Gramian (:func:`config_weights`), so the update is
    ``w @ J``; the weights are invariant to the scale of the gradients and the update is
    equivariant to it.

    Conventions: the unit preference vector (the paper's and TorchJD's default) and the
    paper's length, the sum of the projections (the official code's ``ProjectionLength``).
    The official code also has a momentum variant for many losses (M-ConFIG) and a
    pairwise variant for two; neither is implemented. Zero gradients get weight 0.

    Args:
        tasks: task names.
        level: ``"parameter"`` (the paper) or ``"feature"``.
    """

    def __init__(self, tasks: Sequence[str], level: Level = "parameter") -> None:
        super().__init__(tasks, level)

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        return config_weights(gramian, self.input_eps)
