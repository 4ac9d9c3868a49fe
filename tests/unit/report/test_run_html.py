"""The run report as a page: escaping, unfinished runs, and a report that must not fail a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import polytask
from helpers import tiny_config_dict
from polytask.report.html import Raw, esc, table_html
from polytask.report.run_html import write_run_html
from polytask.training.rundir import RunDirectory


def test_strings_are_escaped_and_raw_markup_is_not() -> None:
    assert esc('<b a="1">&') == "&lt;b a=&quot;1&quot;&gt;&amp;"
    table = table_html(["<h>"], [["<c>"], [Raw("<a href='x'>ok</a>")]])
    assert "<th>&lt;h&gt;</th>" in table and '<td class="text">&lt;c&gt;</td>' in table
    assert "<td class=\"text\"><a href='x'>ok</a></td>" in table
    numbers = table_html(["n"], [["+1.5"], ["-"], ["-0.25"], [".5"], ["2,020"]])
    assert 'class="text"' not in numbers


def test_an_unfinished_run_gets_a_report_saying_so(tmp_path: Path) -> None:
    config = tiny_config_dict(tmp_path, name="odd <name>")
    run = RunDirectory.create(tmp_path / "run <&>", config)
    page = write_run_html(run, strict=True).read_text(encoding="utf-8")
    assert "Training has not finished" in page
    assert "No epoch has been logged yet" in page
    # the folder does not start with the config's name (as a grid's seed-0): both are named
    assert "<title>Run odd &lt;name&gt; (run &lt;&amp;&gt;)</title>" in page
    assert "odd <name>" not in page
    named = RunDirectory.create(tmp_path / "odd <name>-20261204", config)
    page = write_run_html(named, strict=True).read_text(encoding="utf-8")
    assert "<title>Run odd &lt;name&gt;-20261204</title>" in page


def test_a_failing_report_does_not_fail_a_finished_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polytask.report as report

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(report, "write_run_report", broken)
    config = tiny_config_dict(tmp_path, **{"train.epochs": 1, "data.options.n_train": 64})
    run, results = polytask.train(config, run_dir=tmp_path / "run", console=False)
    assert results["test"]["metrics"]["left"]["accuracy"] >= 0
    assert run.read_results() is not None
    log = (run.path / "train.log").read_text(encoding="utf-8")
    assert "the report could not be written (RuntimeError: the disk is full)" in log
    assert "finished: results in" in log
