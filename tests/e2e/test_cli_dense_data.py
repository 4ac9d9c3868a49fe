"""NYUv2 / CityScapes folders through the real command line.

A damaged folder ends ``polytask train`` with exit code 2 and one ``polytask: error:`` line
that names the file, before anything is written; a valid tiny folder trains for one epoch
with MTAN-SegNet at a tiny width, with and without the augmentation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import dense_layout as dl
from helpers import assert_error, cli, snapshot

#: MTAN-SegNet at 1/16 of the reference width on 32 x 48 images: a second per epoch on a CPU.
RECIPE: dict[str, Any] = {
    "name": "nyu-tiny",
    "seed": 0,
    "data": {"name": "nyuv2", "options": {"root": "unset"}, "batch_size": 2},
    "model": {
        "architecture": "mtan",
        "backbone": "segnet",
        "backbone_options": {"width": 0.0625},
        "head": "segnet",
    },
    "optim": {"lr": 1e-4},
    "train": {"epochs": 1, "progress": False, "device": "cpu"},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny convolutions gain nothing from a second thread, and on a busy machine the
    spinning threads made each training test take 20-40 s instead of 3-6 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "nyu.yaml"
    path.write_text(yaml.safe_dump(RECIPE, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    earlier = tmp_path / "runs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("name: earlier\n", encoding="utf-8")
    return tmp_path / "runs"


@pytest.mark.parametrize(
    "case",
    ["missing root", "missing modality", "a truncated file", "a channels-first image"],
)
def test_a_damaged_folder_is_one_error_line_and_writes_nothing(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    recipe: Path,
    output_dir: Path,
    case: str,
) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu")
    path = dl.BREAKS[case](root)
    before = snapshot(output_dir)
    code, out, err = cli(
        capsys, "train", recipe, f"data.options.root={root}", f"output_dir={output_dir}"
    )
    assert_error(code, err, str(path), "expected", "found", "github.com/lorenmt/mtan", whole=True)
    assert out == ""
    assert snapshot(output_dir) == before


def test_cityscapes_missing_label_folder_through_the_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, recipe: Path, output_dir: Path
) -> None:
    root = dl.write_cityscapes(tmp_path / "city")
    for split in ("train", "val"):
        (root / split / "label_7").rename(root / split / "labels")
    before = snapshot(output_dir)
    code, _, err = cli(
        capsys,
        "train",
        recipe,
        "data.name=cityscapes",
        f"data.options.root={root}",
        f"output_dir={output_dir}",
    )
    assert_error(code, err, str(root / "train" / "label_7"), "labels", whole=True)
    assert snapshot(output_dir) == before


def test_bad_option_values_through_the_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, recipe: Path, output_dir: Path
) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu")
    for override, fragment in (
        ("data.options.val_size=4", "val_size"),
        ("data.options.augmnt=true", "augment"),
        ("data.options.metric_protocol=batch", "metric_protocol"),
    ):
        code, _, err = cli(
            capsys,
            "train",
            recipe,
            f"data.options.root={root}",
            override,
            f"output_dir={output_dir}",
        )
        assert_error(code, err, fragment, whole=True)


def test_a_missing_root_through_a_real_process(tmp_path: Path, recipe: Path) -> None:
    missing = tmp_path / "no-such-nyuv2"
    proc = subprocess.run(
        [sys.executable, "-m", "polytask", "train", str(recipe), f"data.options.root={missing}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert_error(proc.returncode, proc.stderr, str(missing), "downloads nothing", whole=True)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("augment", [False, True])
def test_one_epoch_of_mtan_segnet_on_a_generated_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, recipe: Path, augment: bool
) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu", train=4, val=3)
    run_dir = tmp_path / "run"
    code, _, err = cli(
        capsys,
        "train",
        recipe,
        f"data.options.root={root}",
        f"data.options.augment={str(augment).lower()}",
        "--run-dir",
        run_dir,
        "--quiet",
    )
    assert code == 0, err
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert results["tasks"] == ["semantic", "depth", "normal"]
    metrics = results["test"]["metrics"]
    assert set(metrics) == {"semantic", "depth", "normal"}
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert config["data"]["options"]["augment"] is augment
