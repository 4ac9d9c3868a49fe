"""Edited or damaged run directories, checkpoints and grid files, and bad paths: each is
one ``polytask: error:`` line, exit 2, and leaves every file as it was.

Every case copies a finished or an interrupted tiny run (or starts from nothing), damages
it, snapshots the whole temporary directory, runs the command in a forked process
(``cli_harness.run_cli``) and checks the one-line contract and that nothing changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cli_harness import assert_refused, assert_unchanged, run_cli, snapshot
from tiny_runs import (
    assert_same_run,
    config_dict,
    copy_run,
    train_finished,
    train_interrupted,
)

from polytask.training.checkpoint import DIGEST_KEY, content_digest


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {
        "finished": train_finished(root / "finished"),
        "interrupted": train_interrupted(root / "interrupted"),
    }


# -- damage -------------------------------------------------------------------------------------


def _edit_config(run: Path, **changes: Any) -> None:
    path = run / "config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


_DELETE = object()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 37)


def _rewrite_checkpoint(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Load a checkpoint, let ``change`` edit it (its hash kept unless it edits it), save."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    change(data)
    torch.save(data, path)


def _tamper_weight(data: dict[str, Any]) -> None:
    key = next(iter(data["model"]))
    data["model"][key] = data["model"][key] + 1e-3  # right tag, right shapes, other weights


def _tamper_epoch(data: dict[str, Any]) -> None:
    data["epoch"] = 0 if data["epoch"] else 1


def _drop_digest(data: dict[str, Any]) -> None:
    del data[DIGEST_KEY]


def _other_tag(data: dict[str, Any]) -> None:
    data["format"] = "polytask-checkpoint-v0"
    data[DIGEST_KEY] = content_digest(data)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    marker = data.find(b"data/0")  # the first tensor's storage in the zip file
    i = data.find(b"PK", marker + 8) - 4 if marker >= 0 else len(data) // 2
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


def _prepend(path: Path, line: str) -> None:
    path.write_text(line + "\n" + path.read_text(encoding="utf-8"), encoding="utf-8")


def _grid_file(tmp: Path, cells: Any, name: Any = "g", **extra: Any) -> Path:
    base = tmp / "base.yaml"
    base.write_text(yaml.safe_dump(config_dict(tmp / "x", **{"train.epochs": 1})))
    spec: dict[str, Any] = {"name": name, "base": "base.yaml", "output_dir": str(tmp / "out")}
    if cells is not None:
        spec["cells"] = cells
    spec.update(extra)
    grid = tmp / "grid.yaml"
    grid.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return grid


def _tiny_yaml(tmp: Path, **overrides: Any) -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp / "runs", **overrides)), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Case:
    id: str
    #: "finished", "interrupted" (copied to TMP/run) or None (nothing)
    source: str | None
    #: damages TMP/run (or sets up TMP) and returns the command's arguments
    setup: Callable[[Path, Path], list[Any]]
    #: fragments of the one error line; "{run}" and "{tmp}" are replaced
    fragments: tuple[str, ...]


def _resume(*extra: str) -> Callable[[Path, Path], list[Any]]:
    return lambda run, tmp: ["resume", run, "--quiet", *extra]


def _then(
    damage: Callable[[Path], None], command: Callable[[Path, Path], list[Any]]
) -> Callable[[Path, Path], list[Any]]:
    def setup(run: Path, tmp: Path) -> list[Any]:
        damage(run)
        return command(run, tmp)

    return setup


def _eval(which: str) -> Callable[[Path, Path], list[Any]]:
    return lambda run, tmp: ["eval", run, "--checkpoint", which]


def _report(run: Path, tmp: Path) -> list[Any]:
    return ["report", run]


INT = "interrupted"
FIN = "finished"
CASES = [
    # -- config.yaml edited since the run started ------------------------------------------------
    Case(
        "epochs-changed",
        INT,
        _then(lambda r: _edit_config(r, **{"train.epochs": 3}), _resume()),
        ("{run}/config.yaml", "train.epochs: 2 -> 3", "--allow-change train.epochs"),
    ),
    Case(
        "lr-changed",
        INT,
        _then(lambda r: _edit_config(r, **{"optim.lr": 0.1}), _resume()),
        ("optim.lr: 0.01 -> 0.1", "cannot change while a run goes on"),
    ),
    Case(
        "seed-changed",
        INT,
        _then(lambda r: _edit_config(r, seed=1), _resume()),
        ("seed: 0 -> 1", "cannot change"),
    ),
    Case(
        "architecture-changed",
        INT,
        _then(lambda r: _edit_config(r, **{"model.architecture": "mmoe"}), _resume()),
        ("model.architecture: 'hps' -> 'mmoe'",),
    ),
    Case(
        "batch-size-changed",
        INT,
        _then(lambda r: _edit_config(r, **{"data.batch_size": 16}), _resume()),
        ("data.batch_size: 32 -> 16",),
    ),
    Case(
        "key-removed",
        INT,
        _then(lambda r: _edit_config(r, **{"optim.lr": _DELETE}), _resume()),
        ("optim.lr: 0.01 -> '<unset>'",),
    ),
    Case(
        "key-added",
        INT,
        _then(lambda r: _edit_config(r, **{"train.extra_key": 1}), _resume()),
        ("train.extra_key: '<unset>' -> 1",),
    ),
    Case(
        "epochs-allowed-but-lr-changed",
        INT,
        _then(
            lambda r: _edit_config(r, **{"train.epochs": 3, "optim.lr": 0.5}),
            _resume("--allow-change", "train.epochs"),
        ),
        ("optim.lr: 0.01 -> 0.5", "cannot change"),
    ),
    Case(
        "allow-change-of-the-lr",
        INT,
        _then(
            lambda r: _edit_config(r, **{"optim.lr": 0.1}), _resume("--allow-change", "optim.lr")
        ),
        ("--allow-change optim.lr", "cannot change while a run goes on", "train.epochs"),
    ),
    Case(
        "allow-change-of-the-seed",
        INT,
        _then(lambda r: _edit_config(r, seed=3), _resume("--allow-change", "train.epochs,seed")),
        ("--allow-change seed",),
    ),
    Case(
        "allow-change-of-an-unknown-key",
        INT,
        _resume("--allow-change", "bogus.key"),
        ("--allow-change bogus.key",),
    ),
    Case(
        "epochs-fewer-than-done",
        INT,
        _then(
            lambda r: _edit_config(r, **{"train.epochs": 0}),
            _resume("--allow-change", "train.epochs"),
        ),
        ("train.epochs 0 is less than the 1 epochs the run has done",),
    ),
    Case(
        "config-not-yaml",
        INT,
        _then(lambda r: (r / "config.yaml").write_text("a: [1, 2\n"), _resume()),
        ("{run}/config.yaml", "not valid YAML"),
    ),
    Case(
        "config-empty",
        INT,
        _then(lambda r: (r / "config.yaml").write_text(""), _resume()),
        ("config.yaml does not hold a configuration mapping",),
    ),
    Case(
        "config-a-list",
        INT,
        _then(lambda r: (r / "config.yaml").write_text("- 1\n- 2\n"), _resume()),
        ("does not hold a configuration mapping",),
    ),
    Case(
        "config-removed",
        INT,
        _then(lambda r: (r / "config.yaml").unlink(), _resume()),
        ("not a polytask run directory",),
    ),
    # -- meta.json ------------------------------------------------------------------------------
    Case(
        "meta-truncated",
        INT,
        _then(lambda r: _truncate(r / "meta.json"), _resume()),
        ("{run}/meta.json is damaged, not valid JSON",),
    ),
    Case(
        "meta-random-bytes",
        INT,
        _then(lambda r: _random(r / "meta.json"), _resume()),
        ("meta.json is damaged",),
    ),
    Case(
        "meta-empty",
        INT,
        _then(lambda r: (r / "meta.json").write_text(""), _resume()),
        ("meta.json is damaged",),
    ),
    Case(
        "meta-a-list",
        INT,
        _then(lambda r: (r / "meta.json").write_text("[1, 2]"), _resume()),
        ("meta.json is damaged: expected a JSON object",),
    ),
    Case(
        "meta-removed",
        INT,
        _then(lambda r: (r / "meta.json").unlink(), _resume()),
        ("meta.json is missing",),
    ),
    Case(
        "meta-hash-of-another-type",
        INT,
        _then(lambda r: (r / "meta.json").write_text(json.dumps({"config_sha256": 5})), _resume()),
        ("meta.json is damaged: config_sha256",),
    ),
    # -- checkpoints ----------------------------------------------------------------------------
    Case(
        "last-truncated",
        INT,
        _then(lambda r: _truncate(r / "checkpoints/last.pt"), _resume()),
        ("{run}/checkpoints/last.pt", "corrupted"),
    ),
    Case(
        "last-random-bytes",
        INT,
        _then(lambda r: _random(r / "checkpoints/last.pt"), _resume()),
        ("{run}/checkpoints/last.pt",),
    ),
    Case(
        "last-empty",
        INT,
        _then(lambda r: (r / "checkpoints/last.pt").write_bytes(b""), _resume()),
        ("{run}/checkpoints/last.pt",),
    ),
    Case(
        "last-right-tag-other-weights",
        INT,
        _then(lambda r: _rewrite_checkpoint(r / "checkpoints/last.pt", _tamper_weight), _resume()),
        ("{run}/checkpoints/last.pt", "do not match its hash"),
    ),
    Case(
        "last-right-tag-other-epoch",
        INT,
        _then(lambda r: _rewrite_checkpoint(r / "checkpoints/last.pt", _tamper_epoch), _resume()),
        ("do not match its hash",),
    ),
    Case(
        "last-without-hash",
        INT,
        _then(lambda r: _rewrite_checkpoint(r / "checkpoints/last.pt", _drop_digest), _resume()),
        ("has no content hash",),
    ),
    Case(
        "last-other-format-tag",
        INT,
        _then(lambda r: _rewrite_checkpoint(r / "checkpoints/last.pt", _other_tag), _resume()),
        ("not a polytask checkpoint",),
    ),
    Case(
        "last-a-byte-flipped",
        FIN,
        _then(lambda r: _flip_byte(r / "checkpoints/last.pt"), _eval("last")),
        ("{run}/checkpoints/last.pt",),
    ),
    Case(
        "best-right-tag-other-weights",
        FIN,
        _then(
            lambda r: _rewrite_checkpoint(r / "checkpoints/best.pt", _tamper_weight), _eval("best")
        ),
        ("{run}/checkpoints/best.pt", "do not match its hash"),
    ),
    Case(
        "best-truncated",
        FIN,
        _then(lambda r: _truncate(r / "checkpoints/best.pt"), _eval("best")),
        ("{run}/checkpoints/best.pt", "corrupted"),
    ),
    Case(
        "last-a-directory",
        INT,
        _then(
            lambda r: ((r / "checkpoints/last.pt").unlink(), (r / "checkpoints/last.pt").mkdir()),
            _resume(),
        ),
        ("{run}/checkpoints/last.pt",),
    ),
    # -- metrics.jsonl --------------------------------------------------------------------------
    Case(
        "metrics-damaged-line-before-the-last",
        INT,
        _then(lambda r: _prepend(r / "metrics.jsonl", "{not json"), _resume()),
        ("{run}/metrics.jsonl is damaged: line 1",),
    ),
    Case(
        "metrics-a-line-that-is-no-record",
        INT,
        _then(lambda r: _prepend(r / "metrics.jsonl", "[1, 2]"), _resume()),
        ("metrics.jsonl is damaged: line 1",),
    ),
    Case(
        "metrics-emptied",
        INT,
        _then(lambda r: (r / "metrics.jsonl").write_text(""), _resume()),
        ("metrics.jsonl is damaged: the checkpoint has done 1 epochs",),
    ),
    Case(
        "metrics-a-record-twice",
        INT,
        _then(
            lambda r: _prepend(r / "metrics.jsonl", (r / "metrics.jsonl").read_text().strip()),
            _resume(),
        ),
        ("metrics.jsonl is damaged",),
    ),
    Case(
        "metrics-damaged-in-a-finished-run",
        FIN,
        _then(lambda r: _prepend(r / "metrics.jsonl", "garbage"), _report),
        ("{run}/metrics.jsonl is damaged: line 1",),
    ),
    # -- results.json ---------------------------------------------------------------------------
    Case(
        "results-truncated",
        FIN,
        _then(lambda r: _truncate(r / "results.json"), _resume()),
        ("{run}/results.json is damaged, not valid JSON",),
    ),
    Case(
        "results-random-bytes",
        FIN,
        _then(lambda r: _random(r / "results.json"), _report),
        ("results.json is damaged",),
    ),
    Case(
        "results-a-list",
        FIN,
        _then(lambda r: (r / "results.json").write_text("[]"), _resume()),
        ("results.json is damaged: expected a JSON object",),
    ),
    Case(
        "results-empty",
        FIN,
        _then(lambda r: (r / "results.json").write_text(""), _report),
        ("results.json is damaged",),
    ),
    # -- grid files: cells and names that would leave the grid directory ------------------------
    *[
        Case(
            f"grid-cell-{label}",
            None,
            lambda run, tmp, cell=cell: ["compare", _grid_file(tmp, {cell: {"optim.lr": 0.1}})],
            ("{tmp}/grid.yaml", "cell name"),
        )
        for label, cell in [
            ("dot-dot", ".."),
            ("dot", "."),
            ("slash", "a/b"),
            ("absolute", "/tmp/x"),
            ("escape", "../x"),
            ("nul", "a\x00b"),
            ("empty", ""),
        ]
    ],
    Case(
        "grid-scalar-cell",
        None,
        lambda run, tmp: ["compare", _grid_file(tmp, {"a": 3})],
        ("cell 'a'", "expected a mapping"),
    ),
    Case(
        "grid-cells-a-list",
        None,
        lambda run, tmp: ["compare", _grid_file(tmp, ["a", "b"])],
        ("cells",),
    ),
    Case(
        "grid-without-cells",
        None,
        lambda run, tmp: ["compare", _grid_file(tmp, None)],
        ("the grid has no cell",),
    ),
    Case(
        "grid-empty-cells",
        None,
        lambda run, tmp: ["compare", _grid_file(tmp, {})],
        ("the grid has no cell",),
    ),
    Case(
        "grid-integer-cell-name",
        None,
        lambda run, tmp: ["compare", _grid_file(tmp, {1: {"optim.lr": 0.1}})],
        ("cell name 1",),
    ),
    Case(
        "grid-product-level-dot-dot",
        None,
        lambda run, tmp: [
            "compare",
            _grid_file(tmp, None, product={"lr": {"..": {"optim.lr": 0.1}}}),
        ],
        ("cell name '..'",),
    ),
    *[
        Case(
            f"grid-name-{label}",
            None,
            lambda run, tmp, name=name: ["compare", _grid_file(tmp, {"a": None}, name=name)],
            ("grid name",),
        )
        for label, name in [("dot-dot", ".."), ("escape", "../../g"), ("absolute", "/tmp/g")]
    ],
    # -- paths ----------------------------------------------------------------------------------
    Case(
        "run-dir-a-file",
        None,
        lambda run, tmp: [
            "train",
            _tiny_yaml(tmp),
            "--run-dir",
            (tmp / "file").write_text("x") and tmp / "file",
        ],
        ("{tmp}/file is a file",),
    ),
    Case(
        "run-dir-with-nul",
        None,
        lambda run, tmp: ["train", _tiny_yaml(tmp), "--run-dir", f"{tmp}/a\x00b"],
        ("NUL byte",),
    ),
    Case(
        "run-dir-name-too-long",
        None,
        lambda run, tmp: ["train", _tiny_yaml(tmp), "--run-dir", tmp / ("n" * 300)],
        ("ENAMETOOLONG", "create the run directory"),
    ),
    Case(
        "run-dir-under-a-file",
        None,
        lambda run, tmp: [
            "train",
            _tiny_yaml(tmp),
            "--run-dir",
            (tmp / "file").write_text("x") and tmp / "file" / "run",
        ],
        ("{tmp}/file/run", "create the run directory", "ENOTDIR"),
    ),
    Case(
        "output-dir-a-file",
        None,
        lambda run, tmp: [
            "train",
            _tiny_yaml(tmp),
            (tmp / "file").write_text("x") and f"output_dir={tmp}/file",
        ],
        ("{tmp}/file/tiny-", "create the run directory"),
    ),
    Case(
        "output-dir-with-nul",
        None,
        lambda run, tmp: ["train", _tiny_yaml(tmp), f"output_dir={tmp}/a\x00b"],
        ("NUL byte",),
    ),
    Case(
        "name-escaping-the-output-dir",
        None,
        lambda run, tmp: ["train", _tiny_yaml(tmp), "name=../../escaped"],
        ("name '../../escaped' cannot name a directory",),
    ),
    Case(
        "name-dot-dot",
        None,
        lambda run, tmp: ["train", _tiny_yaml(tmp), "name=.."],
        ("name '..'",),
    ),
    Case(
        "resume-a-file",
        None,
        lambda run, tmp: ["resume", (tmp / "file").write_text("x") and tmp / "file"],
        ("not a polytask run directory",),
    ),
    Case(
        "resume-a-name-too-long",
        None,
        lambda run, tmp: ["resume", tmp / ("n" * 300)],
        ("File name too long (ENAMETOOLONG)",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_and_nothing_changed(tmp_path: Path, sources: dict[str, Path], case: Case) -> None:
    run = tmp_path / "run"
    if case.source is not None:
        copy_run(sources[case.source], run)
    args = case.setup(run, tmp_path)
    before = snapshot(tmp_path)
    result = run_cli(*args, cwd=tmp_path)
    fragments = [
        f.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)) for f in case.fragments
    ]
    assert_refused(result, *fragments)
    assert_unchanged(before, tmp_path)
    assert sorted(os.listdir(tmp_path.parent)).count(tmp_path.name) == 1


def test_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


# -- what is accepted ---------------------------------------------------------------------------


def test_more_epochs_when_allowed(tmp_path: Path, sources: dict[str, Path]) -> None:
    """train.epochs 2 -> 3 with --allow-change: the run goes on to 3 epochs, and equals a
    run of 3 epochs from the start; meta.json records the change, a later resume needs no
    flag."""
    run = copy_run(sources["interrupted"], tmp_path / "run")
    _edit_config(run, **{"train.epochs": 3})
    result = run_cli("resume", run, "--quiet", "--allow-change", "train.epochs")
    assert result.code == 0, result.err
    meta = json.loads((run / "meta.json").read_text())
    assert meta["config_changes"][0]["changes"] == {"train.epochs": {"from": 2, "to": 3}}
    assert meta["config"]["train"]["epochs"] == 3
    assert (
        "continuing with changed configuration: train.epochs 2 -> 3"
        in (run / "train.log").read_text()
    )
    three = train_finished(tmp_path / "three", **{"train.epochs": 3})
    assert_same_run(three, run)


def test_the_same_configuration_written_otherwise_is_accepted(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    run = copy_run(sources["interrupted"], tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text("# reordered\n" + yaml.safe_dump(config, sort_keys=True))
    result = run_cli("resume", run, "--quiet")
    assert result.code == 0, result.err
    assert_same_run(sources["finished"], run)


@pytest.mark.parametrize("cut", ["no-newline", "invalid-json-line"])
def test_a_metrics_line_cut_by_a_crash_is_rebuilt(
    tmp_path: Path, sources: dict[str, Path], cut: str
) -> None:
    run = copy_run(sources["interrupted"], tmp_path / "run")
    partial = '{"epoch": 1, "lr": 0.01, "tra'
    with (run / "metrics.jsonl").open("a") as f:
        f.write(partial if cut == "no-newline" else partial + "\n")
    report = run_cli("report", run)  # a reader: a warning, the line left out
    assert "polytask: warning:" in report.err and "metrics.jsonl: line 2" in report.err
    result = run_cli("resume", run, "--quiet")
    assert result.code == 0, result.err
    assert "cut short by a crash; dropped" in (run / "train.log").read_text()
    assert_same_run(sources["finished"], run)
