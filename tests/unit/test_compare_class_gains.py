"""The per-class analysis of grids and runs: gains over the baseline cell against pixel share."""

from __future__ import annotations

import math
from typing import Any

import pytest
from scipy.stats import spearmanr

from polytask.compare import _spearman, class_gains
from polytask.report.run_report import class_table
from polytask.training.trainer import _mean_results


def _run(iou: list[float | None], pixels: list[int]) -> dict[str, Any]:
    return {
        "classes": {"semantic": {"names": ["a", "b", "c", "d"], "train_pixels": pixels}},
        "test": {"metrics": {}, "details": {"semantic": {"iou": iou}}},
        "val": {"metrics": {}},
    }


PIXELS = [700, 10, 250, 40]  # shares 70, 1, 25, 4 %


def test_gains_are_cell_mean_minus_baseline_mean_sorted_by_share() -> None:
    runs = {
        "single": [_run([80.0, 10.0, 50.0, 20.0], PIXELS), _run([82.0, 14.0, 52.0, None], PIXELS)],
        "mtl": [_run([81.0, 30.0, 52.0, 30.0], PIXELS), _run([81.0, 34.0, 50.0, 34.0], PIXELS)],
    }
    result = class_gains(runs, "single")
    assert result is not None
    assert result["classes"] == ["b", "d", "c", "a"]
    assert result["train_pixel_share"] == pytest.approx([1.0, 4.0, 25.0, 70.0])
    # baseline means skip the undefined IoU: class d is 20 (one seed), not 10
    assert result["baseline_iou"] == pytest.approx([12.0, 20.0, 51.0, 81.0])
    assert result["gain"]["mtl"] == pytest.approx([20.0, 12.0, 0.0, 0.0])
    assert result["spearman"]["mtl"] == pytest.approx(
        spearmanr([1.0, 4.0, 25.0, 70.0], [20.0, 12.0, 0.0, 0.0]).statistic
    )
    assert "Spearman" in result["table"] and "b" in result["table"]


def test_classes_learned_by_neither_are_left_out_of_the_correlation() -> None:
    runs = {
        "single": [_run([80.0, 0.0, 50.0, 20.0], PIXELS)],
        "mtl": [_run([70.0, 0.0, 60.0, 10.0], PIXELS)],
    }
    result = class_gains(runs, "single")
    assert result is not None
    assert result["gain"]["mtl"] == pytest.approx([0.0, -10.0, 10.0, -10.0])  # b, d, c, a
    # b (IoU 0 in both) is out: the correlation is over d, c, a only
    assert result["spearman"]["mtl"] == pytest.approx(
        spearmanr([4.0, 25.0, 70.0], [-10.0, 10.0, -10.0]).statistic
    )


def test_no_per_class_results_no_table() -> None:
    plain = {"test": {"metrics": {}}, "val": {"metrics": {}}}
    assert class_gains({"single": [plain], "mtl": [plain]}, "single") is None
    assert class_gains({"mtl": [plain]}, "single") is None
    assert class_table(plain) is None


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy_with_ties(seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, 12).astype(float).tolist()
    y = rng.normal(size=12).tolist()
    assert _spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(_spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_run_report_class_table_sorted_by_share() -> None:
    table = class_table(_run([80.0, None, 50.0, 20.0], PIXELS))
    assert table is not None
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [line.split("|")[1].strip() for line in lines] == ["b", "d", "c", "a"]
    assert "| 1.00 " in lines[0] and "| -" in lines[0]  # share, and no IoU for b


def test_mean_last_averages_details_class_by_class() -> None:
    records = [
        {
            "metrics": {"s": {"miou": 10.0}},
            "losses": {"s": 1.0},
            "details": {"s": {"iou": [10.0, None, 4.0]}},
        },
        {
            "metrics": {"s": {"miou": 20.0}},
            "losses": {"s": 3.0},
            "details": {"s": {"iou": [30.0, None, None]}},
        },
    ]
    mean = _mean_results(records)
    assert mean["metrics"] == {"s": {"miou": 15.0}} and mean["losses"] == {"s": 2.0}
    assert mean["details"] == {"s": {"iou": [20.0, None, 4.0]}}
    assert "details" not in _mean_results([{"metrics": {}, "losses": {}}])


def test_run_report_class_table_of_a_classification_task_in_class_order() -> None:
    details = {"class_accuracy": [50.0, None, 100.0], "samples": [4.0, 0.0, 2.0]}
    results = {
        "tasks": ["kind"],
        "test": {"metrics": {"kind": {"accuracy": 66.7}}, "details": {"kind": details}},
        "val": {"metrics": {"kind": {"accuracy": 50.0}}, "details": {"kind": details}},
        "classes": {"kind": {"names": ["cat", "dog", "eel"]}},
    }
    table = class_table(results)
    assert table is not None and "recall" in table
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    assert cells == [["cat", "4", "50", "50"], ["dog", "0", "-", "-"], ["eel", "2", "100", "100"]]
