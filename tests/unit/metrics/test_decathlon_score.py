"""The decathlon score (Rebuffi et al., 2017) on hand-computed cases."""

from __future__ import annotations

import doctest

import pytest

import polytask.metrics.decathlon as dec
from polytask.errors import ConfigError
from polytask.metrics import Baseline, decathlon_score


def baseline(**accuracies: float) -> Baseline:
    return Baseline(
        values={t: {"accuracy": a, "loss": 1.0} for t, a in accuracies.items()},
        higher_is_better={t: {"accuracy": True, "loss": False} for t in accuracies},
        source="hand-written",
    )


def test_hand_computed_three_tasks() -> None:
    base = baseline(mnist=98.0, fashion=85.0, digits=96.0)
    # mnist: E 1 vs E_max 4 -> 1000 * (3/4)^2 = 562.5
    # fashion: E 20 vs E_max 30 -> 1000 * (10/30)^2 = 111.111...
    # digits: E 10 vs E_max 8 -> 0 (worse than twice the baseline's error)
    results = {
        "mnist": {"accuracy": 99.0},
        "fashion": {"accuracy": 80.0},
        "digits": {"accuracy": 90.0, "loss": 0.3},
    }
    assert decathlon_score(results, base) == pytest.approx(562.5 + 1000 / 9, rel=1e-12)


def test_baseline_scores_250_per_task_and_perfect_1000() -> None:
    base = baseline(a=91.0, b=60.0, c=100.0)
    same = {t: {"accuracy": v["accuracy"]} for t, v in base.values.items()}
    # c has a perfect baseline: the limit of the formula gives 1000 for a perfect result
    assert decathlon_score(same, base) == pytest.approx(250.0 + 250.0 + 1000.0)
    perfect = {t: {"accuracy": 100.0} for t in base.values}
    assert decathlon_score(perfect, base) == pytest.approx(3000.0)
    worse = {"a": {"accuracy": 82.0}, "b": {"accuracy": 0.0}, "c": {"accuracy": 99.9}}
    assert decathlon_score(worse, base) == 0.0


def test_error_metrics_and_options() -> None:
    base = Baseline(
        values={"t": {"error": 10.0}},
        higher_is_better={"t": {"error": False}},
        source="hand-written",
    )
    assert decathlon_score({"t": {"error": 5.0}}, base, metric="error") == pytest.approx(562.5)
    # gamma 1 and 100 points: 100 * (15 / 20)
    assert decathlon_score(
        {"t": {"error": 5.0}}, base, metric="error", gamma=1.0, points=100.0
    ) == pytest.approx(75.0)
    assert dec.task_points(5.0, 10.0) == pytest.approx(562.5)
    assert dec.task_points(0.0, 0.0) == 1000.0 and dec.task_points(0.1, 0.0) == 0.0


def test_unit_free() -> None:
    """Errors as fractions or as percent give the same points."""
    assert dec.task_points(0.05, 0.1) == pytest.approx(dec.task_points(5.0, 10.0))


@pytest.mark.parametrize(
    ("results", "fragment"),
    [
        ({"a": {"accuracy": 90.0}}, "no task 'b'"),
        ({"a": {"accuracy": 90.0}, "b": {"loss": 1.0}}, "b.accuracy"),
        ({"a": {"accuracy": 190.0}, "b": {"accuracy": 1.0}}, "[0, 100]"),
        ({"a": {"accuracy": float("nan")}, "b": {"accuracy": 1.0}}, "[0, 100]"),
    ],
)
def test_errors(results: dict[str, dict[str, float]], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        decathlon_score(results, baseline(a=90.0, b=80.0))
    assert fragment in str(info.value)


def test_a_baseline_without_the_metric() -> None:
    with pytest.raises(ConfigError, match="'top1'"):
        decathlon_score({"a": {"accuracy": 1.0}}, baseline(a=90.0), metric="top1")


def test_docstring_example() -> None:
    assert doctest.testmod(dec, raise_on_error=True).attempted >= 1
