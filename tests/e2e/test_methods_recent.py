"""Every balancing method without a CLI test of its own trains through the CLI.

One epoch of MultiDigits with a few hundred samples and a two-layer CNN, at each level the
method offers; the run writes finite weights and losses for both tasks, and its results. The
methods' arithmetic is checked against independent computations in tests/unit/balancing;
here the point is that each one plugs into the trainer (options, state in checkpoints,
reports) from a configuration.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from polytask.balancing import BALANCERS
from polytask.cli import main

# methods whose CLI runs are tested elsewhere (test_methods_exact, _projection, _weighting)
ELSEWHERE = {
    "mgda",
    "upgrad",
    "nash_mtl",
    "aligned_mtl",
    "pcgrad",
    "graddrop",
    "gradvac",
    "cagrad",
    "imtl_g",
    "gradnorm",
    "dwa",
    "uncertainty",
    "rlw",
    "gls",
    "famo",
    "equal",
}
# loss weightings (no `level` option) and the methods that need parameter gradients
NO_LEVEL = {"fixed", "stch", "auto_lambda", "ldc_mtl", "consmtl"}
PARAMETER_ONLY = NO_LEVEL | {"modo", "sdmgrad", "samo"}
OPTIONS = {
    "fixed": ["balancer.options.weights={left: 0.3, right: 0.7}"],
    "samo": ["balancer.options.method=mgda", "balancer.options.rho=0.05"],
    "krum": ["balancer.options.n_byzantine=0"],
}
CASES = [
    (name, level)
    for name in BALANCERS.names()
    if name not in ELSEWHERE
    for level in (["parameter"] if name in PARAMETER_ONLY else ["parameter", "feature"])
]


def test_every_registered_method_is_covered() -> None:
    """A method registered later gets a CLI run here unless another test file has one."""
    assert {name for name, _ in CASES} | ELSEWHERE == set(BALANCERS.names())


@pytest.mark.parametrize("name, level", CASES)
def test_method_trains_through_the_cli(
    name: str, level: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polytask.report

    # the run reports are checked by the report tests; here they would only cost time
    monkeypatch.setattr(polytask.report, "write_run_report", lambda run: None)
    level_option = [] if name in NO_LEVEL else [f"balancer.options.level={level}"]
    code = main(
        [
            "train",
            "configs/multidigits.yaml",
            f"balancer.name={name}",
            *level_option,
            *OPTIONS.get(name, []),
            "train.epochs=1",
            "data.options.n_train=128",
            "data.options.n_val=32",
            "data.options.n_test=32",
            "model.backbone_options.channels=[4,4]",
            "train.progress=false",
            f"output_dir={tmp_path}",
        ]
    )
    assert code == 0
    (run,) = [p.parent for p in tmp_path.rglob("results.json")]
    (epoch,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    weights = epoch["train"]["weight"]
    assert set(weights) == {"left", "right"}
    assert all(math.isfinite(w) for w in weights.values()), weights
    assert all(math.isfinite(v) for v in epoch["train"]["loss"].values())
    results = json.loads((run / "results.json").read_text())
    assert results["test"]
