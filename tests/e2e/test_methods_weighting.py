"""Every loss-weighting method through the command line and the trainer, on MultiDigits.

Also: DWA's logged per-epoch weights follow the paper's formula from the logged train losses,
every method runs with missing labels, and stateful methods resume exactly after a crash.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from helpers import tiny_config_dict
from polytask.api import resume, train
from polytask.cli import main
from polytask.training.checkpoint import load_checkpoint
from polytask.training.trainer import StepEnd

METHODS = ["dwa", "uncertainty", "rlw", "gls", "famo"]


def _cli_train(tmp_path: Path, *overrides: str) -> list[dict[str, Any]]:
    code = main(
        [
            "train",
            "configs/multidigits.yaml",
            *overrides,
            "train.epochs=3",
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


@pytest.mark.parametrize("name", METHODS)
def test_train_through_the_cli(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    records = _cli_train(tmp_path, f"balancer.name={name}")
    capsys.readouterr()
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for record in records:
        weights = record["train"]["weight"]
        assert set(weights) == {"left", "right"}
        assert all(math.isfinite(w) and w > 0 for w in weights.values())
        if name in ("rlw", "famo"):  # weights on the simplex: their epoch means too
            assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
    if name != "dwa":
        return
    # the first two epochs have weight 1; the third follows from the logged epoch means
    assert [r["train"]["weight"] for r in records[:2]] == [{"left": 1.0, "right": 1.0}] * 2
    losses = [r["train"]["loss"] for r in records]
    ratio = {t: losses[1][t] / losses[0][t] for t in ("left", "right")}
    denominator = sum(math.exp(r / 2) for r in ratio.values())
    expected = {t: 2 * math.exp(r / 2) / denominator for t, r in ratio.items()}
    assert records[2]["train"]["weight"] == pytest.approx(expected, rel=1e-6)
    assert expected["left"] != pytest.approx(1.0, abs=1e-7)


def _config(tmp_path: Path, balancer: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return tiny_config_dict(
        tmp_path / "runs",
        **{
            "balancer": balancer,
            "train.epochs": 2,
            "data.batch_size": 16,
            "data.options.n_train": 64,  # 4 steps per epoch
            "data.options.n_val": 32,
            "data.options.n_test": 32,
            # the sum task and few labels for "right": batches without some tasks
            "data.options.with_sum": True,
            "data.options.label_fraction": {"right": 0.1, "sum": 0.5},
            **overrides,
        },
    )


@pytest.mark.parametrize(
    "balancer",
    [
        {"name": "dwa", "options": {"mode": "window", "window": 2}},
        {"name": "rlw", "options": {"distribution": "dirichlet", "seed": 3}},
        {"name": "famo"},
    ],
    ids=["dwa-window", "rlw", "famo"],
)
def test_missing_labels_and_exact_resume_after_a_crash(
    tmp_path: Path, balancer: dict[str, Any]
) -> None:
    config = _config(tmp_path, balancer, **{"train.checkpoint_every_steps": 3})
    subsets: list[tuple[str, ...]] = []
    _, full = train(
        config,
        run_dir=tmp_path / "full",
        step_callbacks=[lambda info: subsets.append(tuple(info.weights))],
        console=False,
    )
    assert ("left", "sum") in subsets or ("left",) in subsets  # steps without "right"
    assert len(set(subsets)) > 1

    class Crash(Exception):
        pass

    def crash(info: StepEnd) -> None:
        if info.global_step == 6:  # the 7th step; the last checkpoint is mid-epoch 2
            raise Crash

    with pytest.raises(Crash):
        train(config, run_dir=tmp_path / "crashed", step_callbacks=[crash], console=False)
    last = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "last.pt")
    assert (last["epoch"], last["step_in_epoch"]) == (1, 2)
    resumed = resume(tmp_path / "crashed", console=False)
    assert resumed["test"] == full["test"]
    assert resumed["val"] == full["val"]

    def records(run: str) -> list[dict[str, Any]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in lines]

    assert records("crashed") == records("full")
