"""Plugins without environment tricks: a recipe's plugin beside it, run, evaluated and resumed
from other working directories with no PYTHONPATH; installed entry points."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polytask.config import load_config, to_dict
from polytask.errors import ConfigError
from polytask.training import build

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PLUGIN = """\
from polytask.models import BACKBONES
from polytask.models.backbones import MLP

BACKBONES.register("plugin_paths_mlp")(MLP)
"""


def _polytask(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "polytask", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "plugin_paths_components.py").write_text(PLUGIN, encoding="utf-8")
    recipe = yaml.safe_load((CONFIGS / "multidigits.yaml").read_text(encoding="utf-8"))
    recipe["plugins"] = ["plugin_paths_components"]
    recipe["model"]["backbone"] = "plugin_paths_mlp"
    recipe["model"]["backbone_options"] = {}
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return project


def test_a_plugin_beside_its_recipe_trains_evaluates_and_resumes_from_elsewhere(
    tmp_path: Path,
) -> None:
    project = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    tiny = [
        "train.epochs=1",
        "data.options.n_train=100",
        "data.options.n_val=40",
        "data.options.n_test=40",
        "train.progress=false",
    ]
    proc = _polytask(
        ["train", str(project / "recipe.yaml"), *tiny, "--quiet", "--run-dir", str(run)], elsewhere
    )
    assert proc.returncode == 0, proc.stderr
    recorded = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert recorded["plugin_paths"] == [str(project.resolve())]
    other = tmp_path / "other"
    other.mkdir()
    proc = _polytask(["eval", str(run), "--split", "val"], other)
    assert proc.returncode == 0, proc.stderr
    (run / "results.json").unlink()  # an unfinished run: resume rebuilds it from config.yaml
    proc = _polytask(["resume", str(run)], other)
    assert proc.returncode == 0, proc.stderr
    assert (run / "results.json").is_file()


def test_without_the_recipe_folder_the_plugin_is_not_found_and_the_message_says_where(
    tmp_path: Path,
) -> None:
    project = _project(tmp_path)
    data = yaml.safe_load((project / "recipe.yaml").read_text(encoding="utf-8"))
    data["plugins"] = ["plugin_paths_nowhere"]
    (project / "recipe.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    proc = _polytask(["train", str(project / "recipe.yaml"), "--quiet"], tmp_path)
    assert proc.returncode == 2
    assert "cannot import 'plugin_paths_nowhere'" in proc.stderr
    assert str(project.resolve()) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plugin_paths_are_absolute_and_relative_to_the_recipe(tmp_path: Path) -> None:
    project = _project(tmp_path)
    data = yaml.safe_load((project / "recipe.yaml").read_text(encoding="utf-8"))
    data["plugin_paths"] = ["lib", "../shared"]
    (project / "recipe.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    config = load_config(project / "recipe.yaml")
    root = project.resolve()
    assert config.plugin_paths == [str(root / "lib"), str(root.parent / "shared"), str(root)]
    # a recipe without plugins records nothing; a mapping is taken as given
    assert load_config(CONFIGS / "multidigits.yaml").plugin_paths == []
    assert to_dict(load_config({"plugin_paths": ["x"]}))["plugin_paths"] == ["x"]


def test_installed_entry_points_are_imported_and_a_broken_one_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded: list[str] = []

    class Entry:
        def __init__(self, name: str, fail: bool) -> None:
            self.name, self.value, self.fail = name, f"pkg.{name}", fail

        def load(self) -> None:
            if self.fail:
                raise ImportError("no module named pkg")
            loaded.append(self.name)

    def entry_points(group: str) -> list[Entry]:
        assert group == "polytask.plugins"
        return [Entry("good", False)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    build._load_entry_points.cache_clear()
    build._load_plugins()
    build._load_plugins()
    assert loaded == ["good"]  # once per process
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Entry("bad", True)])
    build._load_entry_points.cache_clear()
    with pytest.raises(ConfigError, match=r"installed plugin 'bad' \(pkg\.bad\) failed to load"):
        build._load_plugins()
    build._load_entry_points.cache_clear()  # the next caller scans the real entry points
