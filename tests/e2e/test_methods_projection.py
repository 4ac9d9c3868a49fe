"""PCGrad, GradDrop, GradVac, CAGrad, IMTL-G and GradNorm through the command line, at both
gradient levels, on MultiDigits (two tasks, tiny CNN, two epochs)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import polytask.balancing.aggregation.cagrad
import polytask.balancing.aggregation.graddrop
import polytask.balancing.aggregation.gradnorm
import polytask.balancing.aggregation.gradvac
import polytask.balancing.aggregation.imtl
import polytask.balancing.aggregation.pcgrad  # noqa: F401  (registers the methods)
from polytask.cli import main

METHODS = ["pcgrad", "graddrop", "gradvac", "cagrad", "imtl_g", "gradnorm"]
TASKS = {"left", "right"}


def _train(tmp_path: Path, name: str, level: str) -> list[dict[str, Any]]:
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
    (run,) = tmp_path.iterdir()
    assert (run / "results.json").is_file()
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("level", ["parameter", "feature"])
@pytest.mark.parametrize("name", METHODS)
def test_train_through_the_cli(
    tmp_path: Path,
    name: str,
    level: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    records = _train(tmp_path, name, level)
    capsys.readouterr()
    assert [r["epoch"] for r in records] == [0, 1]
    for record in records:
        balancing = record["balancing"]
        assert balancing is not None, "gradient methods log gradient diagnostics"
        norms = balancing["grad_norm"]
        assert set(norms) == TASKS and all(math.isfinite(v) and v > 0 for v in norms.values())
        cosine = balancing["cosine"]
        assert set(cosine) == TASKS
        for t in TASKS:
            assert cosine[t][t] == pytest.approx(1.0, abs=1e-4)
            assert all(-1.0 - 1e-4 <= v <= 1.0 + 1e-4 for v in cosine[t].values())
        weights = record["train"]["weight"]
        assert set(weights) == TASKS and all(math.isfinite(w) for w in weights.values())
        assert all(math.isfinite(v) for v in record["train"]["loss"].values())
    if name == "gradnorm":  # the learnt weights are renormalised to sum to K = 2 every step
        last = records[-1]["train"]["weight"]
        assert sum(last.values()) == pytest.approx(2.0, abs=1e-4)
        assert any(abs(w - 1.0) > 1e-4 for w in last.values())
