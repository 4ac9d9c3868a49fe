"""Every shipped recipe and grid: valid, and each grid cell trains one step end to end.

The paper protocols (NYUv2, CityScapes) run on folders generated in exactly the published
layout, at a tiny width and image size; only the sizes are overridden, so what is checked is
the recipes' own architecture, balancing, schedule and selection settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import dense_layout as dl
from polytask.compare import load_grid
from polytask.config import Config, load_config, to_dict
from polytask.training.build import build_components
from polytask.training.rundir import RunDirectory
from polytask.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: every grid file, the demo's (`make demo`) included
GRIDS = sorted([*CONFIGS.rglob("*-grid.yaml"), CONFIGS / "demo.yaml"])
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if p not in GRIDS)

#: one step at 1/16 width on 32 x 48 images: the recipes' own settings, only smaller
TINY = [
    "train.epochs=1",
    "train.selection.last_n=1",
    "train.progress=false",
    "data.batch_size=2",
    "data.num_workers=0",
]
#: the dense-prediction recipes' SegNet at 1/16 width
NARROW = ["model.backbone_options.width=0.0625"]


def _data_overrides(dataset: str, tmp: Path) -> list[str]:
    if dataset == "nyuv2":
        root = tmp / "nyuv2"
        if not root.exists():
            dl.write_nyuv2(root, train=2, val=2)
        return [*NARROW, f"data.options.root={root}"]
    if dataset == "cityscapes":
        root = tmp / "cityscapes"
        if not root.exists():
            dl.write_cityscapes(root, train=2, val=2)
        return [*NARROW, f"data.options.root={root}"]
    if dataset == "scenes":
        return [
            *NARROW,
            "data.options.n_train=2",
            "data.options.n_val=2",
            "data.options.n_test=2",
            "data.options.height=32",
            "data.options.width=48",
        ]
    if dataset == "decathlon":
        return ["data.options.n_train=4", "data.options.n_val=2", "data.options.n_test=2"]
    if dataset in ("solarflare", "penguins"):
        return ["data.batch_size=256"]  # the real tables, in a few batches
    if dataset == "yeast":
        return ["data.batch_size=1024"]  # the real table (2,417 genes), in a few batches
    if dataset in ("multimnist", "multifashion", "multifashion_mnist"):
        return ["data.options.n_train=4", "data.options.n_val=2", "data.options.n_test=2"]
    if dataset == "qm9":  # 20 molecules of the default cache (parsed once, ~1.5 min)
        return ["data.options.subset=20", "data.batch_size=10"]
    raise AssertionError(f"no test data for {dataset}")


def _dataset(path: Path) -> str:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    base = raw.get("base")
    if base is not None:
        raw = yaml.safe_load((path.parent / base).read_text(encoding="utf-8"))
    return str(raw["data"]["name"])


def test_every_paper_protocol_has_a_grid() -> None:
    names = {p.relative_to(CONFIGS).as_posix() for p in GRIDS}
    assert {
        "nyuv2/mtan-paper-grid.yaml",
        "nyuv2/cagrad-protocol-grid.yaml",
        "cityscapes/mtan-paper-grid.yaml",
        "cityscapes/cagrad-protocol-grid.yaml",
        "scenes/mtan-paper-cpu-grid.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_recipe_validates_and_names_its_protocol(path: Path) -> None:
    load_config(path)  # every key known and typed
    header = path.read_text(encoding="utf-8").split("\nname:")[0]
    assert "Protocol" in header or "protocol" in header or path.parent == CONFIGS


#: grids with the cells of another grid that trains them all, on other data: here every cell
#: is validated and built, and one cell per architecture trains (the data is what differs)
SAME_CELLS_AS = {
    "multimnist/multifashion-grid.yaml": "multimnist/multimnist-grid.yaml",
    "multimnist/multifashion-mnist-grid.yaml": "multimnist/multimnist-grid.yaml",
}


def _cell_setup(config: Config) -> tuple[object, object]:
    full = to_dict(config)
    return full["model"], full["balancer"]


def _one_per_architecture(configs: dict[str, Config]) -> list[str]:
    chosen: dict[str, str] = {}
    for cell, config in configs.items():
        chosen.setdefault(config.model.architecture, cell)
    return list(chosen.values())


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_grid_cells_train_one_step(
    grid: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polytask.report

    # the reports are checked by the report tests; here they would only cost time
    monkeypatch.setattr(polytask.report, "write_run_report", lambda run: None)
    overrides = TINY + _data_overrides(_dataset(grid), tmp_path)
    spec, configs = load_grid(grid, overrides)
    assert spec.protocol, "a paper grid names its protocol"
    assert spec.baseline in spec.cells
    name = grid.relative_to(CONFIGS).as_posix()
    if name in SAME_CELLS_AS:
        _, reference = load_grid(CONFIGS / SAME_CELLS_AS[name], overrides)
        assert {c: _cell_setup(v) for c, v in configs.items()} == {
            c: _cell_setup(v) for c, v in reference.items()
        }
        for config in configs.values():
            build_components(config)
        configs = {c: configs[c] for c in _one_per_architecture(configs)}
    for cell, config in configs.items():
        config.output_dir = str(tmp_path / "runs")
        run = RunDirectory.create(tmp_path / "runs" / cell, to_dict(config))
        results = Trainer(build_components(config), run, console=False).fit()
        assert results["test"]["metrics"], cell
        assert run.read_metrics()[0]["epoch"] == 0


@pytest.mark.parametrize(("val_size", "warned"), [(0, True), (1, False)])
def test_choosing_the_epoch_on_the_test_split_is_warned(
    tmp_path: Path, val_size: int, warned: bool
) -> None:
    overrides = [
        *TINY,
        *_data_overrides("nyuv2", tmp_path),
        f"data.options.val_size={val_size}",
        "data.options.limit=2",
        "train.selection.protocol=best",
        "train.selection.last_n=1",
    ]
    config = load_config(CONFIGS / "nyuv2" / "mtan-paper.yaml", overrides)
    run = RunDirectory.create(tmp_path / "run", to_dict(config))
    Trainer(build_components(config), run, console=False).fit()
    log = (run.path / "train.log").read_text(encoding="utf-8")
    assert ("the epoch is chosen on the test split" in log) is warned


def test_a_test_split_that_validates_is_evaluated_once_per_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polytask.training.trainer as trainer_module

    calls: list[int] = []
    original = trainer_module.evaluate

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer_module, "evaluate", counting)
    overrides = [
        *TINY,
        *_data_overrides("nyuv2", tmp_path),
        "train.epochs=2",
        "train.selection.last_n=2",
    ]
    config = load_config(CONFIGS / "nyuv2" / "cagrad-protocol.yaml", overrides)
    config.eval.baseline = None
    run = RunDirectory.create(tmp_path / "run", to_dict(config))
    results = Trainer(build_components(config), run, console=False).fit()
    assert len(calls) == 2  # one evaluation per epoch, not two
    assert results["test"] == results["val"]
    records = run.read_metrics()
    assert all(r["test"] == r["val"] for r in records)
