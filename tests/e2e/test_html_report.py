"""The HTML reports of tiny runs and a tiny grid, opened from disk in headless Chromium.

Each page must show every expected section, load every image (``naturalWidth > 0``), log
no console error, and make no request outside the page (every request that is not a
``file:`` or ``data:`` URL is recorded and refused). A screenshot of each page is taken.
Needs Playwright and Chromium (``/usr/bin/chromium``, or the path in ``POLYTASK_CHROMIUM``);
CI installs both.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from helpers import cli
from polytask.cli import main

CHROMIUM = Path(os.environ.get("POLYTASK_CHROMIUM", "/usr/bin/chromium"))
ROOT = Path(__file__).resolve().parents[2]
MULTIDIGITS = ROOT / "configs" / "multidigits.yaml"
SCENES = ROOT / "configs" / "scenes" / "mtan-paper-cpu.yaml"

DIGITS = [
    "train.epochs=2",
    "train.progress=false",
    "data.options.n_train=64",
    "data.options.n_val=32",
    "data.options.n_test=32",
    "data.batch_size=16",
    "model.backbone_options.channels=[8,8]",
    "model.backbone_options.out_features=16",
]
ROOMS = [
    "train.epochs=2",
    "data.options.n_train=8",
    "data.options.n_val=4",
    "data.options.n_test=4",
    "data.options.height=32",
    "data.options.width=32",
    "data.batch_size=4",
    "model.backbone_options.width=0.0625",
    "train.selection.last_n=2",  # the recipe's mean over the last epochs, here 2 of 2
]
#: run -> (recipe, overrides, the figures its report must show)
RUNS: dict[str, tuple[Path, list[str], int]] = {
    # curves, task weights, gradient norms, gradient cosines
    "hps-pcgrad": (MULTIDIGITS, [*DIGITS, "balancer.name=pcgrad"], 4),
    # curves, task weights, expert gates
    "mmoe-uncertainty": (
        MULTIDIGITS,
        [*DIGITS, "model.architecture=mmoe", "balancer.name=uncertainty"],
        3,
    ),
    # curves, sorted alphas, alphas over epochs
    "cross_stitch-equal": (SCENES, [*ROOMS, "model.architecture=cross_stitch"], 3),
    # curves, attention masks of two samples
    "mtan-equal": (SCENES, [*ROOMS, "model.architecture=mtan"], 3),
}
RUN_SECTIONS = [
    "results",
    "per-class",
    "curves",
    "task-weights",
    "gradients",
    "architecture",
    "configuration",
]
GRID_SECTIONS = ["results", "delta-m", "trade-off", "robustness", "cost", "runs"]
EXTERNAL = re.compile(r"(?i)(?:https?|ftp|wss?):|src=[\"']//|href=[\"']//|url\(")


def run_cli(*args: object) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    assert code == 0, err.getvalue()


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the HTML report tests need Playwright (pip install playwright)",
    )
    if not CHROMIUM.is_file():
        pytest.skip(f"the HTML report tests need Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    paths = {}
    for name, (recipe, overrides, _) in RUNS.items():
        paths[name] = root / name
        run_cli("train", recipe, *overrides, "--run-dir", paths[name], "--quiet")
    return paths


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grid")
    spec = {
        "name": "tiny",
        "output_dir": str(root / "runs"),
        "base": str(MULTIDIGITS),
        "config": {
            key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in DIGITS)
        },
        "seeds": [0, 1],
        "baseline": "single_task",
        "cells": {
            "single_task": {"model.architecture": "single_task"},
            "hps-equal": {"model.architecture": "hps"},
            "hps-dwa": {"model.architecture": "hps", "balancer.name": "dwa"},
            "mmoe-equal": {"model.architecture": "mmoe"},
        },
    }
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    run_cli("compare", path, "--quiet")
    grid_dir = root / "runs" / "tiny"
    run_cli("report", grid_dir)  # writes report.html until compare does it itself
    return grid_dir


def check_page(browser: Any, path: Path, sections: list[str], images: int, shot: Path) -> str:
    """Open ``path`` from disk; return its text after checking the page (see the module)."""
    text = path.read_text(encoding="utf-8")
    assert not EXTERNAL.search(text), EXTERNAL.search(text)
    assert 'class="figure-error"' not in text, re.findall(r'figure-error">[^<]*', text)
    page = browser.new_page()
    outside: list[str] = []
    errors: list[str] = []

    def route(request_route: Any) -> None:
        url = request_route.request.url
        if url.startswith(("file:", "data:")):
            request_route.continue_()
        else:
            outside.append(url)
            request_route.abort()

    page.route("**/*", route)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(path.as_uri(), wait_until="load")
    page.screenshot(path=str(shot), full_page=True)
    found = page.eval_on_selector_all("section", "els => els.map(e => e.id)")
    loaded = page.eval_on_selector_all(
        "img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])"
    )
    page.close()
    assert outside == [], outside
    assert errors == [], errors
    for section in sections:
        assert section in found, (section, found)
    assert len(loaded) == images, loaded
    assert all(done and w > 0 and h > 0 for done, w, h in loaded), loaded
    assert shot.stat().st_size > 10_000
    return text


@pytest.mark.parametrize("name", list(RUNS))
def test_run_report_opens_from_disk_with_every_figure(
    browser: Any, runs: dict[str, Path], name: str, tmp_path: Path
) -> None:
    # per-class tables exist for segmentation tasks (Scenes), not for digit classes
    sections = [s for s in RUN_SECTIONS if s != "per-class" or RUNS[name][0] == SCENES]
    text = check_page(
        browser, runs[name] / "report.html", sections, RUNS[name][2], tmp_path / "page.png"
    )
    assert (runs[name] / "report.md").is_file()
    if name.startswith("mtan"):
        assert text.count("<figcaption>MTAN attention") == 2
    if name.startswith("cross_stitch"):
        assert "Cross-stitch units (Misra et al. 2016" in text


def test_report_command_rewrites_a_run_report(
    capsys: pytest.CaptureFixture[str], runs: dict[str, Path], tmp_path: Path
) -> None:
    run = shutil.copytree(runs["mtan-equal"], tmp_path / "copy")
    original = (run / "report.html").read_text(encoding="utf-8")
    (run / "report.html").unlink()
    code, out, err = cli(capsys, "report", run)
    assert code == 0, err
    assert out.splitlines() == [f"written: {run / 'report.md'}", f"written: {run / 'report.html'}"]
    again = (run / "report.html").read_text(encoding="utf-8")
    assert again.replace("copy", "mtan-equal") == original.replace("copy", "mtan-equal")


def test_grid_report_opens_from_disk_with_every_figure(
    browser: Any, grid: Path, tmp_path: Path
) -> None:
    text = check_page(browser, grid / "report.html", GRID_SECTIONS, 4, tmp_path / "grid.png")
    for cell in ("single_task", "hps-equal", "hps-dwa", "mmoe-equal"):
        for seed in (0, 1):
            link = f'href="{cell}/seed-{seed}/report.html"'
            assert link in text, link
            assert (grid / cell / f"seed-{seed}" / "report.html").is_file()
    # robustness: hps was trained with two balancers (from the runs' config.yaml)
    assert '<td class="text">hps</td><td>2</td>' in text
