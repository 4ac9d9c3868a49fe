"""DWA against hand-computed sequences, a transcription of the window variant, and TorchJD."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor
from torchjd.scalarization import DWA as TorchJDDWA

from polytask.balancing.base import BackwardContext
from polytask.balancing.weighting import DWA

CTX = BackwardContext(shared_parameters=[])


def _step(balancer: DWA, losses: Mapping[str, float]) -> dict[str, float]:
    """One training step on leaf losses; the weights as floats."""
    tensors = {
        t: torch.tensor(v, dtype=torch.float64, requires_grad=True) for t, v in losses.items()
    }
    weights = balancer.backward(tensors, CTX)
    for t, w in weights.items():  # the gradient of the total is the weight
        grad = tensors[t].grad
        assert grad is not None
        assert torch.equal(grad, w)
    return {t: float(w) for t, w in weights.items()}


# epoch means of three tasks over five epochs
EPOCH_MEANS = {
    "a": [2.0, 1.5, 1.2, 1.0, 0.9],
    "b": [1.0, 0.9, 0.85, 0.8, 0.78],
    "c": [3.0, 3.0, 2.0, 1.0, 1.1],
}
# lambda_k(t) = 3 exp(r_k / 2) / sum_i exp(r_i / 2), r_k = L_k(t-1) / L_k(t-2); 1 for t < 2.
# e.g. t = 2: r = (0.75, 0.9, 1.0), exp(r / 2) = (1.45499, 1.56831, 1.64872), sum 4.67202
EXPECTED_EPOCH_WEIGHTS = [
    {"a": 1.0, "b": 1.0, "c": 1.0},
    {"a": 1.0, "b": 1.0, "c": 1.0},
    {"a": 0.9342788971710335, "b": 1.0070444157666294, "c": 1.058676687062337},
    {"a": 0.9965449229685467, "b": 1.0711803406965823, "c": 0.9322747363348708},
    {"a": 1.033811299185039, "b": 1.091086329069403, "c": 0.8751023717455583},
    {"a": 0.9543857942135919, "b": 0.9908547813970169, "c": 1.0547594243893914},
]


def test_epoch_mode_matches_the_hand_computed_sequence() -> None:
    dwa = DWA(["a", "b", "c"])
    for epoch in range(6):
        weights = _step(dwa, {"a": 1.0, "b": 2.0, "c": 3.0})
        assert weights == pytest.approx(EXPECTED_EPOCH_WEIGHTS[epoch], rel=1e-6)
        assert sum(weights.values()) == pytest.approx(3.0, rel=1e-6)
        if epoch < 5:
            dwa.on_epoch_end(epoch, {t: v[epoch] for t, v in EPOCH_MEANS.items()})


def test_epoch_weights_are_constant_within_an_epoch_and_ignore_batch_losses() -> None:
    dwa = DWA(["a", "b"])
    for epoch, means in enumerate([{"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 1.0}]):
        dwa.on_epoch_end(epoch, means)
    seen = [_step(dwa, {"a": float(x), "b": 10.0 * x}) for x in range(1, 5)]
    assert all(s == seen[0] for s in seen)
    e_a, e_b = math.exp(0.5 / 2), math.exp(1.0 / 2)
    assert seen[0] == pytest.approx({"a": 2 * e_a / (e_a + e_b), "b": 2 * e_b / (e_a + e_b)})


def test_temperature_changes_the_sharpness() -> None:
    weights = {}
    for temperature in (0.5, 2.0, 50.0):
        dwa = DWA(["a", "b"], temperature=temperature)
        dwa.on_epoch_end(0, {"a": 1.0, "b": 1.0})
        dwa.on_epoch_end(1, {"a": 2.0, "b": 1.0})
        weights[temperature] = _step(dwa, {"a": 1.0, "b": 1.0})["a"]
        e = math.exp(2.0 / temperature), math.exp(1.0 / temperature)
        assert weights[temperature] == pytest.approx(2 * e[0] / sum(e))
    assert weights[0.5] > weights[2.0] > weights[50.0] > 1.0


def test_a_task_without_labels_in_an_epoch_keeps_its_previous_ratio() -> None:
    nan = math.nan
    dwa = DWA(["a", "b"])
    dwa.on_epoch_end(0, {"a": 1.0, "b": 1.0})
    dwa.on_epoch_end(1, {"a": 0.5, "b": 1.0})  # ratios (0.5, 1)
    first = _step(dwa, {"a": 1.0, "b": 1.0})
    dwa.on_epoch_end(2, {"a": nan, "b": 0.8})  # a: keeps 0.5; b: 0.8
    e = math.exp(0.5 / 2), math.exp(0.8 / 2)
    assert _step(dwa, {"b": 1.0}) == pytest.approx({"b": 2 * e[1] / sum(e)})
    dwa.on_epoch_end(3, {"a": 0.4, "b": 0.8})  # a: 0.4 / nan is no ratio: still 0.5; b: 1.0
    e = math.exp(0.5 / 2), math.exp(1.0 / 2)
    assert _step(dwa, {"a": 1.0, "b": 1.0}) == pytest.approx(
        {"a": 2 * e[0] / sum(e), "b": 2 * e[1] / sum(e)}
    )
    dwa.on_epoch_end(4, {"a": 0.2, "b": 0.8})  # a: 0.5 from two finite means again
    assert _step(dwa, {"a": 1.0, "b": 1.0})["a"] == pytest.approx(first["a"])


def test_a_task_never_labelled_has_ratio_one_and_zero_means_do_not_crash() -> None:
    nan = math.nan
    dwa = DWA(["a", "b", "c"])
    dwa.on_epoch_end(0, {"a": nan, "b": 0.0, "c": 1.0})
    dwa.on_epoch_end(1, {"a": nan, "b": 1.0, "c": 2.0})  # b: 1 / 0 is no ratio: 1
    w = _step(dwa, {"b": 1.0, "c": 1.0})
    e = math.exp(1.0 / 2), math.exp(2.0 / 2)
    assert w == pytest.approx(
        {"b": 3 * e[0] / (2 * e[0] + e[1]), "c": 3 * e[1] / (2 * e[0] + e[1])}
    )


def test_missing_tasks_get_the_weights_of_the_full_set() -> None:
    dwa = DWA(["a", "b", "c"])
    for epoch in range(3):
        dwa.on_epoch_end(epoch, {t: v[epoch] for t, v in EPOCH_MEANS.items()})
    full = _step(dwa, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert _step(dwa, {"c": 1.0, "a": 1.0}) == {"c": full["c"], "a": full["a"]}


# -- "window" mode ----------------------------------------------------------------------


def test_window_mode_matches_the_hand_computed_sequence() -> None:
    # W = 2: each task keeps its last 4 losses, initially ones; from the 4th step on
    # (more than W earlier steps), r = mean(newest 2) / mean(older 2), current step included
    dwa = DWA(["a", "b"], mode="window", window=2)
    losses_a = [4.0, 2.0, 2.0, 1.0, 3.0, 6.0]
    got = [_step(dwa, {"a": x, "b": 1.0}) for x in losses_a]
    for step in range(3):  # buffers a: [1,1,1,4], [1,1,4,2], [1,4,2,2]
        assert got[step] == {"a": 1.0, "b": 1.0}
    ea, eb = math.exp(0.5 / 2), math.exp(1.0 / 2)  # [4,2 | 2,1]: r_a = 1.5 / 3
    assert got[3] == pytest.approx({"a": 2 * ea / (ea + eb), "b": 2 * eb / (ea + eb)})
    assert got[4] == pytest.approx({"a": 1.0, "b": 1.0})  # [2,2 | 1,3]: r_a = 1
    ea = math.exp(4.5 / 1.5 / 2)  # [2,1 | 3,6]
    assert got[5] == pytest.approx({"a": 2 * ea / (ea + eb), "b": 2 * eb / (ea + eb)})


def _nash_mtl_window_dwa(losses: np.ndarray, window: int, temp: float) -> np.ndarray:
    """A transcription of the Nash-MTL / FAMO code's DWA (fifo of 2W costs, initially ones)."""
    steps, k = losses.shape
    costs = np.ones((2 * window, k), dtype=np.float32)
    weights = np.ones(k, dtype=np.float32)
    out = []
    for running_iterations in range(steps):
        costs[:-1] = costs[1:]
        costs[-1] = losses[running_iterations]
        if running_iterations > window:
            ws = costs[window:].mean(0) / costs[:window].mean(0)
            weights = k * np.exp(ws / temp) / np.exp(ws / temp).sum()
        out.append(weights.copy())
    return np.stack(out)


def test_window_mode_equals_the_nash_mtl_code() -> None:
    rng = np.random.default_rng(0)
    losses = (rng.uniform(0.2, 3.0, size=(40, 3)) * np.linspace(2, 0.5, 40)[:, None]).astype(
        np.float32
    )
    expected = _nash_mtl_window_dwa(losses, window=5, temp=2.0)
    dwa = DWA(["a", "b", "c"], mode="window", window=5)
    for step, row in enumerate(losses):
        w = _step(dwa, dict(zip("abc", row.tolist(), strict=True)))
        np.testing.assert_allclose([w["a"], w["b"], w["c"]], expected[step], rtol=1e-5)


def test_window_mode_advances_a_task_only_when_present_and_ignores_epochs() -> None:
    dwa = DWA(["a", "b"], mode="window", window=1)
    # a's buffer [1, 1] -> [1, 2] -> [2, 4]; b's buffer [1, 1] -> [1, 3] (absent in step 1)
    _step(dwa, {"a": 2.0, "b": 3.0})
    dwa.on_epoch_end(0, {"a": 100.0, "b": 1.0})
    _step(dwa, {"a": 4.0})
    w = _step(dwa, {"b": 3.0})  # step 2 > W: b [3, 3] -> r_b = 1; a [2, 4] -> r_a = 2
    ea, eb = math.exp(2.0 / 2), math.exp(1.0 / 2)
    assert w == pytest.approx({"b": 2 * eb / (ea + eb)})


# -- TorchJD oracle ---------------------------------------------------------------------


def _torchjd_weights(scalarizer: TorchJDDWA, values: Sequence[float]) -> list[float]:
    x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    scalarizer(x).backward()
    assert x.grad is not None
    return x.grad.tolist()


def test_epoch_mode_equals_torchjd_dwa_on_the_same_batches() -> None:
    # TorchJD averages each epoch's batch losses with equal weight and its weights sum to K,
    # like polytask; with equal batch sizes the trainer's mean is the same number.
    g = torch.Generator().manual_seed(0)
    oracle = TorchJDDWA(temperature=2.0)
    dwa = DWA(["a", "b", "c"], temperature=2.0)
    for epoch in range(5):
        batches = torch.rand(4, 3, generator=g, dtype=torch.float64) * (3.0 - 0.5 * epoch) + 0.1
        for batch in batches.tolist():
            ours = _step(dwa, dict(zip("abc", batch, strict=True)))
            theirs = _torchjd_weights(oracle, batch)
            assert [ours[t] for t in "abc"] == pytest.approx(theirs, rel=1e-6)
        oracle.step()
        dwa.on_epoch_end(epoch, dict(zip("abc", batches.mean(0).tolist(), strict=True)))


def test_state_round_trip_restores_history_and_window_buffers() -> None:
    for mode in ("epoch", "window"):
        dwa = DWA(["a", "b"], mode=mode, window=2)  # type: ignore[arg-type]
        for epoch in range(3):
            for x in (1.0, 0.5, 0.25):
                _step(dwa, {"a": x * (epoch + 1), "b": 1.0 / x})
            dwa.on_epoch_end(epoch, {"a": 1.0 / (epoch + 1), "b": 0.5 + epoch})
        copy = DWA(["a", "b"], mode=mode, window=2)  # type: ignore[arg-type]
        copy.load_state_dict(dwa.state_dict())
        for x in (2.0, 3.0, 0.1):
            assert _step(copy, {"a": x, "b": 1.0}) == _step(dwa, {"a": x, "b": 1.0})
        copy.on_epoch_end(3, {"a": 0.3, "b": 0.7})
        dwa.on_epoch_end(3, {"a": 0.3, "b": 0.7})
        assert _step(copy, {"a": 1.0, "b": 1.0}) == _step(dwa, {"a": 1.0, "b": 1.0})


def test_state_of_another_mode_or_task_set_is_refused() -> None:
    state = DWA(["a", "b"]).state_dict()
    with pytest.raises(ValueError, match="cannot be loaded"):
        DWA(["a", "c"]).load_state_dict(state)
    with pytest.raises((ValueError, RuntimeError)):  # (and the window buffers are missing)
        DWA(["a", "b"], mode="window").load_state_dict(state)


def test_weights_are_detached_copies_on_the_losses_dtype() -> None:
    dwa = DWA(["a", "b"])
    dwa.on_epoch_end(0, {"a": 1.0, "b": 1.0})
    dwa.on_epoch_end(1, {"a": 2.0, "b": 1.0})
    losses: dict[str, Tensor] = {"a": torch.tensor(1.0, dtype=torch.float64)}
    w = dwa.weights(losses)["a"]
    assert w.dtype == torch.float64 and w.shape == () and not w.requires_grad
    before = float(w)
    dwa.on_epoch_end(2, {"a": 1.0, "b": 1.0})
    assert float(w) == before
