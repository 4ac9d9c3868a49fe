"""Data that lies (NaN or inf, class labels out of range, wrong dtypes and shapes) in any split
stops the run at the first batch that shows it: exit 2, one line naming the task, the split,
the sample (or batch) and the value; the run directory is left resumable (it has a checkpoint,
the message says so and resume checks the data again) or clearly failed (no checkpoint, the
message says to train again). A validation score that is NaN never leaves a run without
results.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # imported by the optimizers: once here, not in every fork
import yaml
from cli_harness import assert_refused, run_cli, snapshot

import polytask.report
from polytask.data.checks import check_batch
from polytask.errors import DataError
from polytask.tasks import Task
from polytask.training.checkpoint import load_checkpoint

PLUGIN = Path(__file__).with_name("faulty_table.py")
RECIPE: dict[str, Any] = {
    "name": "lying",
    "seed": 0,
    "plugins": ["faulty_table"],
    "data": {"name": "faulty_table", "batch_size": 16},
    "model": {"architecture": "hps", "backbone": "mlp", "backbone_options": {"hidden": [8]}},
    "train": {"epochs": 1, "progress": False},
}
ALL = "'label', 'value', 'tags'"

# (name, fault without its split, fragments of the message besides the split)
FAULTS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("input-nan", {"field": "input", "index": 5, "value": "nan"}, ["sample 5", "nan", ALL]),
    ("input-inf", {"field": "input", "index": 9, "value": "inf"}, ["sample 9", "inf", ALL]),
    ("input-neg-inf", {"field": "input", "index": 0, "value": "-inf"}, ["sample 0", "-inf"]),
    ("input-int", {"field": "input", "dtype": "int64"}, ["torch.int64", "floating-point"]),
    ("input-shape", {"field": "input", "shape": [3]}, ["(3,)", "input_shape (6,)"]),
    ("regression-nan", {"field": "value", "index": 7, "value": "nan"}, ["'value'", "sample 7"]),
    ("regression-inf", {"field": "value", "index": 2, "value": "inf"}, ["'value'", "inf"]),
    ("regression-int", {"field": "value", "dtype": "int64"}, ["'value'", "torch.int64"]),
    ("regression-shape", {"field": "value", "shape": [2]}, ["'value'", "2 value(s)"]),
    ("class-10", {"field": "label", "index": 3, "value": 10}, ["'label'", "sample 3", "10"]),
    ("class-neg-5", {"field": "label", "index": 11, "value": -5}, ["sample 11", "label -5"]),
    ("class-3-of-3", {"field": "label", "index": 1, "value": 3}, ["label 3", "labels 0 to 2"]),
    ("class-float", {"field": "label", "dtype": "float32"}, ["'label'", "torch.float32"]),
    ("class-shape", {"field": "label", "shape": [2]}, ["'label'", "one class index"]),
    ("multilabel-2", {"field": "tags", "index": 4, "value": 2}, ["'tags'", "sample 4", "2.0"]),
    ("multilabel-neg", {"field": "tags", "index": 6, "value": -1}, ["sample 6", "-1.0"]),
    ("multilabel-nan", {"field": "tags", "index": 8, "value": "nan"}, ["'tags'", "nan"]),
    ("multilabel-shape", {"field": "tags", "shape": [3]}, ["'tags'", "3 value(s)"]),
]
CASES = [
    pytest.param(split, fault, fragments, id=f"{split}-{name}")
    for split in ("train", "val", "test")
    for name, fault, fragments in FAULTS
]


def _no_report(run: Any) -> None:
    """The run report (figures: seconds per run) is not what these tests look at."""


@pytest.fixture(autouse=True)
def _fast_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(polytask.report, "write_run_report", _no_report)


def _recipe(root: Path, **train: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(PLUGIN, root / PLUGIN.name)
    recipe = json.loads(json.dumps(RECIPE))
    recipe["output_dir"] = str(root / "runs")
    recipe["train"].update(train)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _fault(split: str, fault: dict[str, Any]) -> str:
    return "data.options.fault=" + json.dumps({"split": split, **fault})


@pytest.mark.parametrize(("split", "fault", "fragments"), CASES)
def test_lying_data_stops_the_run_with_one_line(
    tmp_path: Path, split: str, fault: dict[str, Any], fragments: list[str]
) -> None:
    # two epochs with step checkpoints: a val or test fault finds a checkpoint written
    recipe = _recipe(tmp_path, epochs=2, checkpoint_every_steps=4)
    run = tmp_path / "run"
    result = run_cli("train", recipe, _fault(split, fault), "--quiet", "--run-dir", run)
    where = "epoch 1, step" if split == "train" else "evaluation batch"
    message = assert_refused(result, "bad data", f"{split} split", where, *fragments)
    assert not (run / "results.json").exists()
    last = run / "checkpoints" / "last.pt"
    if not last.exists():
        # a training batch before the first checkpoint (step 4) showed it: clearly failed
        assert split == "train"
        assert "cannot be resumed" in message and "polytask train" in message
    else:
        # resumable: val after epoch 1's steps (a step checkpoint), test after the last
        # epoch, train after a step checkpoint
        state = load_checkpoint(last)
        if split != "train":
            expected = (0, 4) if split == "val" else (2, 0)
            assert (state["epoch"], state["step_in_epoch"]) == expected
        assert f"`polytask resume {run}`" in message
    # the run directory stays consistent: resume refuses the same way and changes nothing
    before = snapshot(run / "checkpoints")
    again = run_cli("resume", run, "--quiet")
    if not last.exists():
        assert_refused(again, "no checkpoint yet")
    else:
        assert_refused(again, "bad data", f"{split} split", *fragments)
    assert snapshot(run / "checkpoints") == before


def test_eval_of_a_lying_split_is_refused(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    run = tmp_path / "run"
    fault = {"field": "label", "index": 2, "value": 7}
    # the fault is only in test; training and selection on val go through
    done = run_cli("train", recipe, _fault("test", fault), "--quiet", "--run-dir", run)
    assert_refused(done, "test split", "sample 2", "label 7")
    result = run_cli("eval", run, "--split", "test", "--checkpoint", "last")
    assert_refused(result, "'label'", "test split", "sample 2", "label 7")
    assert run_cli("eval", run, "--split", "val", "--checkpoint", "last").code == 0


def test_a_nan_validation_score_still_gives_results_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polytask.training.trainer import Trainer

    monkeypatch.setattr(Trainer, "_score", lambda self, result: (math.nan, True))
    recipe = _recipe(tmp_path, epochs=2)
    run = tmp_path / "run"
    result = run_cli("train", recipe, "--run-dir", run)
    assert result.code == 0, result.err
    assert "selection score" in result.err and "cannot be chosen" in result.err
    results = json.loads((run / "results.json").read_text())
    assert results["selection"]["epoch"] == 1
    assert "no epoch had a finite selection score" in results["selection"]["note"]
    assert not (run / "checkpoints" / "best.pt").exists()


# -- the check itself, without a run ---------------------------------------------------------


def _task(kind: str, output_dim: int) -> Task:
    from polytask.losses import CrossEntropyLoss, MSELoss
    from polytask.metrics import RegressionMetric

    loss = CrossEntropyLoss() if kind in ("classification", "segmentation") else MSELoss()
    return Task("t", loss, {"r": RegressionMetric}, output_dim, kind=kind)


def _check(kind: str, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    batch: dict[str, Any] = {"input": torch.zeros(len(target), 2), "targets": {"t": target}}
    if mask is not None:
        batch["mask"] = {"t": mask}
    check_batch(batch, {"t": _task(kind, 3)}, split="train", where="here", indices=[10, 11, 12])


def test_ignore_index_and_masked_fillers_pass() -> None:
    _check("classification", torch.tensor([0, -1, 2]))
    _check("segmentation", torch.tensor([[[0, -1]], [[2, 1]], [[-1, -1]]]))
    filler = torch.tensor([[1.0, 2.0, 3.0], [math.nan] * 3, [0.0, 0.0, 0.0]])
    _check("regression", filler, mask=torch.tensor([True, False, True]))
    with pytest.raises(DataError, match="sample 11 has the target value nan"):
        _check("regression", filler)
    with pytest.raises(DataError, match="sample 12 has the class label -2"):
        _check("classification", torch.tensor([0, 5, -2]), mask=torch.tensor([True, False, True]))
    with pytest.raises(DataError, match=r"pixel, shape \(batch, height, width\)"):
        _check("segmentation", torch.tensor([0, 1, 2]))
