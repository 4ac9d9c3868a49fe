"""PCGrad, GradDrop, GradVac, CAGrad and IMTL-G against TorchJD 0.18 used as an oracle.

The randomised methods are compared with the same random choices: TorchJD draws task
orders with ``torch.randperm`` and GradDrop's uniforms with ``torch.rand`` from the global
generator; here those two functions are replaced, for the duration of the oracle's call,
by ones that return polytask's orders (reproduced from the seed with
:func:`random_task_orders`) and uniforms. With two tasks PCGrad and GradVac do not depend
on the order at all, and the comparison needs no patching.

Where the conventions differ the test says so and checks the stated relation:

- TorchJD's GradVac adds ``eps = 1e-8`` to its denominators (default ``beta = 0.5``; the
  paper's and polytask's is 0.01, passed explicitly here). At gradient norms about 1e-6
  the epsilon dominates and TorchJD's result is wrong; with ``eps=0`` it agrees with
  polytask, which also satisfies ``f(cJ) = c f(J)`` there.
- TorchJD's CAGrad returns exactly zero at 1e-6 scale (its normalisation is thresholded
  with an absolute epsilon); polytask's update is ``1e-6`` times the unit-scale one, which
  the naive high-precision solve of ``test_aggregation_projection.py`` confirms. With a
  zero gradient TorchJD returns zero too (zero is then in the convex hull); polytask leaves
  that row out of the minimisation. Clarabel's accuracy limits the agreement to ~1e-4.
  ``rescale=1`` (the official code's option) is TorchJD's result divided by ``1 + c^2``.
- IMTL-G: the same where the Gramian is invertible. For two exactly opposite gradients
  TorchJD returns zero weights, polytask ``(1/2, 1/2)`` (the paper's closed form): both
  updates are 0. For collinear gradients (``g``, ``2g``) every combination has equal
  projections; TorchJD picks ``pinv(G) ||g||`` normalised (weights 1/3, 2/3), polytask the
  minimum-norm weights (1/2, 1/2).
- TorchJD 0.18's PCGrad and GradDrop have no epsilon (LibMTL's do), and agree at every scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor
from torchjd.aggregation import IMTLG as JDIMTLG
from torchjd.aggregation import CAGrad as JDCAGrad
from torchjd.aggregation import GradDrop as JDGradDrop
from torchjd.aggregation import GradVac as JDGradVac
from torchjd.aggregation import IMTLGWeighting as JDIMTLGWeighting
from torchjd.aggregation import PCGrad as JDPCGrad

from polytask.balancing.aggregation.cagrad import CAGrad
from polytask.balancing.aggregation.graddrop import GradDrop, graddrop, graddrop_uniform
from polytask.balancing.aggregation.gradvac import GradVac
from polytask.balancing.aggregation.imtl import IMTLG, imtl_g_weights
from polytask.balancing.aggregation.pcgrad import PCGrad, random_task_orders

KINDS = ("ordinary", "zero_row", "tiny", "huge", "nearly_collinear", "conflicting")


def names(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


def family(kind: str, k: int, seed: int = 0, dim: int = 12) -> Tensor:
    g = torch.Generator().manual_seed(1000 + 100 * k + seed)
    j = torch.randn(k, dim, generator=g)
    if kind == "zero_row":
        j[k // 2] = 0.0
    elif kind == "tiny":
        j *= 1e-6
    elif kind == "huge":
        j *= 1e6
    elif kind == "nearly_collinear":
        j = torch.randn(1, dim, generator=g) + 1e-2 * j
    elif kind == "conflicting":
        j = j - 0.9 * j.mean(dim=0)
    return j


def close(got: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=rtol * scale)


@contextmanager
def patched_randperm(perms: Sequence[Sequence[int]]) -> Iterator[None]:
    """``torch.randperm`` returns the given permutations, in order, then fails."""
    queue = [torch.tensor(p) for p in perms]
    original = torch.randperm

    def fake(n: int, *args: object, **kwargs: object) -> Tensor:
        perm = queue.pop(0)
        assert len(perm) == n
        return perm

    torch.randperm = fake  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.randperm = original
    assert not queue


@contextmanager
def patched_rand(values: Tensor) -> Iterator[None]:
    original = torch.rand

    def fake(*args: object, **kwargs: object) -> Tensor:
        return values.clone()

    torch.rand = fake  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.rand = original


# --- pinned values: literals that polytask and the oracle both reproduce -----------------

SQRT2 = math.sqrt(2.0)
PAIR = [[1.0, 0.0], [-1.0, 1.0]]
PINNED = [
    ("pcgrad", PAIR, [0.5, 1.5]),
    ("imtl_g", PAIR, [3 - 2 * SQRT2, SQRT2 - 1]),
    ("cagrad", PAIR, [0.25, 0.5]),
    ("gradvac", PAIR, [0.5, 1.5]),
    # the third row conflicts with neither: every order gives the same
    ("pcgrad", [[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [0.5, 1.5, 1.0]),
]


def _polytask(name: str, k: int) -> PCGrad | IMTLG | CAGrad | GradVac:
    tasks = names(k)
    if name == "pcgrad":
        return PCGrad(tasks)
    if name == "imtl_g":
        return IMTLG(tasks)
    if name == "cagrad":
        return CAGrad(tasks, c=0.5)
    return GradVac(tasks, beta=0.5)


@pytest.mark.parametrize(("name", "rows", "expected"), PINNED)
def test_pinned_values_for_both(name: str, rows: list[list[float]], expected: list[float]) -> None:
    j = torch.tensor(rows)
    k = len(rows)
    oracle = {
        "pcgrad": JDPCGrad,
        "imtl_g": JDIMTLG,
        "cagrad": lambda: JDCAGrad(c=0.5),
        "gradvac": lambda: JDGradVac(beta=0.5),
    }[name]()
    method = _polytask(name, k)
    if k > 2:  # feed the oracle polytask's orders
        orders = random_task_orders(torch.Generator().manual_seed(0), k, list(range(k)))
        with patched_randperm([[i, *orders[i]] for i in range(k)]):
            got_oracle = oracle(j)
    else:
        got_oracle = oracle(j)
    out, _ = method.aggregate(j, names(k))
    close(out, torch.tensor(expected), rtol=1e-6)
    # TorchJD's CAGrad solves its cone program with Clarabel: only about 4e-5 here
    close(got_oracle, torch.tensor(expected), rtol=1e-4 if name == "cagrad" else 1e-6)


def test_pinned_graddrop_for_both() -> None:
    j = torch.tensor([[1.0, -2.0, 0.5, 0.0], [3.0, 1.0, -0.5, 0.0]])
    u = torch.tensor([0.5, 0.5, 0.4, 0.9])
    # purities: 1, 1/3, 1/2, (all zero) -> keep +, -, + (0.5 > 0.4), nothing
    expected = torch.tensor([4.0, -2.0, 0.5, 0.0])
    out, _ = graddrop(j, u, 0.0)
    close(out, expected)
    with patched_rand(u):
        close(JDGradDrop()(j), expected)


# --- PCGrad -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_pcgrad_two_tasks_equals_torchjd(kind: str) -> None:
    method = PCGrad(names(2))
    for step in range(3):
        j = family(kind, 2, seed=step)
        out, _ = method.aggregate(j, names(2))
        close(out, JDPCGrad()(j))


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_pcgrad_equals_torchjd_with_the_same_orders(kind: str, k: int) -> None:
    method = PCGrad(names(k), seed=4)
    generator = torch.Generator().manual_seed(4)
    for step in range(3):
        j = family(kind, k, seed=step)
        orders = random_task_orders(generator, k, list(range(k)))
        out, _ = method.aggregate(j, names(k))
        # TorchJD draws a permutation of all rows per row and skips the row itself
        with patched_randperm([[i, *orders[i]] for i in range(k)]):
            expected = JDPCGrad()(j)
        close(out, expected)


# --- GradDrop -----------------------------------------------------------------------------


@pytest.mark.parametrize("leak", [0.0, 0.25])
@pytest.mark.parametrize("kind", KINDS)
def test_graddrop_equals_torchjd_with_the_same_uniforms(kind: str, leak: float) -> None:
    k = 3
    method = GradDrop(names(k), leak=leak, seed=9)
    generator = torch.Generator().manual_seed(9)
    for step in range(2):
        j = family(kind, k, seed=step, dim=64)
        uniform = graddrop_uniform(generator, j.shape[1], j.device)
        out, _ = method.aggregate(j, names(k))
        with patched_rand(uniform):
            expected = JDGradDrop(leak=torch.full((k,), leak))(j)
        close(out, expected)


# --- GradVac ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ordinary", "zero_row", "huge", "conflicting"])
def test_gradvac_two_tasks_equals_torchjd_over_several_steps(kind: str) -> None:
    beta = 0.3
    method = GradVac(names(2), beta=beta)
    oracle = JDGradVac(beta=beta)
    for step in range(5):
        j = family(kind, 2, seed=step)
        out, _ = method.aggregate(j, names(2))
        close(out, oracle(j), rtol=1e-5)


@pytest.mark.parametrize("k", [3, 4])
def test_gradvac_equals_torchjd_with_the_same_orders(k: int) -> None:
    beta = 0.3
    method = GradVac(names(k), beta=beta, seed=5)
    oracle = JDGradVac(beta=beta)
    generator = torch.Generator().manual_seed(5)
    for step in range(4):
        j = family("conflicting", k, seed=step)
        orders = random_task_orders(generator, k, list(range(k)))
        out, _ = method.aggregate(j, names(k))
        # TorchJD permutes the list of the other rows (positions in that list)
        perms = []
        for i in range(k):
            others = [r for r in range(k) if r != i]
            perms.append([others.index(r) for r in orders[i]])
        with patched_randperm(perms):
            expected = oracle(j)
        close(out, expected, rtol=1e-5)


def test_gradvac_oracle_epsilon_dominates_at_small_scale() -> None:
    beta = 0.3
    unit = GradVac(names(2), beta=beta)
    small = GradVac(names(2), beta=beta)
    oracle = JDGradVac(beta=beta)
    oracle_no_eps = JDGradVac(beta=beta, eps=0.0)
    worst = 0.0
    for step in range(4):
        j = family("conflicting", 2, seed=step)
        out, _ = unit.aggregate(j, names(2))
        out_small, _ = small.aggregate(j * 1e-6, names(2))
        close(out_small / 1e-6, out, rtol=1e-4)  # polytask: f(cJ) = c f(J)
        close(out_small, oracle_no_eps(j * 1e-6), rtol=1e-5)  # the formula without epsilon
        wrong = oracle(j * 1e-6)
        worst = max(worst, float((wrong - out_small).norm() / out_small.norm()))
    assert worst > 0.01  # the oracle's epsilon changes the result by more than 1 %


# --- CAGrad -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("kind", ["ordinary", "huge", "nearly_collinear", "conflicting"])
def test_cagrad_equals_torchjd(kind: str, k: int) -> None:
    """TorchJD solves the same problem with Clarabel (accuracy about 1e-8): agreement to
    about 1e-4 of the update, at unit and large scale."""
    for c in (0.2, 0.5, 0.9):
        j = family(kind, k)
        out, _ = CAGrad(names(k), c=c).aggregate(j, names(k))
        close(out, JDCAGrad(c=c)(j), rtol=2e-4)
        rescaled, _ = CAGrad(names(k), c=c, rescale=1).aggregate(j, names(k))
        close(rescaled, JDCAGrad(c=c)(j) / (1 + c * c), rtol=2e-4)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_cagrad_with_a_zero_gradient(k: int) -> None:
    """TorchJD keeps the zero row, so g_w = 0 is optimal and it returns 0; polytask leaves
    the row out: its update solves CAGrad for the other rows around the same g0 (g0 counts
    the zero row), which also solves the paper's primal problem with the zero row."""
    j = family("zero_row", k)
    assert not bool(JDCAGrad(c=0.5)(j).any())
    out, weights = CAGrad(names(k), c=0.5).aggregate(j, names(k))
    live = [i for i in range(k) if bool(j[i].any())]
    g0 = j.double().mean(dim=0)
    assert float((out.double() - g0).norm()) == pytest.approx(0.5 * float(g0.norm()), rel=1e-5)
    assert weights[k // 2] == pytest.approx(1 / k)
    if len(live) > 1:  # no point of the ball does better for the worst of the other tasks
        others = j[live]
        best = float((others.double() @ out.double()).min())
        sampled = g0 + 0.5 * float(g0.norm()) * torch.nn.functional.normalize(
            torch.randn(500, j.shape[1], generator=torch.Generator().manual_seed(0)).double(),
            dim=1,
        )
        assert best >= float((sampled @ others.double().T).min(dim=1).values.max()) - 1e-6


@pytest.mark.parametrize("k", [2, 3, 5])
def test_cagrad_oracle_returns_zero_at_small_scale(k: int) -> None:
    j = family("ordinary", k)
    assert not bool(JDCAGrad(c=0.5)(j * 1e-6).any())  # the oracle: exactly zero
    out, _ = CAGrad(names(k), c=0.5).aggregate(j, names(k))
    out_small, _ = CAGrad(names(k), c=0.5).aggregate(j * 1e-6, names(k))
    assert bool(out_small.any())
    close(out_small / 1e-6, out, rtol=1e-4)
    close(out, JDCAGrad(c=0.5)(j), rtol=2e-4)


# --- IMTL-G -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_imtl_g_equals_torchjd(kind: str, k: int) -> None:
    j = family(kind, k)
    out, weights = IMTLG(names(k)).aggregate(j, names(k))
    rtol = 1e-3 if kind == "nearly_collinear" else 1e-5  # float32 rows, conditioning ~1e4
    close(out, JDIMTLG()(j), rtol=rtol)
    gram = j.double() @ j.double().T
    close(weights, JDIMTLGWeighting()(gram), rtol=rtol)


def test_imtl_g_singular_conventions_differ_as_documented() -> None:
    g = torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)
    opposite = torch.cat([g, -g])
    gram = opposite @ opposite.T
    assert not bool(JDIMTLGWeighting()(gram).any())
    close(imtl_g_weights(gram), torch.tensor([0.5, 0.5]))
    assert not bool((imtl_g_weights(gram) @ opposite).any())  # both updates are 0
    collinear = torch.cat([g, 2 * g])
    gram = collinear @ collinear.T
    close(JDIMTLGWeighting()(gram), torch.tensor([1 / 3, 2 / 3]))
    close(imtl_g_weights(gram), torch.tensor([0.5, 0.5]))
