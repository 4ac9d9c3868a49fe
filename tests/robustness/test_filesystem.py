"""File system faults at every write point: one line naming the path and the operation,
exit 2, nothing already written lost; once the fault is gone the run resumes to the
uninterrupted run's result bit for bit.

Faults are injected through the one write helper (``polytask.fsio.before_write`` runs right
before every write touches the file system), and for real where the machine allows: a small
tmpfs that fills up (ENOSPC), remounted read-only (EROFS), a directory without write
permission (chmod, not as root).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_harness import assert_refused, run_cli
from tiny_runs import (
    assert_same_run,
    copy_run,
    train_finished,
    train_interrupted,
    write_config,
)

import polytask.fsio as fsio
from helpers import assert_error, cli

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    return train_finished(tmp_path_factory.mktemp("reference") / "run")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_interrupted(tmp_path_factory.mktemp("interrupted") / "run")


def _fault(
    name: str, occurrence: int, error: int = errno.ENOSPC
) -> tuple[Callable[[Path, str], None], list[tuple[Path, str]]]:
    """A ``before_write`` raising ``error`` at the ``occurrence``-th write of a file named
    ``name``; the list receives the write that failed."""
    seen: list[int] = [0]
    failed: list[tuple[Path, str]] = []

    def before_write(path: Path, operation: str) -> None:
        if path.name == name:
            seen[0] += 1
            if seen[0] == occurrence:
                failed.append((path, operation))
                raise OSError(error, os.strerror(error), str(path))

    return before_write, failed


def test_every_write_goes_through_the_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    writes: list[tuple[str, str]] = []
    monkeypatch.setattr(fsio, "before_write", lambda path, op: writes.append((path.name, op)))
    config = write_config(tmp_path)
    code, _, err = cli(capsys, "train", config, "--run-dir", tmp_path / "run", "--quiet")
    assert code == 0, err
    names = {name for name, _ in writes}
    assert {
        "run",
        ".lock",
        "config.yaml",
        "meta.json",
        "train.log",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "results.json",
    } <= names
    ops = dict(writes)
    assert ops["last.pt"] == "write the checkpoint"
    assert ops["metrics.jsonl"] == "append a record to"
    assert ops["run"] == "create the run directory"


#: (file name, which of its writes fails); 8 steps an epoch, a checkpoint every 3 steps
POINTS = [
    ("run", 1),
    (".lock", 1),
    ("config.yaml", 1),
    ("meta.json", 1),
    ("train.log", 1),
    ("last.pt", 1),
    ("last.pt", 3),  # the checkpoint at the end of epoch 1
    ("last.pt", 5),
    ("best.pt", 1),
    ("metrics.jsonl", 1),
    ("metrics.jsonl", 2),
    ("results.json", 1),
]


@pytest.mark.parametrize(("name", "occurrence"), POINTS, ids=[f"{n}#{k}" for n, k in POINTS])
def test_disk_full_at_each_write_point_then_resume_exactly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    reference: Path,
    name: str,
    occurrence: int,
) -> None:
    config = write_config(tmp_path)
    run = tmp_path / "run"
    before_write, failed = _fault(name, occurrence)
    monkeypatch.setattr(fsio, "before_write", before_write)
    code, _, err = cli(capsys, "train", config, "--run-dir", run, "--quiet")
    assert failed, f"no write of {name} #{occurrence}"
    path, operation = failed[0]
    message = assert_error(code, err, str(path), operation, "No space left", "ENOSPC", whole=True)
    assert "resume" in message
    monkeypatch.undo()  # space is freed
    assert not list(run.rglob(f"*{fsio.TMP_SUFFIX}")), "a temporary file was left behind"
    if (run / "checkpoints" / "last.pt").is_file():
        code, _, err = cli(capsys, "resume", run, "--quiet")
        assert code == 0, err
        assert_same_run(reference, run)
    else:  # stopped before its first checkpoint: said so, and a new run gives the same
        code, _, err = cli(capsys, "resume", run, "--quiet")
        assert_error(code, err)
        code, _, err = cli(capsys, "train", config, "--run-dir", tmp_path / "again", "--quiet")
        assert code == 0, err
        assert_same_run(reference, tmp_path / "again")


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("name", ["metrics.jsonl", "last.pt", ".lock"])
def test_resume_on_a_failing_file_system_then_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    reference: Path,
    interrupted: Path,
    error: int,
    name: str,
) -> None:
    run = copy_run(interrupted, tmp_path / "run")
    before_write, failed = _fault(name, 1, error)
    monkeypatch.setattr(fsio, "before_write", before_write)
    code, _, err = cli(capsys, "resume", run, "--quiet")
    assert failed
    assert_error(code, err, str(failed[0][0]), errno.errorcode[error], whole=True)
    monkeypatch.undo()
    code, _, err = cli(capsys, "resume", run, "--quiet")
    assert code == 0, err
    assert_same_run(reference, run)


def test_a_line_that_cannot_be_appended_whole_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    fsio.append_line(path, '{"epoch": 0}')
    real_write = os.write

    def half(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", half)
        with pytest.raises(fsio.FileSystemError, match="append to"):
            fsio.append_line(path, '{"epoch": 1, "much": "more"}')
    assert path.read_text() == '{"epoch": 0}\n'


def test_an_atomic_write_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    fsio.write_atomic(path, "old")

    def fill(f: Any) -> None:
        f.write(b"new, half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(fsio.FileSystemError, match="No space left"):
        fsio.write_atomic(path, fill, "write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_stale_temporary_checkpoints_are_removed_on_resume_and_logged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: Path, interrupted: Path
) -> None:
    run = copy_run(interrupted, tmp_path / "run")
    stale = [
        run / "checkpoints" / ".last.pt.k1ll3d.tmp",
        run / "checkpoints" / ".best.pt.abc123.tmp",
        run / ".results.json.x.tmp",
    ]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    code, _, err = cli(capsys, "resume", run, "--quiet")
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    log = (run / "train.log").read_text(encoding="utf-8")
    for p in stale:
        assert f"removed {p}" in log
    assert_same_run(reference, run)


def test_a_grid_summary_that_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml
    from tiny_runs import config_dict

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(config_dict(tmp_path / "x", **{"train.epochs": 1})))
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "name": "g",
                "base": "base.yaml",
                "output_dir": str(tmp_path / "grids"),
                "cells": {"a": {"optim.lr": 0.01}},
            }
        )
    )
    for name in ("grid.yaml", "results.md", "results.csv", "results.json"):
        before_write, failed = _fault(name, 1)
        monkeypatch.setattr(fsio, "before_write", before_write)
        code, _, err = cli(capsys, "compare", grid, "--quiet")
        assert failed, name
        # the grid's warnings (a cell at chance level) may come first: one error line, last
        assert code == 2 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("polytask: error:")]
        assert errors == [err.splitlines()[-1]], err
        assert str(failed[0][0]) in errors[0] and "No space left" in errors[0]
        monkeypatch.undo()
    code, _, err = cli(capsys, "compare", grid, "--quiet")
    assert code == 0, err
    assert (tmp_path / "grids" / "g" / "results.md").is_file()


def test_a_report_that_cannot_be_written(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], reference: Path
) -> None:
    import polytask.report.run_report as run_report

    def full(run: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run.path / "report.md"))

    monkeypatch.setattr(run_report, "write_run_report", full)
    code, _, err = cli(capsys, "report", reference)
    assert_error(code, err, str(reference / "report.md"), "write the report", whole=True)


# -- real file systems ------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            check=False,
        )
    except OSError:  # no mount command
        pytest.skip("cannot mount a tmpfs here (no mount command)")
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs privileges)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 1 << 10, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def test_a_real_full_disk_and_a_real_read_only_file_system(
    tmp_path: Path, reference: Path, interrupted: Path
) -> None:
    with _tmpfs(tmp_path / "mnt", "8m") as mnt:
        run = copy_run(interrupted, mnt / "run")
        filler = _fill(mnt)
        result = run_cli("resume", run, "--quiet")
        assert_refused(result, str(mnt), "No space left on device (ENOSPC)")
        filler.unlink()
        done = subprocess.run(
            ["mount", "-o", "remount,ro", str(mnt)], capture_output=True, check=False
        )
        if done.returncode == 0:
            result = run_cli("resume", run, "--quiet")
            assert_refused(result, str(run), "Read-only file system (EROFS)")
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        result = run_cli("resume", run, "--quiet")
        assert result.code == 0, result.err
        assert_same_run(reference, run)
        # a new run on a full disk: the one line, then nothing half-written is trusted
        config = write_config(mnt / "cfg")
        filler = _fill(mnt)
        result = run_cli("train", config, "--run-dir", mnt / "new", "--quiet")
        assert_refused(result, str(mnt), "ENOSPC")
        filler.unlink()


@pytest.mark.skipif(os.geteuid() == 0, reason="as root, chmod does not stop writes")
def test_a_read_only_directory(tmp_path: Path, reference: Path, interrupted: Path) -> None:
    run = copy_run(interrupted, tmp_path / "run")
    config = write_config(tmp_path / "cfg")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    run.chmod(0o500)
    try:
        result = run_cli("train", config, "--run-dir", out / "run", "--quiet")
        assert_refused(result, str(out / "run"), "create the run directory", "EACCES")
        result = run_cli("resume", run, "--quiet")
        assert_refused(result, str(run), "EACCES")
    finally:
        out.chmod(0o700)
        run.chmod(0o700)
    result = run_cli("resume", run, "--quiet")
    assert result.code == 0, result.err
    assert_same_run(reference, run)
