"""RLW: weights on the simplex, reproducible from the seed, exact resume of the generator."""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor
from torchjd.scalarization import Random

from polytask.balancing.weighting import RLW

DISTRIBUTIONS = ["normal", "dirichlet", "uniform"]


def _losses(names: str = "abc", dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    return {t: torch.tensor(1.0 + i, dtype=dtype) for i, t in enumerate(names)}


def _draw(rlw: RLW, names: str = "abc") -> list[float]:
    w = rlw.weights(_losses(names))
    return [float(w[t]) for t in names]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_weights_are_positive_and_sum_to_one(distribution: str) -> None:
    rlw = RLW(["a", "b", "c", "d"], distribution=distribution)  # type: ignore[arg-type]
    draws = torch.tensor([_draw(rlw, "abcd") for _ in range(2000)], dtype=torch.float64)
    assert bool((draws > 0).all())
    torch.testing.assert_close(draws.sum(1), torch.ones(2000, dtype=torch.float64))
    # exchangeable tasks: each mean weight is 1/K
    torch.testing.assert_close(
        draws.mean(0), torch.full((4,), 0.25, dtype=torch.float64), atol=0.02, rtol=0
    )
    assert len({tuple(row.tolist()) for row in draws}) == 2000  # a fresh draw every step


def test_the_draws_are_the_documented_transforms_of_the_seeded_generator() -> None:
    g = {d: torch.Generator().manual_seed(7) for d in DISTRIBUTIONS}
    rlws = {d: RLW(["a", "b", "c"], distribution=d, seed=7) for d in DISTRIBUTIONS}  # type: ignore[arg-type]
    for _ in range(3):
        normal = torch.softmax(torch.randn(3, generator=g["normal"]), 0)
        uniform = torch.softmax(torch.rand(3, generator=g["uniform"]), 0)
        e = torch.empty(3).exponential_(generator=g["dirichlet"])
        assert _draw(rlws["normal"]) == normal.tolist()
        assert _draw(rlws["uniform"]) == uniform.tolist()
        assert _draw(rlws["dirichlet"]) == (e / e.sum()).tolist()


def test_uniform_variant_stays_close_to_equal_and_dirichlet_spreads_widely() -> None:
    spread = {}
    for d in DISTRIBUTIONS:
        rlw = RLW(["a", "b"], distribution=d)  # type: ignore[arg-type]
        draws = torch.tensor([_draw(rlw, "ab") for _ in range(500)])
        spread[d] = float(draws[:, 0].max() - draws[:, 0].min())
    # softmax of U(0,1) pairs: weights within (1/(1+e), e/(1+e)) = (0.269, 0.731)
    assert spread["uniform"] < 0.47
    assert spread["dirichlet"] > 0.95


def test_same_seed_same_sequence_other_seed_other_sequence() -> None:
    a, b, c = (
        RLW(["a", "b", "c"], seed=3),
        RLW(["a", "b", "c"], seed=3),
        RLW(["a", "b", "c"], seed=4),
    )
    seq_a = [_draw(a) for _ in range(5)]
    assert seq_a == [_draw(b) for _ in range(5)]
    assert seq_a != [_draw(c) for _ in range(5)]


def test_the_global_random_state_is_neither_used_nor_changed() -> None:
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    rlw = RLW(["a", "b"])
    first = _draw(rlw, "ab")
    assert torch.equal(torch.rand(1), expected_next)
    torch.manual_seed(123)
    assert _draw(RLW(["a", "b"]), "ab") == first


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_resume_from_a_weights_only_checkpoint_is_exact(distribution: str) -> None:
    rlw = RLW(["a", "b", "c"], distribution=distribution, seed=11)  # type: ignore[arg-type]
    for _ in range(7):
        _draw(rlw)
    buffer = io.BytesIO()
    torch.save(rlw.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = RLW(["a", "b", "c"], distribution=distribution, seed=999)  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    continuation = [_draw(rlw) for _ in range(5)]
    assert [_draw(resumed) for _ in range(5)] == continuation
    fresh = RLW(["a", "b", "c"], distribution=distribution, seed=11)  # type: ignore[arg-type]
    assert [_draw(fresh) for _ in range(5)] != continuation


def test_missing_tasks_consume_the_same_draws_and_renormalise() -> None:
    full, partial = RLW(["a", "b", "c"], seed=5), RLW(["a", "b", "c"], seed=5)
    g = torch.Generator().manual_seed(5)
    for names in ("ac", "b", "abc", "ca"):
        x = torch.randn(3, generator=g)
        w = partial.weights(_losses(names))
        assert list(w) == list(names)
        picked = torch.stack([x["abc".index(t)] for t in names])
        torch.testing.assert_close(torch.stack(list(w.values())), torch.softmax(picked, 0))
        _draw(full)
    assert _draw(full) == _draw(partial)  # same position in the stream


def test_dirichlet_with_missing_tasks_renormalises_the_present_components() -> None:
    rlw = RLW(["a", "b", "c"], distribution="dirichlet", seed=2)
    g = torch.Generator().manual_seed(2)
    e = torch.empty(3).exponential_(generator=g)
    w = rlw.weights(_losses("cb"))
    assert [float(w["c"]), float(w["b"])] == pytest.approx(
        [float(e[2] / (e[2] + e[1])), float(e[1] / (e[2] + e[1]))]
    )


def test_weights_follow_the_losses_dtype() -> None:
    w = RLW(["a", "b"]).weights(_losses("ab", torch.float64))
    assert all(v.dtype == torch.float64 and v.shape == () for v in w.values())
    assert float(sum(w.values())) == pytest.approx(1.0, abs=1e-7)


def test_normal_variant_equals_torchjd_random_from_the_same_seed() -> None:
    # TorchJD's Random draws softmax(randn(K)) from the global generator; seeded alike, the
    # CPU generators produce the same numbers, so the weights are identical
    rlw = RLW(["a", "b", "c"], seed=7)
    torch.manual_seed(7)
    oracle = Random()
    for _ in range(4):
        x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        oracle(x).backward()
        assert x.grad is not None
        assert _draw(rlw) == x.grad.tolist()
