"""Bad input through the real command line: one message, exit code 2, nothing overwritten.

Every test feeds ``polytask`` one kind of mistake and checks the contract of
:mod:`polytask.cli`: exit code 2, exactly one ``polytask: error:`` line naming the key, value,
allowed values or path, no traceback, and no file that existed before changed (content and
modification time). Most cases call :func:`polytask.cli.main` in-process for speed; a few run
``python -m polytask`` as a real subprocess to prove the exit code and stderr end to end.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from helpers import PREFIX, assert_error, cli, snapshot
from polytask.balancing import BALANCERS
from polytask.cli import main
from polytask.data import DATASETS
from polytask.models import ARCHITECTURES, BACKBONES

#: A recipe that trains in well under a second on the CPU.
TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {
        "name": "multidigits",
        "options": {"n_train": 64, "n_val": 32, "n_test": 32},
        "batch_size": 32,
    },
    "model": {
        "architecture": "hps",
        "backbone": "small_cnn",
        "backbone_options": {"channels": [8], "out_features": 16},
    },
    "train": {"epochs": 1, "progress": False, "device": "cpu"},
}


# -- helpers ------------------------------------------------------------------------------


def assert_preserved(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Nothing that existed before was removed or changed."""
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"modified or removed: {changed}"


def assert_nothing_new(before: dict[str, Any], after: dict[str, Any]) -> None:
    created = sorted(set(after) - set(before))
    assert not created, f"created: {created}"


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def copy_run(src: Path, dest: Path) -> Path:
    """A copy of a run directory (with the original modification times)."""
    shutil.copytree(src, dest)
    return dest


class CodePayload:
    """Unpickling this object runs ``exec(code)``, which writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('pwned')"

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


def write_payload_checkpoint(path: Path, marker: Path) -> None:
    """A file shaped like a polytask checkpoint whose ``model`` entry runs code when unpickled."""
    torch.save({"format": "polytask-checkpoint-v1", "model": CodePayload(marker)}, path)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_yaml(tmp_path_factory.mktemp("recipe") / "tiny.yaml", TINY_RECIPE)


def _train(recipe: Path, run_dir: Path, *overrides: str) -> Path:
    code = main(["train", str(recipe), *overrides, "--run-dir", str(run_dir), "--quiet"])
    assert code == 0
    assert (run_dir / "results.json").is_file()
    return run_dir


@pytest.fixture(scope="module")
def finished_run(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run (backbone channels [8])."""
    return _train(recipe, tmp_path_factory.mktemp("finished") / "run")


@pytest.fixture(scope="module")
def other_model_run(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of another model: the same recipe with a narrower backbone."""
    return _train(
        recipe, tmp_path_factory.mktemp("other") / "run", "model.backbone_options.channels=[4]"
    )


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    """An output directory that already holds an earlier run, which must stay untouched."""
    earlier = tmp_path / "runs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("name: earlier\n", encoding="utf-8")
    return tmp_path / "runs"


# -- train: configuration keys, values and names -------------------------------------------


def _known(registry: Any, kind: str) -> str:
    return f"Known {kind}s: {', '.join(registry.names())}."


TRAIN_ERRORS = [
    pytest.param(
        ["trian.epochs=3"],
        ["unknown key 'trian'", "Did you mean 'train'?", "Allowed keys", "output_dir"],
        id="unknown-top-level-key",
    ),
    pytest.param(
        ["train.epoks=3"],
        ["unknown key 'train.epoks'", "Did you mean 'epochs'?", "Allowed keys in train"],
        id="unknown-nested-key",
    ),
    pytest.param(
        ["optim.scheduler.nmae=step"],
        ["unknown key 'optim.scheduler.nmae'", "Did you mean 'name'?", "milestones"],
        id="unknown-deeply-nested-key",
    ),
    pytest.param(
        ["train.epochs=abc"],
        ["train.epochs", "expected an integer", "'abc'"],
        id="wrong-type-int",
    ),
    pytest.param(
        ["train.progress=sometimes"],
        ["train.progress", "true or false", "'sometimes'"],
        id="wrong-type-bool",
    ),
    pytest.param(
        ["model.backbone_options=[8]"],
        ["model.backbone_options", "expected a mapping"],
        id="wrong-type-mapping",
    ),
    pytest.param(
        ["optim.name=adamm"],
        ["optim.name", "adam, adamw, sgd", "'adamm'", "Did you mean 'adam'?"],
        id="wrong-choice",
    ),
    pytest.param(
        ["train.epochs=0"],
        ["train.epochs", "expected a value >= 1", "found 0"],
        id="out-of-range-ge",
    ),
    pytest.param(
        ["optim.lr=-0.1"],
        ["optim.lr", "expected a value > 0", "-0.1"],
        id="out-of-range-gt",
    ),
    pytest.param(
        ["optim.momentum=1.5"],
        ["optim.momentum", "expected a value <= 1", "1.5"],
        id="out-of-range-le",
    ),
    pytest.param(
        ["data.options.n_train=0"],
        ["n_train", ">= 1", "found 0"],
        id="out-of-range-data-option",
    ),
    pytest.param(
        ["train.epochs"],
        ["'train.epochs'", "KEY=VALUE"],
        id="override-without-equals",
    ),
    pytest.param(
        ["seed.value=1"],
        ["seed.value", "'seed' is not a mapping"],
        id="override-into-a-scalar",
    ),
    pytest.param(
        ["model.architecture=hsp"],
        [
            "unknown architecture 'hsp'",
            "Did you mean 'hps'?",
            _known(ARCHITECTURES, "architecture"),
        ],
        id="unknown-architecture",
    ),
    pytest.param(
        ["model.backbone=resnet9000"],
        ["unknown backbone 'resnet9000'", _known(BACKBONES, "backbone")],
        id="unknown-backbone",
    ),
    pytest.param(
        ["balancer.name=eqal"],
        [
            "unknown balancing method 'eqal'",
            "Did you mean 'equal'?",
            _known(BALANCERS, "balancing method"),
        ],
        id="unknown-balancing-method",
    ),
    pytest.param(
        ["data.name=mnist"],
        ["unknown dataset 'mnist'", _known(DATASETS, "dataset")],
        id="unknown-dataset",
    ),
    pytest.param(
        ["model.options.depth=3"],
        ["unknown option model.options.depth", "Accepted options"],
        id="unknown-model-option",
    ),
    pytest.param(
        ["data.options.n_trian=5"],
        ["unknown option data.options.n_trian", "Did you mean 'n_train'?", "n_val, n_test"],
        id="unknown-data-option",
    ),
    pytest.param(
        ["balancer.options.temperature=2"],
        ["unknown option balancer.options.temperature", "Accepted options"],
        id="unknown-balancer-option",
    ),
    pytest.param(
        ["model.backbone_options.chanels=[4]"],
        [
            "unknown option model.backbone_options.chanels",
            "Did you mean 'channels'?",
            "channels, out_features",
        ],
        id="unknown-backbone-option",
    ),
    pytest.param(
        ["tasks=[left,middle]"],
        ["unknown task 'middle'", "left, right"],
        id="unknown-task",
    ),
    pytest.param(
        ["train.precision=fp16", "train.device=cpu"],
        ["train.precision=fp16", "CUDA", "bf16 or fp32"],
        id="fp16-on-cpu",
    ),
    pytest.param(
        ["train.device=tpu"],
        ["train.device", "'tpu'", "auto, cpu, cuda or cuda:N"],
        id="unknown-device",
    ),
    pytest.param(
        ["train.selection.metric=delta_m"],
        ["train.selection.metric=delta_m", "eval.baseline"],
        id="delta-m-selection-without-baseline",
    ),
]


@pytest.mark.parametrize(("overrides", "fragments"), TRAIN_ERRORS)
def test_train_rejects_bad_config(
    capsys: pytest.CaptureFixture[str],
    recipe: Path,
    output_dir: Path,
    overrides: list[str],
    fragments: list[str],
) -> None:
    before = snapshot(output_dir)
    code, out, err = cli(capsys, "train", recipe, f"output_dir={output_dir}", *overrides)
    assert_error(code, err, *fragments)
    assert out == ""
    after = snapshot(output_dir)
    assert_preserved(before, after)
    assert_nothing_new(before, after)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_rejects_cuda_without_cuda(
    capsys: pytest.CaptureFixture[str], recipe: Path, output_dir: Path
) -> None:
    before = snapshot(output_dir)
    code, _, err = cli(capsys, "train", recipe, f"output_dir={output_dir}", "train.device=cuda")
    assert_error(code, err, "train.device is cuda", "no CUDA device", "use cpu or auto")
    assert snapshot(output_dir) == before


def test_train_unknown_key_in_recipe_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, output_dir: Path
) -> None:
    bad = {**TINY_RECIPE, "train": {"epoch": 1}, "output_dir": str(output_dir)}
    path = write_yaml(tmp_path / "bad.yaml", bad)
    before = snapshot(output_dir)
    code, _, err = cli(capsys, "train", path)
    assert_error(code, err, "unknown key 'train.epoch'", "Did you mean 'epochs'?")
    assert snapshot(output_dir) == before


SELECTION_ERRORS = [
    pytest.param(
        "train.selection.metric=left.acc",
        ["train.selection.metric 'left.acc'", "task 'left' has the values accuracy"],
        id="unknown-metric-value",
    ),
    pytest.param(
        "train.selection.metric=middle.accuracy",
        ["unknown task 'middle'", "loss, delta_m or TASK.VALUE", "left, right"],
        id="unknown-metric-task",
    ),
]


@pytest.mark.parametrize(("override", "fragments"), SELECTION_ERRORS)
def test_train_rejects_unknown_selection_metric(
    capsys: pytest.CaptureFixture[str],
    recipe: Path,
    output_dir: Path,
    override: str,
    fragments: list[str],
) -> None:
    before = snapshot(output_dir)
    code, _, err = cli(capsys, "train", recipe, f"output_dir={output_dir}", override)
    assert_error(code, err, *fragments)
    assert_preserved(before, snapshot(output_dir))


def test_train_bad_selection_metric_leaves_no_run_directory(
    capsys: pytest.CaptureFixture[str], recipe: Path, output_dir: Path
) -> None:
    before = snapshot(output_dir)
    code, _, err = cli(
        capsys, "train", recipe, f"output_dir={output_dir}", "train.selection.metric=left.acc"
    )
    assert_error(code, err, "train.selection.metric")
    assert snapshot(output_dir) == before


# -- train: recipe files, baselines and run directories ------------------------------------


def test_train_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    code, _, err = cli(capsys, "train", missing)
    assert_error(code, err, "config file not found", str(missing))
    assert list(tmp_path.iterdir()) == []


def test_train_malformed_yaml(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  epochs: [1\nmodel: {\n", encoding="utf-8")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "train", path)
    assert_error(code, err, str(path), "not valid YAML")
    assert snapshot(tmp_path) == before


def test_train_yaml_that_is_not_a_mapping(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- model\n", encoding="utf-8")
    code, _, err = cli(capsys, "train", path)
    assert_error(code, err, str(path), "expected a mapping at the top level", "list")


def test_train_baseline_file_missing(
    capsys: pytest.CaptureFixture[str], recipe: Path, output_dir: Path
) -> None:
    missing = output_dir.parent / "baseline.json"
    before = snapshot(output_dir)
    code, _, err = cli(
        capsys, "train", recipe, f"output_dir={output_dir}", f"eval.baseline={missing}"
    )
    assert_error(code, err, str(missing), "does not exist")
    assert snapshot(output_dir) == before


def test_train_baseline_file_malformed(
    capsys: pytest.CaptureFixture[str], recipe: Path, output_dir: Path
) -> None:
    bad = output_dir.parent / "baseline.json"
    bad.write_text('{"source": "x", "values": {', encoding="utf-8")
    before = snapshot(output_dir.parent)
    code, _, err = cli(capsys, "train", recipe, f"output_dir={output_dir}", f"eval.baseline={bad}")
    assert_error(code, err, str(bad), "not valid JSON")
    assert snapshot(output_dir.parent) == before


def test_train_baseline_name_unknown(
    capsys: pytest.CaptureFixture[str], recipe: Path, output_dir: Path
) -> None:
    before = snapshot(output_dir)
    code, _, err = cli(
        capsys, "train", recipe, f"output_dir={output_dir}", "eval.baseline=no_such_baseline"
    )
    assert_error(code, err, "eval.baseline", "'no_such_baseline'")
    assert snapshot(output_dir) == before


def test_train_into_existing_nonempty_directory(
    capsys: pytest.CaptureFixture[str], recipe: Path, tmp_path: Path
) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("precious\n", encoding="utf-8")
    before = snapshot(target)
    code, _, err = cli(capsys, "train", recipe, "--run-dir", target)
    assert_error(code, err, str(target), "already exists", "never overwritten", "polytask resume")
    assert snapshot(target) == before


def test_train_into_a_finished_run(
    capsys: pytest.CaptureFixture[str], recipe: Path, finished_run: Path, tmp_path: Path
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    code, _, err = cli(capsys, "train", recipe, "--run-dir", run, "--quiet")
    assert_error(code, err, str(run), "already exists")
    assert snapshot(run) == before


# -- resume ---------------------------------------------------------------------------------


def test_resume_finished_run(
    capsys: pytest.CaptureFixture[str], finished_run: Path, tmp_path: Path
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    code, _, err = cli(capsys, "resume", run)
    assert_error(code, err, str(run), "already finished", "results.json")
    assert snapshot(run) == before


@pytest.mark.parametrize("kind", ["plain-directory", "missing-directory"])
def test_resume_not_a_run(capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str) -> None:
    target = tmp_path / "somewhere"
    if kind == "plain-directory":
        target.mkdir()
        (target / "data.txt").write_text("not a run\n", encoding="utf-8")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "resume", target)
    assert_error(code, err, str(target), "not a polytask run directory", "config.yaml")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("command", "name", "content", "fragment"),
    [
        pytest.param(
            "eval", "config.yaml", "- a\n", "does not hold a configuration mapping", id="eval-list"
        ),
        pytest.param(
            "eval",
            "config.yaml",
            "train: [1\n",
            "YAML",
            id="eval-malformed-config",
        ),
        pytest.param(
            "resume",
            "results.json",
            "{\n",
            "JSON",
            id="resume-malformed-results",
        ),
        pytest.param(
            "report",
            "results.json",
            "{\n",
            "JSON",
            id="report-malformed-results",
        ),
    ],
)
def test_run_directory_with_a_damaged_file(
    capsys: pytest.CaptureFixture[str],
    finished_run: Path,
    tmp_path: Path,
    command: str,
    name: str,
    content: str,
    fragment: str,
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    (run / name).write_text(content, encoding="utf-8")
    before = snapshot(run)
    code, _, err = cli(capsys, command, run, *(["--quiet"] if command == "resume" else []))
    assert_error(code, err, str(run / name), fragment)
    assert snapshot(run) == before


def test_run_directory_with_an_unknown_config_key(
    capsys: pytest.CaptureFixture[str], finished_run: Path, tmp_path: Path
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    config["modle"] = config.pop("model")
    write_yaml(run / "config.yaml", config)
    before = snapshot(run)
    code, _, err = cli(capsys, "eval", run)
    assert_error(code, err, "unknown key 'modle'", "Did you mean 'model'?")
    assert snapshot(run) == before


def _unfinished(finished_run: Path, dest: Path) -> Path:
    """A copy of a finished run without its results: something ``resume`` accepts."""
    run = copy_run(finished_run, dest)
    (run / "results.json").unlink()
    return run


def test_resume_corrupted_checkpoint(
    capsys: pytest.CaptureFixture[str], finished_run: Path, tmp_path: Path
) -> None:
    run = _unfinished(finished_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:4000])
    before = snapshot(run)
    code, _, err = cli(capsys, "resume", run, "--quiet")
    assert_error(code, err, str(last), "corrupted")
    assert snapshot(run) == before


def test_resume_checkpoint_of_another_model(
    capsys: pytest.CaptureFixture[str], finished_run: Path, other_model_run: Path, tmp_path: Path
) -> None:
    run = _unfinished(finished_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    shutil.copy2(other_model_run / "checkpoints" / "last.pt", last)
    before = snapshot(run)
    code, _, err = cli(capsys, "resume", run, "--quiet")
    assert_error(code, err, str(last), "belongs to a different model", "[4] vs [8]")
    assert snapshot(run) == before


# -- eval -----------------------------------------------------------------------------------


def _garbage(kind: str, good: bytes) -> bytes:
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "empty":
        return b""
    if kind == "zeros":
        return bytes(4096)
    return b"this is not a checkpoint\n" * 10


@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "empty",
        "zeros",
        "text",
    ],
)
def test_eval_corrupted_checkpoint(
    capsys: pytest.CaptureFixture[str], finished_run: Path, tmp_path: Path, kind: str
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(_garbage(kind, best.read_bytes()))
    before = snapshot(run)
    code, out, err = cli(capsys, "eval", run)
    assert_error(code, err, f"cannot read checkpoint {best}", "corrupted")
    assert out == ""
    assert snapshot(run) == before


def test_eval_file_that_is_not_a_polytask_checkpoint(
    capsys: pytest.CaptureFixture[str], finished_run: Path, tmp_path: Path
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    best = run / "checkpoints" / "best.pt"
    torch.save({"weights": torch.zeros(3)}, best)
    before = snapshot(run)
    code, _, err = cli(capsys, "eval", run)
    assert_error(code, err, str(best), "not a polytask checkpoint", "polytask-checkpoint-v1")
    assert snapshot(run) == before


def test_eval_missing_checkpoint(
    capsys: pytest.CaptureFixture[str], finished_run: Path, tmp_path: Path
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    last.unlink()
    before = snapshot(run)
    code, _, err = cli(capsys, "eval", run, "--checkpoint", "last")
    assert_error(code, err, "checkpoint not found", str(last))
    assert snapshot(run) == before


def test_eval_checkpoint_of_another_model(
    capsys: pytest.CaptureFixture[str], finished_run: Path, other_model_run: Path, tmp_path: Path
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    best = run / "checkpoints" / "best.pt"
    shutil.copy2(other_model_run / "checkpoints" / "best.pt", best)
    before = snapshot(run)
    code, _, err = cli(capsys, "eval", run)
    assert_error(
        code,
        err,
        f"checkpoint {best} belongs to a different model",
        "entries of another shape",
        "[4] vs [8]",
        "Use the configuration the checkpoint was trained with",
    )
    assert snapshot(run) == before


def test_eval_not_a_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = cli(capsys, "eval", tmp_path)
    assert_error(code, err, str(tmp_path), "not a polytask run directory")


def test_code_payload_runs_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The control for the tests below: the payload is live under ordinary unpickling."""
    marker = tmp_path / "marker"
    write_payload_checkpoint(tmp_path / "payload.pt", marker)
    assert not marker.exists()
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_checkpoint_with_code_is_refused_without_running_it(
    capsys: pytest.CaptureFixture[str], finished_run: Path, tmp_path: Path, command: str
) -> None:
    run = _unfinished(finished_run, tmp_path / "run")
    marker = tmp_path / "marker"
    target = run / "checkpoints" / ("best.pt" if command == "eval" else "last.pt")
    write_payload_checkpoint(target, marker)
    before = snapshot(run)
    code, _, err = cli(capsys, command, run, *(["--quiet"] if command == "resume" else []))
    assert_error(code, err, f"cannot read checkpoint {target}")
    assert not marker.exists(), "opening the checkpoint ran code from it"
    assert snapshot(run) == before


def test_refused_checkpoint_message_is_plain_text(
    capsys: pytest.CaptureFixture[str], finished_run: Path, tmp_path: Path
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    write_payload_checkpoint(run / "checkpoints" / "best.pt", tmp_path / "marker")
    code, _, err = cli(capsys, "eval", run)
    message = assert_error(code, err, "cannot read checkpoint")
    assert "\x1b" not in message
    assert "exec" in message  # names what was refused


# -- compare --------------------------------------------------------------------------------


def _grid(tmp_path: Path, recipe: Path, **changes: Any) -> Path:
    grid: dict[str, Any] = {
        "name": "g",
        "output_dir": str(tmp_path / "grids"),
        "base": str(recipe),
        "seeds": [0],
        "baseline": "stl",
        "cells": {
            "stl": {"model.architecture": "single_task"},
            "hps": {"model.architecture": "hps"},
        },
    }
    grid.update(changes)
    return write_yaml(tmp_path / "grid.yaml", grid)


def _grids_dir(tmp_path: Path) -> Path:
    earlier = tmp_path / "grids" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "grid.yaml").write_text("name: earlier\n", encoding="utf-8")
    return tmp_path / "grids"


#: "GRID" stands for the grid file's path.
GRID_ERRORS = [
    pytest.param(
        {"cells": {"stl": {"model.architecture": "single_task"}, "hps": {"model.architecure": 1}}},
        ["GRID", "cell 'hps'", "unknown key 'model.architecure'", "Did you mean 'architecture'?"],
        id="unknown-cell-key",
    ),
    pytest.param(
        {"cells": {"stl": {"model.architecture": "single_task"}, "hps": {"train.epochs": "x"}}},
        ["GRID", "cell 'hps'", "train.epochs: expected an integer"],
        id="wrong-type-in-cell",
    ),
    pytest.param(
        {"sedes": [0, 1]},
        ["unknown key 'grid.sedes'", "Did you mean 'seeds'?"],
        id="unknown-grid-key",
    ),
    pytest.param(
        {"baseline": "single_task"},
        ["GRID", "baseline 'single_task' is not a cell", "cells are stl, hps"],
        id="baseline-not-a-cell",
    ),
    pytest.param(
        {"delta_m": "mean"},
        ["grid.delta_m", "metric_mean, task_mean"],
        id="unknown-delta-m-convention",
    ),
    pytest.param(
        {"cells": {}},
        ["GRID", "the grid has no cell", "give `cells`"],
        id="no-cells",
    ),
]


@pytest.mark.parametrize(("changes", "fragments"), GRID_ERRORS)
def test_compare_rejects_bad_grid(
    capsys: pytest.CaptureFixture[str],
    recipe: Path,
    tmp_path: Path,
    changes: dict[str, Any],
    fragments: list[str],
) -> None:
    grids = _grids_dir(tmp_path)
    grid = _grid(tmp_path, recipe, **changes)
    before = snapshot(tmp_path)
    code, out, err = cli(capsys, "compare", grid, "--quiet")
    assert_error(code, err, *(str(grid) if f == "GRID" else f for f in fragments))
    assert out == ""
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in grids.iterdir()) == ["earlier"]


def test_compare_rejects_unknown_architecture_in_a_cell(
    capsys: pytest.CaptureFixture[str], recipe: Path, tmp_path: Path
) -> None:
    grids = _grids_dir(tmp_path)
    cells = {"stl": {"model.architecture": "single_task"}, "hps": {"model.architecture": "hsp"}}
    grid = _grid(tmp_path, recipe, cells=cells)
    before = snapshot(grids)
    code, _, err = cli(capsys, "compare", grid, "--quiet")
    assert_error(code, err, "unknown architecture 'hsp'", _known(ARCHITECTURES, "architecture"))
    assert_preserved(before, snapshot(grids))
    assert not (grids / "g" / "stl").exists(), "a cell was trained before the grid was validated"


def test_compare_invalid_cell_writes_nothing(
    capsys: pytest.CaptureFixture[str], recipe: Path, tmp_path: Path
) -> None:
    grids = _grids_dir(tmp_path)
    cells = {"stl": {"model.architecture": "single_task"}, "hps": {"model.architecture": "hsp"}}
    grid = _grid(tmp_path, recipe, cells=cells)
    before = snapshot(grids)
    code, _, err = cli(capsys, "compare", grid, "--quiet")
    assert_error(code, err, "unknown architecture 'hsp'")
    assert snapshot(grids) == before


def test_compare_missing_grid_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "grid.yaml"
    code, _, err = cli(capsys, "compare", missing)
    assert_error(code, err, str(missing), "not found")
    assert list(tmp_path.iterdir()) == []


def test_compare_missing_base_recipe(
    capsys: pytest.CaptureFixture[str], recipe: Path, tmp_path: Path
) -> None:
    grid = _grid(tmp_path, recipe, base="no-such-recipe.yaml")
    code, _, err = cli(capsys, "compare", grid, "--quiet")
    assert_error(code, err, str(tmp_path / "no-such-recipe.yaml"), "not found")
    assert not (tmp_path / "grids").exists()


# -- report ---------------------------------------------------------------------------------


def test_report_of_a_directory_that_is_neither_run_nor_grid(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("hello\n", encoding="utf-8")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "report", tmp_path)
    assert_error(code, err, str(tmp_path), "neither a run directory nor a grid directory")
    assert snapshot(tmp_path) == before


# -- end to end, as real processes ----------------------------------------------------------


def polytask_process(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polytask", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_process_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def test_process_unknown_key(recipe: Path, tmp_path: Path) -> None:
    proc = polytask_process(
        "train", recipe, f"output_dir={tmp_path / 'runs'}", "train.epoks=2", cwd=tmp_path
    )
    assert_process_error(proc, "unknown key 'train.epoks'", "Did you mean 'epochs'?")
    assert proc.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_process_corrupted_checkpoint(finished_run: Path, tmp_path: Path) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    before = snapshot(run)
    proc = polytask_process("eval", run, cwd=tmp_path)
    assert_process_error(proc, f"cannot read checkpoint {best}")
    assert snapshot(run) == before


def test_process_checkpoint_with_code(finished_run: Path, tmp_path: Path) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    marker = tmp_path / "marker"
    write_payload_checkpoint(run / "checkpoints" / "best.pt", marker)
    before = snapshot(run)
    proc = polytask_process("eval", run, cwd=tmp_path)
    assert_process_error(proc, "cannot read checkpoint")
    assert not marker.exists(), "opening the checkpoint ran code from it"
    assert snapshot(run) == before
