"""MGDA, UPGrad, Nash-MTL and Aligned-MTL train through the CLI at both levels.

Two epochs of MultiDigits with a few hundred samples and a two-layer CNN; the feature level
is MGDA-UB for MGDA (weights from the gradients with respect to the shared representation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from polytask.cli import main


@pytest.mark.parametrize("level", ["parameter", "feature"])
@pytest.mark.parametrize("name", ["mgda", "upgrad", "nash_mtl", "aligned_mtl"])
def test_method_trains_through_the_cli(name: str, level: str, tmp_path: Path) -> None:
    code = main(
        [
            "train",
            "configs/multidigits.yaml",
            f"balancer.name={name}",
            f"balancer.options.level={level}",
            "train.epochs=2",
            "data.options.n_train=256",
            "data.options.n_val=64",
            "data.options.n_test=64",
            "model.backbone_options.channels=[8,8]",
            "train.progress=false",
            f"output_dir={tmp_path}",
        ]
    )
    assert code == 0
    (run,) = [p.parent for p in tmp_path.rglob("results.json")]
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2
    for epoch in epochs:
        weights = epoch["train"]["weight"]
        assert set(weights) == {"left", "right"}
        assert all(math.isfinite(w) and w >= 0 for w in weights.values()), weights
        assert all(math.isfinite(v) for v in epoch["train"]["loss"].values())
    json.loads((run / "results.json").read_text())
