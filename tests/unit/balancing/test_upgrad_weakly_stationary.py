"""UPGrad on weakly stationary Jacobians: a non-negative combination of the task gradients is
zero, so every projection's optimal coefficients form an unbounded set. The weights must stay
bounded (the minimum-norm choice) and the combined gradient must conflict with no task beyond
the rounding of computing it, in float64 and in float32."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation._qp import correlation
from polytask.balancing.gradient import GramianWeighting

K = 20
CASES = [(seed, 5 + seed % 15) for seed in range(30)]


def weakly_stationary(seed: int, rank: int, dtype: torch.dtype, dim: int = 200) -> Tensor:
    """K gradients of the given rank; rows ``0 .. m`` have a zero combination with positive
    coefficients (``m = K - 1``: all rows; otherwise a few), built in float64."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, rank, generator=g, dtype=torch.float64)
    m = K - 1 if seed % 3 == 0 else 2 + seed % 6
    coefficients = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    a[m] = -(coefficients @ a[:m])
    b = torch.randn(rank, dim, generator=g, dtype=torch.float64)
    return (a @ b).to(dtype)


def upgrad() -> GramianWeighting:
    method = BALANCERS.get("upgrad")(tasks=[f"t{i}" for i in range(K)])
    assert isinstance(method, GramianWeighting)
    return method


def rounding_bound(j: Tensor, w: Tensor) -> Tensor:
    """Per task, a bound on the rounding of ``g_k . (w @ J)``: 64 K eps |g_k| sum_j |w_j| |g_j|."""
    norms = j.double().norm(dim=1)
    eps = float(torch.finfo(j.dtype).eps)
    return 64 * K * eps * norms * float((w.double().abs() * norms).sum())


def test_the_family_is_weakly_stationary() -> None:
    """Some non-negative combination of the rows is zero (to float64 rounding)."""
    for seed, rank in CASES:
        j = weakly_stationary(seed, rank, torch.float64)
        g = torch.Generator().manual_seed(seed)
        torch.randn(K, rank, generator=g, dtype=torch.float64)
        m = K - 1 if seed % 3 == 0 else 2 + seed % 6
        v = torch.zeros(K, dtype=torch.float64)
        v[:m] = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
        v[m] = 1.0
        assert float((v @ j).norm()) < 1e-10 * float(j.norm())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("seed", "rank"), CASES)
def test_weights_are_bounded_and_nothing_conflicts(
    dtype: torch.dtype, seed: int, rank: int
) -> None:
    j = weakly_stationary(seed, rank, dtype)
    method = upgrad()
    d, w = method.aggregate(j, method.task_names)
    assert bool(torch.isfinite(w).all()) and bool(torch.isfinite(d).all())
    # every weight is at least 1/K (u^(i) >= e_i) and, with the minimum-norm choice, small
    assert float(w.min()) >= 1 / K - 1e-6
    assert float(w.abs().max()) < 1e4, float(w.abs().max())
    conflict = (j.double() @ d.double()).clamp(max=0).abs()
    assert bool((conflict <= rounding_bound(j, w)).all()), (conflict / rounding_bound(j, w)).max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_invariant_to_the_order_of_tasks(dtype: torch.dtype) -> None:
    for seed, rank in CASES[:8]:
        j = weakly_stationary(seed, rank, dtype)
        method = upgrad()
        d, w = method.aggregate(j, method.task_names)
        perm = torch.randperm(K, generator=torch.Generator().manual_seed(seed))
        d_perm, _ = method.aggregate(j[perm], method.task_names)
        tolerance = float(rounding_bound(j, w).max() / j.double().norm(dim=1).min())
        assert float((d_perm.double() - d.double()).norm()) <= tolerance


def test_each_projection_is_optimal_in_float64() -> None:
    """The chosen coefficients solve the projection problem: in correlation form the KKT
    conditions ``C (e_i + x) >= 0`` (no conflict), ``x >= 0`` and complementarity hold to
    float64 rounding times the coefficients' size."""
    from polytask.balancing.aggregation._qp import dual_cone_weights

    for seed, rank in CASES[:8]:
        j = weakly_stationary(seed, rank, torch.float64)
        gramian = j @ j.T
        u = dual_cone_weights(gramian)
        norms, _, c = correlation(gramian)
        # back to correlation coefficients: y_j = u_ij |g_j| / |g_i|
        y = u * norms[None, :] / norms[:, None]
        assert bool((y >= -1e-12).all())
        assert bool((torch.diagonal(y) >= 1 - 1e-9).all())
        grad = y @ c  # row i: C (e_i + x)
        eps = float(torch.finfo(torch.float64).eps)
        slack = 1e3 * K * eps * (1 + y.abs().sum(dim=1, keepdim=True))
        assert bool((grad >= -slack).all())
        x = y - torch.eye(K, dtype=torch.float64)
        assert bool(((x.abs() * grad.abs()) <= slack * (1 + x.abs())).all())


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "aligned_mtl", "pcgrad", "mgda"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_gramian_method_sees_the_precision_of_its_rows(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``input_eps`` inside a Gramian method's weights is the epsilon of the Jacobian's dtype,
    whichever ``aggregate`` computes them (plain or per-task Gramian weightings)."""
    method = BALANCERS.get(name)(tasks=["a", "b", "c"])
    assert isinstance(method, GramianWeighting)
    seen: list[float] = []
    hook = "weights_for" if hasattr(method, "weights_for") else "weights_from_gramian"
    original = getattr(method, hook)

    def record(*args: object) -> Tensor:
        seen.append(method.input_eps)
        result: Tensor = original(*args)
        return result

    monkeypatch.setattr(method, hook, record)
    j = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    method.aggregate(j, ["a", "b", "c"])
    assert seen == [float(torch.finfo(dtype).eps)]
    assert method.input_eps == float(torch.finfo(torch.float64).eps)  # reset afterwards
