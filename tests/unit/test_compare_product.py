"""Grid files with a cartesian product of axes: expansion, names, order, exclusion, errors,
and equality with the explicit cell lists the shipped grids used to have."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from polytask.compare import GridSpec, expand_cells, load_grid, read_grid_spec
from polytask.config import from_dict, to_dict
from polytask.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

#: the cells of configs/multimnist/multimnist-grid.yaml and multifashion-grid.yaml as they
#: were written before the grids used `product`, verbatim
EXPLICIT_CELLS = """
  single_task: {model.architecture: single_task}
  hps-equal: {model.architecture: hps, balancer.name: equal}
  hps-dwa: {model.architecture: hps, balancer.name: dwa}
  hps-uncertainty: {model.architecture: hps, balancer.name: uncertainty}
  hps-graddrop: {model.architecture: hps, balancer.name: graddrop}
  hps-pcgrad: {model.architecture: hps, balancer.name: pcgrad}
  hps-gradnorm: {model.architecture: hps, balancer.name: gradnorm}
  hps-cagrad: {model.architecture: hps, balancer.name: cagrad}
  hps-upgrad: {model.architecture: hps, balancer.name: upgrad}
  hps-gradvac: {model.architecture: hps, balancer.name: gradvac}
  hps-nash_mtl: {model.architecture: hps, balancer.name: nash_mtl}
  hps-imtl_g: {model.architecture: hps, balancer.name: imtl_g}
  hps-mgda: {model.architecture: hps, balancer.name: mgda}
  hps-aligned_mtl: {model.architecture: hps, balancer.name: aligned_mtl}
  hps-famo: {model.architecture: hps, balancer.name: famo}
  hps-gls: {model.architecture: hps, balancer.name: gls}
  hps-rlw: {model.architecture: hps, balancer.name: rlw}
  cross_stitch-equal: {model.architecture: cross_stitch, balancer.name: equal}
  cross_stitch-dwa: {model.architecture: cross_stitch, balancer.name: dwa}
  cross_stitch-uncertainty: {model.architecture: cross_stitch, balancer.name: uncertainty}
  cross_stitch-graddrop: {model.architecture: cross_stitch, balancer.name: graddrop}
  cross_stitch-pcgrad: {model.architecture: cross_stitch, balancer.name: pcgrad}
  cross_stitch-gradnorm: {model.architecture: cross_stitch, balancer.name: gradnorm}
  cross_stitch-cagrad: {model.architecture: cross_stitch, balancer.name: cagrad}
  cross_stitch-upgrad: {model.architecture: cross_stitch, balancer.name: upgrad}
  cross_stitch-gradvac: {model.architecture: cross_stitch, balancer.name: gradvac}
  cross_stitch-nash_mtl: {model.architecture: cross_stitch, balancer.name: nash_mtl}
  cross_stitch-imtl_g: {model.architecture: cross_stitch, balancer.name: imtl_g}
  cross_stitch-mgda: {model.architecture: cross_stitch, balancer.name: mgda}
  cross_stitch-aligned_mtl: {model.architecture: cross_stitch, balancer.name: aligned_mtl}
  cross_stitch-famo: {model.architecture: cross_stitch, balancer.name: famo}
  cross_stitch-gls: {model.architecture: cross_stitch, balancer.name: gls}
  cross_stitch-rlw: {model.architecture: cross_stitch, balancer.name: rlw}
  mtan-equal: {model.architecture: mtan, balancer.name: equal}
  mtan-dwa: {model.architecture: mtan, balancer.name: dwa}
  mtan-uncertainty: {model.architecture: mtan, balancer.name: uncertainty}
  mtan-graddrop: {model.architecture: mtan, balancer.name: graddrop}
  mtan-pcgrad: {model.architecture: mtan, balancer.name: pcgrad}
  mtan-gradnorm: {model.architecture: mtan, balancer.name: gradnorm}
  mtan-cagrad: {model.architecture: mtan, balancer.name: cagrad}
  mtan-upgrad: {model.architecture: mtan, balancer.name: upgrad}
  mtan-gradvac: {model.architecture: mtan, balancer.name: gradvac}
  mtan-nash_mtl: {model.architecture: mtan, balancer.name: nash_mtl}
  mtan-imtl_g: {model.architecture: mtan, balancer.name: imtl_g}
  mtan-mgda: {model.architecture: mtan, balancer.name: mgda}
  mtan-aligned_mtl: {model.architecture: mtan, balancer.name: aligned_mtl}
  mtan-famo: {model.architecture: mtan, balancer.name: famo}
  mtan-gls: {model.architecture: mtan, balancer.name: gls}
  mtan-rlw: {model.architecture: mtan, balancer.name: rlw}
"""


def _spec(**raw: Any) -> GridSpec:
    return from_dict(GridSpec, {"name": "g", **raw}, "grid")


AXES = {
    "arch": {"hps": {"model.architecture": "hps"}, "mtan": {"model.architecture": "mtan"}},
    "method": {
        "equal": {"balancer.name": "equal"},
        "dwa": None,
        "pcgrad": {"balancer.name": "pcgrad"},
    },
}


def test_product_names_order_and_overrides() -> None:
    cells = expand_cells(
        _spec(cells={"single_task": {"model.architecture": "single_task"}}, product=AXES)
    )
    assert list(cells) == [
        "single_task",
        "hps-equal",
        "hps-dwa",
        "hps-pcgrad",
        "mtan-equal",
        "mtan-dwa",
        "mtan-pcgrad",
    ]
    assert cells["mtan-pcgrad"] == {"model.architecture": "mtan", "balancer.name": "pcgrad"}
    assert cells["hps-dwa"] == {"model.architecture": "hps"}  # a null level: no overrides
    assert cells["single_task"] == {"model.architecture": "single_task"}


def test_three_axes_and_a_single_level_axis() -> None:
    cells = expand_cells(
        _spec(
            product={
                "a": {"x": {"k1": 1}, "y": {"k1": 2}},
                "b": {"only": {"k2": 0}},
                "c": {"p": {"k3": "p"}, "q": {"k3": "q"}},
            }
        )
    )
    assert list(cells) == ["x-only-p", "x-only-q", "y-only-p", "y-only-q"]
    assert cells["y-only-q"] == {"k1": 2, "k2": 0, "k3": "q"}


def test_exclude_by_name_and_pattern() -> None:
    cells = expand_cells(_spec(product=AXES, exclude=["mtan-*", "hps-dwa"]))
    assert list(cells) == ["hps-equal", "hps-pcgrad"]
    # exclusion never touches the listed cells, which come first
    cells = expand_cells(
        _spec(cells={"hps-x": {}}, product=AXES, exclude=["hps-*"]),
    )
    assert list(cells) == ["hps-x", "mtan-equal", "mtan-dwa", "mtan-pcgrad"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"product": {"arch": {}}}, "product axis 'arch' needs at least one level"),
        ({"product": {"arch": None}}, "product axis 'arch' needs at least one level"),
        ({"product": {"arch": ["hps", "mtan"]}}, "product axis 'arch' needs at least one level"),
        ({"product": {"arch": {"hps-x": {}}}}, "level 'hps-x' of product axis 'arch'"),
        ({"product": {"a-b": {"x": {}}}}, "product axis name 'a-b'"),
        ({"product": {"arch": {"hps": "hps"}}}, "product.arch.hps: expected a mapping"),
        (
            {"product": {"a": {"x": {"seed": 1}}, "b": {"y": {"seed": 2}}}},
            "levels 'a.x' and b.y both set 'seed'",
        ),
        (
            {"cells": {"hps-equal": {}}, "product": AXES},
            "product cell 'hps-equal' is also listed in `cells`",
        ),
        ({"product": AXES, "exclude": ["hps-equal", "stl-*"]}, "exclude pattern 'stl-\\*'"),
        ({"cells": {"a": {}}, "exclude": ["a"]}, "`exclude` needs a `product`"),
        ({"product": AXES, "exclude": ["*"]}, "the grid has no cell"),
        ({}, "the grid has no cell"),
        ({"cells": {"a b": {}}}, "cell name 'a b'"),
    ],
)
def test_errors(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        expand_cells(_spec(**raw))


def test_unknown_grid_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "prodcut": AXES}), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown key 'grid.prodcut'.*product"):
        read_grid_spec(path)


def test_load_grid_validates_product_cells_and_baseline(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    spec = {"name": "g", "baseline": "hps-equal", "product": AXES}
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    loaded, configs = load_grid(path)
    assert list(configs) == list(loaded.cells) == list(expand_cells(_spec(product=AXES)))
    assert configs["mtan-pcgrad"].model.architecture == "mtan"
    assert configs["mtan-pcgrad"].balancer.name == "pcgrad"
    spec["baseline"] = "single_task"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    with pytest.raises(ConfigError, match="baseline 'single_task' is not a cell"):
        load_grid(path)
    spec.update(baseline=None, product={"arch": {"x": {"model.nope": 1}}})
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"cell 'x'.*model\.nope"):
        load_grid(path)


@pytest.mark.parametrize("grid", ["multimnist-grid.yaml", "multifashion-grid.yaml"])
def test_rewritten_grids_equal_their_explicit_form(grid: str, tmp_path: Path) -> None:
    """The shipped grids written with `product` give exactly the cells (names, order and full
    configurations) of the explicit lists they replaced."""
    path = ROOT / "configs" / "multimnist" / grid
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert "product" in raw, "the grid is no longer written with a product"
    explicit = {k: v for k, v in raw.items() if k not in ("cells", "product", "exclude")}
    explicit["base"] = str(path.parent / raw["base"])
    explicit["cells"] = yaml.safe_load("cells:" + EXPLICIT_CELLS)["cells"]
    explicit_path = tmp_path / grid
    explicit_path.write_text(yaml.safe_dump(explicit, sort_keys=False), encoding="utf-8")
    spec, configs = load_grid(path)
    reference_spec, reference = load_grid(explicit_path)
    assert len(configs) == 49
    assert list(configs) == list(reference)  # names and order
    assert spec.cells == reference_spec.cells  # overrides
    for cell in configs:
        assert to_dict(configs[cell]) == to_dict(reference[cell]), cell
    for key in ("name", "seeds", "baseline", "delta_m", "protocol", "output_dir", "config"):
        assert getattr(spec, key) == getattr(reference_spec, key)


def test_the_documented_example_gives_the_documented_cells() -> None:
    """docs/cli.md's product example and the cells it says it gives."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = text[text.index("### Cartesian products") :]
    example = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert example is not None
    said = re.search(r"gives the cells (.*?), in that order", section, re.S)
    assert said is not None
    names = re.findall(r"`([^`]+)`", said.group(1))
    raw = yaml.safe_load(example.group(1))
    raw.pop("base")
    assert list(expand_cells(from_dict(GridSpec, raw, "grid"))) == names
