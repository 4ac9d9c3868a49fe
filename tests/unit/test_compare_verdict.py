"""The grid's verdict: whether the best cell beats the baseline cell beyond the seed spread."""

from __future__ import annotations

from typing import Any

from polytask.compare import verdict_sentence


def _rows(**cells: tuple[float, float | None]) -> list[dict[str, Any]]:
    return [{"cell": c, "seeds": 3, "delta_m": dm} for c, dm in cells.items()]


def test_clear_win_in_the_lower_is_better_convention() -> None:
    text = verdict_sentence(
        _rows(stl=(0.0, 0.5), hps=(1.0, 0.2), mtan=(-2.5, 0.4)), "stl", "metric_mean"
    )
    assert text is not None
    assert text.startswith("The best cell, 'mtan' (Δm = -2.50 % ± 0.40 over 3 seeds), beats 'stl'")


def test_ahead_within_the_spread_is_not_a_win() -> None:
    text = verdict_sentence(_rows(stl=(0.0, 0.5), hps=(-0.3, 0.6)), "stl", "metric_mean")
    assert text is not None
    assert "no cell clearly beats it" in text


def test_no_cell_better() -> None:
    text = verdict_sentence(
        _rows(stl=(0.0, 0.5), hps=(1.5, 0.6), x=(0.7, 0.1)), "stl", "metric_mean"
    )
    assert (
        text
        == "No cell beats 'stl' on this data: the best, 'x', has Δm = +0.70 % ± 0.10 over 3 seeds."
    )


def test_higher_is_better_convention() -> None:
    text = verdict_sentence(_rows(stl=(0.0, None), hps=(0.02, 0.01)), "stl", "task_mean")
    assert text is not None
    assert "'hps' (Δm = +0.02 ± 0.01 over 3 seeds), beats 'stl'" in text


def test_without_baseline_or_other_cells() -> None:
    assert verdict_sentence(_rows(stl=(0.0, 0.1)), "stl", "metric_mean") is None
    assert verdict_sentence(_rows(stl=(0.0, 0.1), hps=(1.0, 0.1)), None, "metric_mean") is None
