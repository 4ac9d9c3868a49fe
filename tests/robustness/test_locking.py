"""One writer per run (and grid) directory: a second train, resume or compare is refused
naming the holder's pid; report and eval on a directory being written warn that what they
read is partial; a lock left by a killed process is taken over (the system releases a
process's flock when it dies)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cli_harness import assert_refused, assert_unchanged, run_cli, snapshot
from tiny_runs import assert_same_run, config_dict, copy_run, train_finished, train_interrupted

from polytask.training.rundir import LOCK_NAME, DirectoryLock, lock_holder

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_finished(tmp_path_factory.mktemp("reference") / "run")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_interrupted(tmp_path_factory.mktemp("interrupted") / "run")


def _fork(body: Callable[[], Any]) -> int:
    """Run ``body`` in a forked child (exit 0 when it returns, 1 when it raises)."""
    pid = os.fork()
    if pid == 0:  # never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork()
            body()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _wait_for_holder(directory: Path, pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while lock_holder(directory) != pid:
        assert time.monotonic() < deadline, "the child never took the lock"
        done, _ = os.waitpid(pid, os.WNOHANG)
        assert not done, "the child ended before taking the lock"
        time.sleep(0.01)


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _hold(directory: Path, what: str = "run directory") -> int:
    """A child that holds the directory's lock until it is killed."""

    def body() -> None:
        DirectoryLock(directory, what).acquire()
        time.sleep(600)

    pid = _fork(body)
    _wait_for_holder(directory, pid)
    return pid


def test_a_second_resume_is_refused_while_the_first_runs(
    tmp_path: Path, reference: Path, interrupted: Path
) -> None:
    from polytask.api import resume

    run = copy_run(interrupted, tmp_path / "run")

    def slow_resume() -> None:
        resume(run, console=False, step_callbacks=[lambda info: time.sleep(0.25)])

    first = _fork(slow_resume)
    _wait_for_holder(run, first)
    second = run_cli("resume", run, "--quiet")
    assert_refused(second, str(run), f"process {first}", "being written")
    # a new run into it: refused too (it is not empty)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(config_dict(tmp_path / "runs")), encoding="utf-8")
    assert_refused(run_cli("train", config, "--run-dir", run), str(run))
    # eval reads a partial run: a warning, not a refusal
    evaluated = run_cli("eval", run, "--checkpoint", "last")
    assert evaluated.code == 0, evaluated.err
    assert f"polytask: warning: {run} is being written by process {first}" in evaluated.err
    assert "partial" in evaluated.err
    assert _exit_code(first) == 0
    assert lock_holder(run) is None
    assert (run / LOCK_NAME).read_text() == ""  # no holder any more
    assert_same_run(reference, run)
    # the first has finished: the second is now told so (and may read it without warning)
    assert_refused(run_cli("resume", run, "--quiet"), "already finished")
    reported = run_cli("report", run)
    assert reported.code == 0, reported.err
    assert "warning" not in reported.err


def test_resume_is_refused_while_another_process_holds_the_lock_then_works(
    tmp_path: Path, reference: Path, interrupted: Path
) -> None:
    run = copy_run(interrupted, tmp_path / "run")
    holder = _hold(run)
    try:
        before = snapshot(run)
        result = run_cli("resume", run, "--quiet")
        assert_refused(result, f"{run} is being written by process {holder}")
        assert_unchanged(before, run)
    finally:
        os.kill(holder, signal.SIGTERM)
        os.waitpid(holder, 0)
    result = run_cli("resume", run, "--quiet")
    assert result.code == 0, result.err
    assert_same_run(reference, run)


def test_report_on_a_run_being_written_warns(tmp_path: Path, reference: Path) -> None:
    run = copy_run(reference, tmp_path / "run")
    holder = _hold(run)
    try:
        result = run_cli("report", run)
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    assert result.code == 0, result.err
    warnings = [line for line in result.err.splitlines() if line.startswith("polytask: warning")]
    assert warnings == [
        f"polytask: warning: {run} is being written by process {holder}; what is read from "
        "it now is partial (a run in progress)."
    ]


def test_a_lock_left_by_a_killed_process_is_taken_over(
    tmp_path: Path, reference: Path, interrupted: Path
) -> None:
    run = copy_run(interrupted, tmp_path / "run")

    def die_holding_the_lock() -> None:
        DirectoryLock(run).acquire()
        os.kill(os.getpid(), signal.SIGKILL)  # no release, no clean-up

    pid = _fork(die_holding_the_lock)
    assert _exit_code(pid) == -signal.SIGKILL
    assert (run / LOCK_NAME).read_text().strip() == str(pid)  # the stale pid is still there
    assert lock_holder(run) is None  # but nobody holds the lock
    result = run_cli("resume", run, "--quiet")
    assert result.code == 0, result.err
    log = (run / "train.log").read_text(encoding="utf-8")
    assert f"took over {run / LOCK_NAME} from process {pid}" in log
    assert_same_run(reference, run)


def test_a_killed_resume_releases_its_lock(
    tmp_path: Path, reference: Path, interrupted: Path
) -> None:
    from polytask.api import resume

    run = copy_run(interrupted, tmp_path / "run")

    def killed_resume() -> None:
        def kill(info: Any) -> None:
            if info.global_step == 12:
                os.kill(os.getpid(), signal.SIGKILL)

        resume(run, console=False, step_callbacks=[kill])

    assert _exit_code(_fork(killed_resume)) == -signal.SIGKILL
    result = run_cli("resume", run, "--quiet")
    assert result.code == 0, result.err
    assert_same_run(reference, run)


def test_train_into_a_directory_being_written_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = _hold(run)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(config_dict(tmp_path / "runs")), encoding="utf-8")
    try:
        before = snapshot(run)
        result = run_cli("train", config, "--run-dir", run, "--quiet")
        assert_refused(result, str(run), f"process {holder}")
        assert_unchanged(before, run)
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    result = run_cli("train", config, "--run-dir", run, "--quiet")  # the holder is gone
    assert result.code == 0, result.err


def test_a_second_compare_is_refused(tmp_path: Path) -> None:
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
    grid_dir = tmp_path / "grids" / "g"
    grid_dir.mkdir(parents=True)
    holder = _hold(grid_dir, "grid directory")
    try:
        before = snapshot(tmp_path)
        result = run_cli("compare", grid, "--quiet")
        assert_refused(result, str(grid_dir), f"process {holder}", "polytask compare")
        assert_unchanged(before, tmp_path)
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    result = run_cli("compare", grid, "--quiet")
    assert result.code == 0, result.err
    assert (grid_dir / "a" / "seed-0" / "results.json").is_file()
