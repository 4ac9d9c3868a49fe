"""DualProj, mean, sum, constant, trimmed mean and Krum against TorchJD 0.18 and naive
references written here (a brute-force solve of DualProj's QP in 50-digit arithmetic, the
trimmed mean column by column, Krum from the pairwise distances of the rows)."""

from __future__ import annotations

import itertools
import warnings

import mpmath
import pytest
import torch
from test_aggregation_exact import DPS, KINDS, SIZES, _mp, family, to_tensor, weights_of
from torch import Tensor, nn

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation import Constant, DualProj, Krum, TrimmedMean
from polytask.balancing.aggregation.dualproj import dual_projection_weights
from polytask.balancing.base import BackwardContext
from polytask.balancing.gradient import GradientBalancer
from polytask.errors import ConfigError
from polytask.registry import call_with_options

torchjd = pytest.importorskip("torchjd.aggregation")
linalg = pytest.importorskip("torchjd.linalg")


def names(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


# --- DualProj ----------------------------------------------------------------------------


def brute_projection(g: Tensor, p: Tensor) -> list[mpmath.mpf]:
    """argmin_{u >= p} u^T G u by enumerating the set of constraints u_j > p_j (50 digits)."""
    k = g.shape[0]
    with mpmath.workdps(DPS):
        gm = _mp(g)
        pm = [mpmath.mpf(float(x)) for x in p]
        scale = max(abs(gm[i, i]) for i in range(k)) or mpmath.mpf(1)
        for size in range(k + 1):
            for free in itertools.combinations(range(k), size):
                u = list(pm)
                if free:
                    a = mpmath.matrix([[gm[i, j] for j in free] for i in free])
                    rhs = mpmath.matrix(
                        [-mpmath.fsum(gm[i, j] * pm[j] for j in range(k)) for i in free]
                    )
                    try:
                        x = mpmath.lu_solve(a, rhs)
                    except ZeroDivisionError:
                        continue
                    if any(v <= 0 for v in x):
                        continue
                    for r, i in enumerate(free):
                        u[i] += x[r]
                mu = [mpmath.fsum(gm[i, j] * u[j] for j in range(k)) for i in range(k)]
                if all(m >= -scale * mpmath.mpf(10) ** -30 for m in mu):
                    return u
    raise AssertionError("no active set satisfies the KKT conditions")


def assert_projection_kkt(g: Tensor, p: Tensor, u: Tensor, tol: float = 1e-10) -> None:
    """u >= p, mu = G u >= 0, mu_j = 0 where u_j > p_j (relative to |g_j| sum_q |u_q| |g_q|)."""
    norms = g.diagonal().clamp_min(0).sqrt()
    magnitude = norms * float((u.abs() * norms).sum()) + 1e-300
    mu = g @ u
    assert bool((u >= p - 1e-15).all()), (u, p)
    assert float((-mu / magnitude).max()) <= tol
    assert float(torch.where(u > p + 1e-12 * p.abs().max(), mu / magnitude, 0.0).abs().max()) <= tol


@pytest.mark.parametrize("kind", ["ordinary", "conflicting", "tiny", "huge", "small_task"])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_dualproj_equals_the_brute_force_projection(k: int, kind: str) -> None:
    for seed in range(2):
        j = family(kind, k, seed)
        g = j @ j.T
        u = weights_of("dualproj", j)
        p = torch.full((k,), 1.0 / k, dtype=torch.float64)
        assert_projection_kkt(g, p, u)
        torch.testing.assert_close(u, to_tensor(brute_projection(g, p)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", SIZES)
def test_dualproj_properties_over_the_families(k: int, kind: str) -> None:
    """KKT of the projection, J d >= 0, scale equivariance, order invariance."""
    j = family(kind, k)
    g = j @ j.T
    u = weights_of("dualproj", j)
    p = torch.full((k,), 1.0 / k, dtype=torch.float64)
    assert bool(torch.isfinite(u).all())
    if kind != "all_zero":
        assert_projection_kkt(g, p, u, tol=1e-9)
    norms = j.norm(dim=1)
    d = u @ j
    assert bool((j @ d >= -1e-12 * norms * float((u.abs() * norms).sum()) - 1e-300).all())
    for factor in (1e-6, 1e6):
        torch.testing.assert_close(weights_of("dualproj", factor * j), u, rtol=1e-9, atol=1e-12)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    scale = float(norms.max()) or 1.0
    d_perm = weights_of("dualproj", j[perm]) @ j[perm]
    torch.testing.assert_close(d_perm / scale, d / scale, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["ordinary", "conflicting"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_dualproj_is_torchjd_without_its_regularisation(k: int, kind: str) -> None:
    """TorchJD's projector with norm_eps = reg_eps = 0 solves the same QP (quadprog, which
    needs a positive definite Gramian: independent rows); its defaults (trace normalisation,
    1e-4 ridge) move the weights by about 1e-4 and return the plain mean at a 1e-6 scale."""
    exact = torchjd.DualProjWeighting(projector=linalg.QuadprogProjector(norm_eps=0, reg_eps=0))
    default = torchjd.DualProjWeighting()
    for seed in range(2):
        j = family(kind, k, seed, dim=3 * k)
        g = j @ j.T
        ours = weights_of("dualproj", j)
        torch.testing.assert_close(ours, exact(g), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours, default(g), rtol=0, atol=2e-3)
    tiny = 1e-6 * family("conflicting", k, 0, dim=3 * k)
    g = tiny @ tiny.T
    mean = torch.full((k,), 1.0 / k, dtype=torch.float64)
    torch.testing.assert_close(default(g), mean)
    ours = weights_of("dualproj", tiny)
    assert_projection_kkt(g, mean, ours)
    torch.testing.assert_close(ours, weights_of("dualproj", 1e6 * tiny), rtol=1e-9, atol=0)


def test_dualproj_preference_and_weakly_stationary_rows() -> None:
    j = family("conflicting", 3)
    g = j @ j.T
    pref = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    method = DualProj(["a", "b", "c"], pref_vector=[2.0, 0.0, 1.0])
    u = method.weights_from_gramian(g)
    assert_projection_kkt(g, pref, u)
    torch.testing.assert_close(u, to_tensor(brute_projection(g, pref)), rtol=1e-9, atol=1e-12)
    mapping = DualProj(["a", "b", "c"], pref_vector={"c": 1.0, "a": 2.0, "b": 0.0})
    torch.testing.assert_close(mapping.weights_from_gramian(g), u)
    # a subset of tasks keeps the present tasks' preferences
    sub = mapping.weights_for(g[[0, 2]][:, [0, 2]], ["a", "c"])
    torch.testing.assert_close(sub, dual_projection_weights(g[[0, 2]][:, [0, 2]], pref[[0, 2]]))
    # opposite rows (0 is a positive combination): bounded, conflicts with no task
    opposite = torch.tensor([[1.0, 2.0, 0.0], [-2.0, -4.0, 0.0], [0.0, 1.0, 1.0]])
    opposite = opposite.double()
    w = weights_of("dualproj", opposite)
    assert bool(torch.isfinite(w).all()) and float(w.abs().max()) < 1e8
    assert bool((opposite @ (w @ opposite) >= -1e-6).all())


# --- mean, sum, constant -------------------------------------------------------------------


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.theta = nn.Parameter(torch.randn(6, generator=g))
        self.a = torch.randn(3, 4, 6, generator=g)

    def losses(self) -> dict[str, Tensor]:
        return {t: 0.5 * (self.a[k] @ self.theta).square().sum() for k, t in enumerate("abc")}


@pytest.mark.parametrize(
    ("name", "options", "oracle"),
    [
        ("mean", {}, lambda k: torchjd.MeanWeighting()),
        ("sum", {}, lambda k: torchjd.SumWeighting()),
        (
            "constant",
            {"weights": [0.5, 2.0, 0.0]},
            lambda k: torchjd.ConstantWeighting(torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)),
        ),
    ],
)
@pytest.mark.parametrize("level", ["parameter", "feature"])
def test_fixed_combinations_are_torchjds_and_a_loss_weighting(
    name: str, options: dict[str, object], oracle: object, level: str
) -> None:
    method = BALANCERS.get(name)(tasks=["a", "b", "c"], level=level, **options)
    assert isinstance(method, GradientBalancer) and method.level == level
    j = family("conflicting", 3)
    expected = oracle(3)(j if name == "constant" else j @ j.T)  # type: ignore[operator]
    torch.testing.assert_close(method.weights_from_gramian(j @ j.T), expected)
    if level == "parameter":
        model, reference = Quadratic(), Quadratic()
        method.backward(model.losses(), BackwardContext(shared_parameters=[model.theta]))
        w = expected.float()
        total = sum(w[i] * loss for i, loss in enumerate(reference.losses().values()))
        assert isinstance(total, Tensor)
        total.backward()
        assert model.theta.grad is not None and reference.theta.grad is not None
        torch.testing.assert_close(model.theta.grad, reference.theta.grad, rtol=1e-5, atol=1e-6)


def test_fixed_combinations_on_a_subset_of_tasks() -> None:
    j = family("ordinary", 3)
    sub = j[[0, 2]]
    g = sub @ sub.T
    mean = BALANCERS.get("mean")(tasks=["a", "b", "c"])
    torch.testing.assert_close(mean.weights_for(g, ["a", "c"]), torch.full((2,), 0.5).double())
    constant = Constant(["a", "b", "c"], weights={"a": 3.0, "b": 1.0, "c": 0.5})
    expected = torch.tensor([3.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(constant.weights_for(g, ["a", "c"]), expected)
    ones = Constant(["a", "b", "c"]).weights_from_gramian(j @ j.T)  # default: the sum
    torch.testing.assert_close(ones, torch.ones(3, dtype=torch.float64))


# --- trimmed mean ----------------------------------------------------------------------------


def naive_trimmed_mean(j: Tensor, trim: int) -> Tensor:
    out = []
    for column in j.T.tolist():
        values = sorted(column)
        kept = values[trim : len(values) - trim]
        out.append(sum(kept) / len(kept))
    return torch.tensor(out, dtype=j.dtype)


@pytest.mark.parametrize("trim", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [3, 5, 10])
def test_trimmed_mean_equals_torchjd_and_the_column_by_column_mean(
    k: int, kind: str, trim: int
) -> None:
    if k < 2 * trim + 1:
        pytest.skip("needs 2 trim + 1 rows")
    j = family(kind, k)
    method = TrimmedMean(names(k), trim_number=trim)
    d, w = method.aggregate(j, names(k))
    scale = float(j.norm(dim=1).max()) or 1.0
    torch.testing.assert_close(d / scale, naive_trimmed_mean(j, trim) / scale, rtol=0, atol=1e-15)
    torch.testing.assert_close(d / scale, torchjd.TrimmedMean(trim)(j) / scale, rtol=0, atol=1e-15)
    torch.testing.assert_close(w.sum(), torch.ones((), dtype=w.dtype), rtol=1e-12, atol=0)
    assert bool((w >= 0).all())
    for factor in (1e-6, 1e6):
        scaled, _ = method.aggregate(factor * j, names(k))
        torch.testing.assert_close(scaled, factor * d, rtol=1e-12, atol=0)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    permuted, w_perm = method.aggregate(j[perm], names(k))
    torch.testing.assert_close(permuted / scale, d / scale, rtol=0, atol=1e-15)
    if kind != "all_zero":  # which of equal values is kept follows the order
        torch.testing.assert_close(w_perm, w[perm], rtol=0, atol=0)


def test_trimmed_mean_with_too_few_tasks() -> None:
    with pytest.warns(UserWarning, match="trim_number=2 .* needs at least 5 tasks"):
        method = TrimmedMean(names(3), trim_number=2)
    j = family("ordinary", 3)
    d, _ = method.aggregate(j, names(3))
    torch.testing.assert_close(d, naive_trimmed_mean(j, 1))
    d, _ = method.aggregate(j[:2], names(2))  # a step with two tasks: the mean
    torch.testing.assert_close(d, j[:2].mean(dim=0))


# --- Krum ----------------------------------------------------------------------------------


def krum_scores(j: Tensor, f: int) -> list[float]:
    k = j.shape[0]
    scores = []
    for i in range(k):
        distances = sorted(float((j[i] - j[q]).norm()) for q in range(k) if q != i)
        scores.append(sum(distances[: k - f - 2]))
    return scores


def naive_krum(j: Tensor, f: int, m: int) -> Tensor:
    scores = krum_scores(j, f)
    chosen = sorted(range(j.shape[0]), key=lambda i: (scores[i], i))[:m]
    out = torch.zeros(j.shape[0], dtype=torch.float64)
    out[chosen] = 1.0 / m
    return out


@pytest.mark.parametrize(("f", "m"), [(0, 1), (1, 1), (1, 2), (2, 3)])
@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("all_zero", "zero_row")])
@pytest.mark.parametrize("k", [5, 10])
def test_krum_equals_torchjd_and_the_distance_definition(k: int, kind: str, f: int, m: int) -> None:
    """Same selection as the definition (ties broken by the smaller index) and the same
    scores as TorchJD's (whose topk breaks exact ties its own way: with K - f - 2 = 1
    neighbour, mutual nearest neighbours tie exactly)."""
    j = family(kind, k)
    g = j @ j.T
    w = Krum(names(k), n_byzantine=f, n_selected=m).weights_from_gramian(g)
    torch.testing.assert_close(w, naive_krum(j, f, m))
    scores = torch.tensor(krum_scores(j, f), dtype=torch.float64)
    theirs = torchjd.KrumWeighting(f, m)(g)
    torch.testing.assert_close(
        scores[w > 0].sort().values, scores[theirs > 0].sort().values, rtol=1e-9, atol=0
    )
    ordered = scores.sort().values
    tie = m < k and bool(torch.isclose(ordered[m - 1], ordered[m], rtol=1e-9, atol=0))
    for factor in (1e-6, 1e6):
        scaled = Krum(names(k), n_byzantine=f, n_selected=m).weights_from_gramian(factor**2 * g)
        torch.testing.assert_close(scaled, w)
    if not tie:
        torch.testing.assert_close(w, theirs)
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
        gp = g[perm][:, perm]
        permuted = Krum(names(k), n_byzantine=f, n_selected=m).weights_from_gramian(gp)
        torch.testing.assert_close(permuted, w[perm])


def test_krum_with_few_tasks() -> None:
    with pytest.warns(UserWarning, match="need at least 4 tasks"):
        method = Krum(names(3), n_byzantine=1)
    j = family("ordinary", 3)
    torch.testing.assert_close(method.weights_from_gramian(j @ j.T), naive_krum(j, 0, 1))
    two = method.weights_for(j[:2] @ j[:2].T, names(2))
    torch.testing.assert_close(two, torch.full((2,), 0.5, dtype=torch.float64))


# --- options and levels --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "key"),
    [
        ("constant", {"weights": [1.0, -1.0]}, "weights"),
        ("constant", {"weights": [1.0]}, "weights"),
        ("constant", {"weights": {"a": 1.0, "x": 1.0}}, "weights"),
        ("constant", {"weights": "1,1"}, "weights"),
        ("dualproj", {"pref_vector": [0.0, 0.0]}, "pref_vector"),
        ("dualproj", {"pref_vector": [1.0, float("nan")]}, "pref_vector"),
        ("trimmed_mean", {"trim_number": -1}, "trim_number"),
        ("trimmed_mean", {"trim_number": 1.5}, "trim_number"),
        ("krum", {"n_byzantine": -1}, "n_byzantine"),
        ("krum", {"n_selected": 0}, "n_selected"),
        ("mean", {"level": "loss"}, "level"),
    ],
)
def test_bad_options_name_the_config_key(name: str, options: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"balancer\.options\.{key}"):
        call_with_options(
            BALANCERS.get(name), options, where="balancer.options", provided={"tasks": ["a", "b"]}
        )


@pytest.mark.parametrize(
    "name", ["dualproj", "mean", "sum", "constant", "trimmed_mean", "krum", "config"]
)
@pytest.mark.parametrize("level", ["parameter", "feature"])
def test_every_new_aggregator_takes_level_and_a_subset_of_tasks(name: str, level: str) -> None:
    tasks = ["a", "b", "c", "d", "e"]
    method = call_with_options(
        BALANCERS.get(name), {"level": level}, where="balancer.options", provided={"tasks": tasks}
    )
    assert isinstance(method, GradientBalancer)
    assert method.level == level and method.needs_representation == (level == "feature")
    j = family("ordinary", 5).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for present in (tasks, ["a", "c", "e"], ["b"]):
            rows = j[[tasks.index(t) for t in present]]
            combined, weights = method.aggregate(rows, present)
            assert combined.shape == (j.shape[1],) and weights.shape == (len(present),)
            assert combined.dtype == torch.float32 and bool(torch.isfinite(combined).all())
