"""The grid's mean rank: each cell's rank per metric column (direction-aware, ties averaged),
averaged over the columns; checked against SciPy's rankdata."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import rankdata

from polytask.compare import mean_ranks


def _rows(values: dict[str, list[float]], keys: list[str]) -> list[dict[str, object]]:
    return [
        {"cell": cell, **{k: (v, None) for k, v in zip(keys, vals, strict=True)}}
        for cell, vals in values.items()
    ]


def test_hand_computed_case() -> None:
    keys = ["a.acc", "b.err"]
    rows = _rows({"x": [0.9, 0.3], "y": [0.8, 0.1], "z": [0.9, 0.2]}, keys)
    ranks = mean_ranks(rows, [("a", "acc", True), ("b", "err", False)])
    # acc (higher better): x and z tie for 1-2 -> 1.5, y 3; err (lower better): y 1, z 2, x 3
    assert ranks == {"x": (1.5 + 3) / 2, "y": (3 + 1) / 2, "z": (1.5 + 2) / 2}


@pytest.mark.parametrize("seed", range(20))
def test_against_scipy_rankdata(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_cells, n_cols = int(rng.integers(2, 9)), int(rng.integers(1, 6))
    # few distinct values so ties are common
    table = rng.integers(0, 4, size=(n_cells, n_cols)).astype(float) / 4
    higher = rng.random(n_cols) < 0.5
    keys = [f"t{j}.m" for j in range(n_cols)]
    rows = _rows({f"c{i}": list(table[i]) for i in range(n_cells)}, keys)
    ranks = mean_ranks(rows, [(f"t{j}", "m", bool(higher[j])) for j in range(n_cols)])
    oracle = np.mean(
        [rankdata(-table[:, j] if higher[j] else table[:, j]) for j in range(n_cols)], axis=0
    )
    assert [ranks[f"c{i}"] for i in range(n_cells)] == pytest.approx(list(oracle))


def test_nan_ranks_last() -> None:
    rows = _rows({"x": [math.nan], "y": [0.1], "z": [0.5]}, ["a.acc"])
    assert mean_ranks(rows, [("a", "acc", True)]) == {"x": 3.0, "y": 2.0, "z": 1.0}
