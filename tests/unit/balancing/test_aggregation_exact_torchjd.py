"""MGDA, UPGrad, Nash-MTL and Aligned-MTL against TorchJD 0.18 as an oracle.

On random well-conditioned Jacobians polytask agrees with TorchJD up to TorchJD's own
accuracy (or up to a stated change of convention). Where TorchJD is inexact (tiny and huge
gradient scales, strongly conflicting or small-norm tasks, warm-started Nash-MTL) the tests
show it: the oracle's error is large while polytask meets the exact (KKT) conditions.
TorchJD is a test dependency only.
"""

from __future__ import annotations

import pytest
import torch
from test_aggregation_exact import (
    assert_dual_cone_kkt,
    assert_mgda_kkt,
    family,
    nash_residual,
    weights_of,
)
from torch import Tensor

from polytask.balancing.aggregation._qp import dual_cone_weights

torchjd = pytest.importorskip("torchjd.aggregation")

NAMES = ["a", "b", "c", "d", "e"]


def well_conditioned(k: int, seed: int) -> Tensor:
    return family("ordinary", k, seed, dim=3 * k)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_mgda_agrees_with_a_converged_frank_wolfe(k: int) -> None:
    """TorchJD's MGDA is Sener & Koltun's Frank-Wolfe; run to a tight tolerance it reaches
    the same weights (K = 2: the line search is exact in one step)."""
    oracle = torchjd.MGDAWeighting(epsilon=1e-9, max_iters=20000)
    for seed in range(2):
        j = well_conditioned(k, seed)
        g = j @ j.T
        w = weights_of("mgda", j)
        d, expected = w @ j, oracle(g) @ j
        tol = 1e-12 if k == 2 else 1e-6
        torch.testing.assert_close(d, expected, rtol=0, atol=tol * float(j.norm(dim=1).max()))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_upgrad_agrees_with_torchjd_up_to_its_ridge(k: int) -> None:
    """Same convention (mean of projections). TorchJD's 1e-4 ridge after trace
    normalisation moves its weights by about 1e-4 relative."""
    oracle = torchjd.UPGradWeighting()
    for seed in range(3):
        j = well_conditioned(k, seed)
        g = j @ j.T
        torch.testing.assert_close(weights_of("upgrad", j), oracle(g), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_aligned_mtl_is_torchjd_times_k(k: int) -> None:
    """Same algorithm; TorchJD weights the aligned gradients by 1/K (mean), polytask's
    default by 1 (sum, the paper and LibMTL); reduction="mean" is TorchJD's convention."""
    from polytask.balancing.aggregation import AlignedMTL

    for seed in range(3):
        j = well_conditioned(k, seed)
        g = j @ j.T
        expected = torchjd.AlignedMTLWeighting()(g)
        torch.testing.assert_close(weights_of("aligned_mtl", j), k * expected, rtol=1e-10, atol=0)
        mean = AlignedMTL(NAMES[:k], reduction="mean").weights_from_gramian(g)
        torch.testing.assert_close(mean, expected, rtol=1e-10, atol=0)
        for mode in ("median", "rmse"):
            ours = AlignedMTL(NAMES[:k], scale_mode=mode).weights_from_gramian(g)
            theirs = torchjd.AlignedMTLWeighting(scale_mode=mode)(g)
            torch.testing.assert_close(ours, k * theirs, rtol=1e-10, atol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("k", [2, 3, 5])
def test_nash_mtl_agrees_with_torchjd_on_a_first_step_at_unit_scale(k: int) -> None:
    """TorchJD with max_norm=0 solves the paper's condition (its cvxpy solver stops at a
    residual of 1e-3 on the normalised Gramian); max_norm=1 clips alpha so that
    |alpha @ J| <= 1, the same as polytask's max_norm option."""
    from polytask.balancing.aggregation import NashMTL

    for seed in range(2):
        j = well_conditioned(k, seed)
        g = j @ j.T
        theirs = torch.as_tensor(torchjd.NashMTL(n_tasks=k, max_norm=0.0).weighting(j))
        torch.testing.assert_close(weights_of("nash_mtl", j), theirs, rtol=2e-3, atol=0)
        clipped = torch.as_tensor(torchjd.NashMTL(n_tasks=k, max_norm=1.0).weighting(j))
        ours = NashMTL(NAMES[:k], max_norm=1.0).weights_from_gramian(g)
        torch.testing.assert_close(ours, clipped, rtol=2e-3, atol=0)
        assert abs(float((ours @ j).norm()) - 1.0) < 1e-9  # |d| = sqrt(K) > 1, clipped to 1


# --- where TorchJD is inexact ------------------------------------------------------------


def test_torchjd_mgda_stops_early_on_conflicting_gradients() -> None:
    oracle = torchjd.MGDAWeighting()  # its defaults: epsilon=1e-3, max_iters=100
    worst = 0.0
    for seed in range(10):
        j = family("conflicting", 10, seed)
        g = j @ j.T
        w = weights_of("mgda", j)
        assert_mgda_kkt(g, w)
        d, theirs = w @ j, oracle(g) @ j
        worst = max(worst, float((theirs - d).norm() / d.norm()))
    assert worst > 0.5  # relative error of TorchJD's direction against the exact one


def test_torchjd_upgrad_conflicts_with_a_small_norm_task() -> None:
    """Task 0 is small and opposes task 1: the exact UPGrad direction never conflicts with
    it; TorchJD's ridge makes its direction point against it."""
    oracle = torchjd.UPGradWeighting()
    worst_theirs, worst_ours = 1.0, 1.0
    for seed in range(10):
        j = family("small_task", 3, seed)
        g = j @ j.T
        for d, name in ((weights_of("upgrad", j) @ j, "ours"), (oracle(g) @ j, "theirs")):
            cosine = float(j[0] @ d / (j[0].norm() * d.norm()))
            if name == "ours":
                worst_ours = min(worst_ours, cosine)
            else:
                worst_theirs = min(worst_theirs, cosine)
    assert worst_ours >= -1e-12
    assert worst_theirs < -0.5


def test_torchjd_upgrad_returns_the_mean_at_small_scale() -> None:
    oracle = torchjd.UPGradWeighting()
    j = family("conflicting", 4) * 1e-6
    g = j @ j.T
    torch.testing.assert_close(oracle(g), torch.full((4,), 0.25, dtype=torch.float64))
    ours = weights_of("upgrad", j)
    torch.testing.assert_close(ours, weights_of("upgrad", j * 1e6), rtol=1e-10, atol=0)
    assert not torch.allclose(ours, oracle(g), atol=1e-3)
    projections = dual_cone_weights(g)
    for i in range(4):
        assert_dual_cone_kkt(g, projections[i], i)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("factor", [1e-6, 1e6])
def test_torchjd_nash_mtl_misses_the_solution_at_other_scales(factor: float) -> None:
    j = well_conditioned(3, 0) * factor
    g = j @ j.T
    theirs = torch.as_tensor(torchjd.NashMTL(n_tasks=3, max_norm=0.0).weighting(j))
    assert nash_residual(g, theirs) > 0.5
    assert nash_residual(g, weights_of("nash_mtl", j)) <= 1e-10


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torchjd_nash_mtl_misses_the_solution_after_warm_started_steps() -> None:
    from polytask.balancing.aggregation import NashMTL

    oracle = torchjd.NashMTL(n_tasks=3, max_norm=0.0)
    ours = NashMTL(NAMES[:3])
    worst_theirs = worst_ours = 0.0
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        j = torch.randn(3, 10, generator=gen, dtype=torch.float64) * 10.0 ** (step % 3 - 1)
        g = j @ j.T
        theirs = torch.as_tensor(oracle.weighting(j))
        worst_theirs = max(worst_theirs, nash_residual(g, theirs))
        worst_ours = max(worst_ours, nash_residual(g, ours.weights_from_gramian(g)))
    assert worst_theirs > 0.5
    assert worst_ours <= 1e-10
