"""The harness agrees with a fresh ``python -m polytask`` and notices what it must notice."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_harness import (
    assert_refused,
    assert_unchanged,
    run_cli,
    run_cli_subprocess,
    snapshot,
    write,
)


def test_forked_and_fresh_processes_answer_alike(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    forked = run_cli("train", missing, cwd=tmp_path)
    fresh = run_cli_subprocess("train", missing, cwd=tmp_path)
    assert forked == fresh
    assert_refused(forked, "config file not found", str(missing))


def test_a_traceback_or_a_second_line_is_caught(tmp_path: Path) -> None:
    result = run_cli("train", tmp_path / "missing.yaml")
    with pytest.raises(AssertionError, match="exit code"):
        assert_refused(result, code=3)
    with pytest.raises(AssertionError, match="not in"):
        assert_refused(result, "some other words")


def test_snapshots_see_added_changed_and_removed_files(tmp_path: Path) -> None:
    write(tmp_path / "a" / "b.txt", "one")
    before = snapshot(tmp_path)
    assert_unchanged(before, tmp_path)
    write(tmp_path / "a" / "b.txt", "two")
    with pytest.raises(AssertionError, match="changed"):
        assert_unchanged(before, tmp_path)
