"""Comparison grids: several configurations x seeds, a results table with Delta_m.

A grid file is YAML::

    name: demo                      # the grid directory is OUTPUT_DIR/NAME
    output_dir: runs
    base: multidigits.yaml          # a recipe (path relative to the grid file), optional
    config: {train.epochs: 8}       # dotted overrides on top of the base, optional
    seeds: [0, 1]
    baseline: single_task           # the cell whose test results are the Delta_m baseline
    delta_m: metric_mean            # or task_mean
    protocol: "..."                 # the named protocol and where it comes from (tables say it)
    cells:                          # cells listed one by one
      single_task: {model.architecture: single_task}
    product:                        # and/or every combination of one level per axis
      architecture:                 # axis -> {level: overrides}
        hps: {model.architecture: hps}
        mtan: {model.architecture: mtan}
      method:
        equal: {balancer.name: equal}
        dwa: {balancer.name: dwa}
    exclude: [mtan-dwa]             # product cells left out (names or shell patterns)

The product's cells are named by their levels joined by ``-`` (``hps-equal``), first axis
outermost, and come after the listed ``cells``.

Every (cell, seed) is one run directory ``GRID_DIR/CELL/seed-K``. Running the grid again
skips finished runs and resumes interrupted ones, so a grid can be extended cell by cell.
Results (every metric as mean ± std over seeds, Delta_m, each cell's mean rank over the
metric columns, training time, parameters) go to ``GRID_DIR/results.md``, ``results.csv``,
``results.json`` and the baseline
derived from the baseline cell to ``GRID_DIR/baseline.json``. Where the runs have a
segmentation task with per-class results, ``results.md`` also has the per-class IoU gain of
every cell over the baseline cell against the class's share of training pixels (the
cross-stitch paper's data-starved-class analysis).

Under ``torchrun`` (``torchrun --nproc-per-node N -m polytask compare GRID``) every run of
the grid is trained by all N processes in turn (see docs/distributed.md); rank 0 alone takes
the grid's lock, decides which runs to skip, resume or train, and writes the runs, the
summary and the report.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import functools
import io
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from ._meta import package_version
from .config import (
    Config,
    anchor_plugin_paths,
    apply_overrides,
    from_dict,
    load_config,
    parse_overrides,
    read_yaml,
    to_dict,
)
from .errors import ConfigError
from .fsio import guard, make_dir, write_atomic
from .metrics.decathlon import decathlon_score
from .metrics.delta_m import Baseline, delta_m, delta_m_higher_is_better
from .report.tables import fitted_table, format_value, markdown_table, results_columns
from .training.build import build_components
from .training.distributed import Distributed, check_batch_size, init_from_environment
from .training.rundir import LOCK_NAME, DirectoryLock, RunDirectory, check_path_component
from .training.trainer import Trainer

__all__ = [
    "GridSpec",
    "expand_cells",
    "grid_tasks",
    "load_grid",
    "mean_ranks",
    "read_grid_spec",
    "run_grid",
    "summarize_grid",
    "verdict_sentence",
]


@dataclass
class GridSpec:
    """A validated grid file."""

    name: str
    #: cells listed one by one: name -> dotted overrides
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: cells as a cartesian product: axis -> {level: dotted overrides}; see expand_cells
    product: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: product cells left out: names or shell patterns (``single_task-*``)
    exclude: list[str] = field(default_factory=list)
    output_dir: str = "runs"
    base: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: str | None = None
    delta_m: Literal["metric_mean", "task_mean"] = "metric_mean"
    #: the protocol's name and where it comes from; every results table names it
    protocol: str | None = None
    #: also score every cell with the decathlon score (Rebuffi et al. 2017) of its tasks'
    #: accuracies against the baseline cell's (see polytask.metrics.decathlon_score)
    decathlon_score: bool = False


_NAME_CHARS = frozenset("_-.")


def _check_overrides(value: Any, where: str) -> dict[str, Any]:
    """A cell's or a level's overrides: a mapping of dotted keys (null: none)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of dotted overrides, found {value!r}.")
    for key in value:
        if not isinstance(key, str) or not key:
            raise ConfigError(
                f"{where}: expected dotted keys such as model.architecture, found {key!r}."
            )
    return dict(value)


def expand_cells(spec: GridSpec, where: str = "grid") -> dict[str, dict[str, Any]]:
    """Every cell of a grid, in order: the listed ``cells``, then the ``product`` cells
    that ``exclude`` leaves.

    A product cell takes one level of every axis (the first axis outermost, levels in the
    order written); its name is the level names joined by ``-`` and its overrides are the
    levels' overrides together. Errors: an axis without levels, a level or axis name with
    characters other than letters, digits, ``_`` and ``.``, two axes of one cell setting the
    same key, a name made twice or also listed in ``cells``, an ``exclude`` pattern that
    matches no product cell, and a grid without any cell.
    """
    cells: dict[str, dict[str, Any]] = {}
    for name, overrides in spec.cells.items():
        if (
            not isinstance(name, str)
            or not name
            or not all(c.isalnum() or c in _NAME_CHARS for c in name)
        ):
            raise ConfigError(
                f"{where}: cell name {name!r} may use letters, digits, '_', '-', '.'."
            )
        cells[name] = _check_overrides(overrides, f"{where}: cell {name!r}")
    axes: list[list[tuple[str, dict[str, Any]]]] = []
    for axis, levels in spec.product.items():
        if not axis or not all(c.isalnum() or c in "_." for c in axis):
            raise ConfigError(
                f"{where}: product axis name {axis!r} may use letters, digits, '_' and '.'."
            )
        if not isinstance(levels, dict) or not levels:
            raise ConfigError(
                f"{where}: product axis {axis!r} needs at least one level "
                f"(a mapping level name -> overrides), found {levels!r}."
            )
        axis_levels = []
        for level, overrides in levels.items():
            if (
                not isinstance(level, str)
                or not level
                or not all(c.isalnum() or c in "_." for c in level)
            ):
                raise ConfigError(
                    f"{where}: level {level!r} of product axis {axis!r} may use letters, digits, "
                    "'_' and '.' ('-' joins the levels of a cell's name)."
                )
            axis_levels.append(
                (level, _check_overrides(overrides, f"{where}: product.{axis}.{level}"))
            )
        axes.append(axis_levels)
    product: dict[str, dict[str, Any]] = {}
    for combination in itertools.product(*axes) if axes else ():
        name = "-".join(level for level, _ in combination)
        merged: dict[str, Any] = {}
        setter: dict[str, str] = {}
        for axis, (level, overrides) in zip(spec.product, combination, strict=True):
            for key, value in overrides.items():
                if key in merged:
                    raise ConfigError(
                        f"{where}: product cell {name!r}: levels {setter[key]!r} and "
                        f"{axis}.{level} both set {key!r}; an axis's levels must set keys that "
                        "no other axis sets."
                    )
                merged[key], setter[key] = value, f"{axis}.{level}"
        if name in cells:
            raise ConfigError(
                f"{where}: product cell {name!r} is also listed in `cells`; rename one of them."
            )
        product[name] = merged
    if spec.exclude and not product:
        raise ConfigError(f"{where}: `exclude` needs a `product` to exclude cells from.")
    excluded: set[str] = set()
    for pattern in spec.exclude:
        matched = fnmatch.filter(product, pattern)
        if not pattern or not matched:
            raise ConfigError(
                f"{where}: exclude pattern {pattern!r} matches no product cell; the product "
                f"cells are {', '.join(product)}."
            )
        excluded.update(matched)
    cells.update((name, o) for name, o in product.items() if name not in excluded)
    for name in cells:  # each cell is a directory of the grid's: it must stay inside it
        check_path_component(name, f"{where}: cell name")
    if not cells:
        raise ConfigError(
            f"{where}: the grid has no cell: give `cells`, or a `product` that `exclude` "
            "does not empty."
        )
    return cells


def read_grid_spec(path: str | Path) -> GridSpec:
    """A grid file's :class:`GridSpec` with ``cells`` holding every cell (listed and product
    cells, see :func:`expand_cells`), without validating the cells' configurations."""
    path = Path(path)
    spec = from_dict(GridSpec, read_yaml(path), "grid")
    check_path_component(spec.name, f"{path}: grid name")
    spec.cells = expand_cells(spec, str(path))
    return spec


def load_grid(
    path: str | Path, overrides: Sequence[str] = ()
) -> tuple[GridSpec, dict[str, Config]]:
    """Read a grid file and validate the full configuration of every cell up front.

    The returned spec's ``cells`` holds every cell, product cells included."""
    path = Path(path)
    spec = read_grid_spec(path)
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"{path}: `seeds` must be a non-empty list of distinct integers.")
    if spec.baseline is not None and spec.baseline not in spec.cells:
        raise ConfigError(
            f"{path}: baseline {spec.baseline!r} is not a cell; cells are {', '.join(spec.cells)}."
        )
    base: dict[str, Any] = {}
    if spec.base is not None:
        base_file = path.parent / spec.base
        base = anchor_plugin_paths(read_yaml(base_file), base_file.parent)
    base = apply_overrides(base, spec.config)
    parsed = parse_overrides(overrides)
    if "output_dir" in parsed:  # where the grid goes, not a per-run setting
        spec.output_dir = str(parsed.pop("output_dir"))
    base = apply_overrides(base, parsed)
    configs: dict[str, Config] = {}
    for cell, cell_overrides in spec.cells.items():
        try:
            data = apply_overrides(base, cell_overrides)
            configs[cell] = load_config(anchor_plugin_paths(data, path.parent))
        except ConfigError as exc:
            raise ConfigError(f"{path}, cell {cell!r}: {exc}") from None
    return spec, configs


def _cell_config(config: Config, spec: GridSpec, cell: str, seed: int) -> Config:
    data = to_dict(config)
    data["seed"] = seed
    data["name"] = f"{spec.name}.{cell}"
    return from_dict(Config, data)


def select_cells(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The cells (in grid order) matching any of ``patterns`` (names or shell patterns such
    as ``hps-*``); a pattern that matches no cell is an error naming the cells."""
    chosen: set[str] = set()
    for pattern in patterns:
        if not pattern:
            raise ConfigError("--cells: an empty pattern (two commas, or a trailing one).")
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ConfigError(
                f"--cells: {pattern!r} matches no cell; the cells are {', '.join(names)}."
            )
        chosen.update(matched)
    return [n for n in names if n in chosen]


def run_grid(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    console: bool = True,
    cells: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run every unfinished (cell, seed) of a grid, or of the ``cells`` it names (names or
    shell patterns), then summarise every finished run of the grid."""
    spec, configs = load_grid(path, overrides)
    if cells is not None:
        keep = select_cells(list(configs), cells)
        configs = {name: configs[name] for name in keep}
    grid_dir = Path(spec.output_dir) / spec.name
    # one process group for the whole grid under torchrun (a single process otherwise)
    dist_info = init_from_environment(next(iter(configs.values())).train.device)
    # Validate every cell, and every run already on disk, before writing or training
    # anything: a typo fails in seconds and leaves the grid directory as it was.
    for cell, config in configs.items():
        build_components(_cell_config(config, spec, cell, spec.seeds[0]))
        if dist_info.active:
            check_batch_size(config.data.batch_size, dist_info.world)
        for seed in spec.seeds:
            run_path = grid_dir / cell / f"seed-{seed}"
            if (run_path / "config.yaml").exists():
                expected = to_dict(_cell_config(config, spec, cell, seed))
                if RunDirectory.open(run_path).read_config() != expected:
                    raise ConfigError(
                        f"{run_path} was trained with another configuration than cell {cell!r} "
                        f"now has; give the grid a new name or remove {run_path}."
                    )
    with contextlib.ExitStack() as held:

        def start() -> None:  # rank 0 only: one `compare` per grid directory
            make_dir(grid_dir, "create the grid directory")
            held.enter_context(DirectoryLock(grid_dir, "grid directory"))
            write_atomic(grid_dir / "grid.yaml", Path(path).read_bytes(), "write")

        dist_info.decide(start)
        _run_cells(spec, configs, grid_dir, console, dist_info)
        if not dist_info.is_writer:  # rank 0 writes the grid's summary and report
            return {}
        return summarize_grid(grid_dir, spec)


def _run_cells(
    spec: GridSpec,
    configs: dict[str, Config],
    grid_dir: Path,
    console: bool,
    dist_info: Distributed,
) -> None:
    """Train or resume every unfinished run, one after the other; under torchrun every
    process trains every run, rank 0 deciding what each run needs and writing it."""
    progress = GridProgress(len(configs) * len(spec.seeds), enabled=console and dist_info.is_writer)
    for cell, config in configs.items():
        for seed in spec.seeds:
            cfg = _cell_config(config, spec, cell, seed)
            run_path = grid_dir / cell / f"seed-{seed}"
            with contextlib.ExitStack() as held:
                action = dist_info.decide(functools.partial(_prepare_run, run_path, cfg, held))
                if action == "skip":
                    progress.skip(cell, seed, f"finished earlier: {run_path}")
                    continue
                what = f"resuming {run_path}" if action == "resume" else f"training -> {run_path}"
                with progress.run(cell, seed, what):
                    trainer = Trainer(
                        build_components(cfg),
                        RunDirectory(run_path),
                        console=console,
                        distributed=dist_info,
                    )
                    trainer.fit(resume=action == "resume")
    progress.close()


def _prepare_run(run_path: Path, cfg: Config, held: contextlib.ExitStack) -> str:
    """What a run of the grid needs: ``"skip"`` (finished), ``"resume"`` (it has a
    checkpoint) or ``"train"`` (new, or started afresh when it never got to a checkpoint);
    the run's lock is entered into ``held`` for the two last."""
    if (run_path / "config.yaml").exists():
        run = RunDirectory.open(run_path)
        if run.read_results() is not None:
            return "skip"
        if run.last_checkpoint.exists():
            held.enter_context(DirectoryLock(run_path))
            return "resume"
        with DirectoryLock(run_path):  # never got to a checkpoint: start afresh
            for child in run_path.iterdir():
                if child.is_file() and child.name != LOCK_NAME:
                    with guard(child, "remove"):
                        child.unlink()
    make_dir(run_path, "create the run directory")
    held.enter_context(DirectoryLock(run_path))
    RunDirectory.create(run_path, to_dict(cfg))
    return "train"


def mean_ranks(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, bool]]
) -> dict[str, float]:
    """Each cell's mean rank over the metric columns (1 = best; ties share their mean rank).

    ``rows`` are the grid's rows (``row[f"{task}.{metric}"] = (mean, std)``) and ``columns``
    ``(task, metric, higher_is_better)``. A cell whose mean is NaN in a column ranks last in it.
    """
    if not rows:
        return {}
    totals = dict.fromkeys((row["cell"] for row in rows), 0.0)
    for task, metric, higher in columns:
        key = f"{task}.{metric}"

        def order_key(row: dict[str, Any], k: str = key, h: bool = higher) -> float:
            value = float(row[k][0])
            if math.isnan(value):
                return math.inf
            return -value if h else value

        ordered = sorted(rows, key=order_key)
        i = 0
        while i < len(ordered):
            j = i
            while j + 1 < len(ordered) and order_key(ordered[j + 1]) == order_key(ordered[i]):
                j += 1
            for row in ordered[i : j + 1]:
                totals[row["cell"]] += (i + j) / 2 + 1
            i = j + 1
    n = max(len(columns), 1)
    return {cell: total / n for cell, total in totals.items()}


class GridProgress:
    """The grid's progress: a line per run (``[i/N] [cell seed k] ...``, with the expected
    time left once a run has been trained) and, on a terminal, a bar naming the cell and seed."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done = 0
        self.trained_s: list[float] = []
        self.to_train = total
        self.bar: tqdm[Any] | None = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, desc="grid", unit="run", dynamic_ncols=True)

    def _line(self, cell: str, seed: int, what: str) -> None:
        if not self.enabled:
            return
        eta = ""
        if self.trained_s and self.to_train > 0:
            left = statistics.fmean(self.trained_s) * self.to_train
            eta = f" (about {_duration(left)} left)"
        text = f"[{self.done + 1}/{self.total}] [{cell} seed {seed}] {what}{eta}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{cell} seed {seed}")
            self.bar.write(text)
        else:
            print(text, flush=True)

    def skip(self, cell: str, seed: int, what: str) -> None:
        self._line(cell, seed, what)
        self.to_train -= 1
        self._advance()

    @contextlib.contextmanager
    def run(self, cell: str, seed: int, what: str) -> Iterator[None]:
        self._line(cell, seed, what)
        started = time.perf_counter()
        yield
        self.trained_s.append(time.perf_counter() - started)
        self.to_train -= 1
        self._advance()

    def _advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    if not values:
        return math.nan, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


FINISHED = "finished"
NOT_RUN = "not run"
#: the least margin by which a cell must beat the constant predictor on a value, as a
#: fraction of the constant predictor's value (see chance_warnings)
CHANCE_MARGIN = 0.05


def run_state(run_path: Path) -> str:
    """``"finished"`` (the run has its ``results.json``), ``"not run"`` (no run directory
    with a ``config.yaml``), or ``"running or interrupted (K/N epochs)"``: started, without
    results yet (a run in progress and a killed one look the same on disk)."""
    if (run_path / "results.json").is_file():
        return FINISHED
    if not (run_path / "config.yaml").is_file():
        return NOT_RUN
    run = RunDirectory(run_path)
    done = len(run.read_metrics())
    try:
        total: int | None = int(run.read_config()["train"]["epochs"])
    except (ConfigError, KeyError, TypeError, ValueError):
        total = None
    return (
        f"running or interrupted ({done}/{total} epochs)"
        if total
        else (f"running or interrupted ({done} epochs)")
    )


def cell_state(states: dict[int, str]) -> str:
    """A cell's state from its runs' (``{seed: run_state}``): ``"finished"``, ``"not run"``
    or ``"K/N seeds finished; seed S: STATE; ..."``."""
    finished = sum(state == FINISHED for state in states.values())
    if finished == len(states):
        return FINISHED
    if all(state == NOT_RUN for state in states.values()):
        return NOT_RUN
    rest = "; ".join(f"seed {seed}: {st}" for seed, st in states.items() if st != FINISHED)
    return f"{finished}/{len(states)} seeds finished; {rest}"


def chance_warnings(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The (cell, task) pairs at chance level: ``[{"cell", "task", "seeds", "values",
    "text"}]``.

    A cell's runs record in ``results.json`` what a constant predictor scores on the test
    split (``chance``: the majority class, the label prevalences or the mean target; see
    :func:`polytask.evaluation.chance_level`). The cell is at chance on a task when, for
    every value of the task that has one, its mean over the finished seeds that recorded it
    is not better than the constant predictor's (mean) value by more than
    ``max(2 * std, CHANCE_MARGIN * |chance value|)``, ``std`` the standard deviation over
    those seeds (0 with one seed). Runs without ``chance`` (older ones, or tasks of other
    kinds) are never at chance.
    """
    found: list[dict[str, Any]] = []
    for cell, cell_runs in runs.items():
        scored = [r for r in cell_runs if isinstance(r.get("chance"), dict)]
        if not scored:
            continue
        hib: dict[str, dict[str, bool]] = scored[0].get("higher_is_better") or {}
        for task, constant in scored[0]["chance"].items():
            checks: dict[str, dict[str, Any]] = {}
            seeds = 0
            for value, higher in hib.get(task, {}).items():
                pairs = [
                    (r["test"]["metrics"].get(task, {}).get(value), r["chance"][task].get(value))
                    for r in scored
                    if isinstance(r["chance"].get(task), dict)
                ]
                numbers = [
                    (float(m), float(c))
                    for m, c in pairs
                    if isinstance(m, int | float) and isinstance(c, int | float)
                ]
                numbers = [(m, c) for m, c in numbers if math.isfinite(m) and math.isfinite(c)]
                if not numbers or value not in constant:
                    continue
                mean, std = _mean_std([m for m, _ in numbers])
                level = statistics.fmean(c for _, c in numbers)
                margin = max(2.0 * (std or 0.0), CHANCE_MARGIN * abs(level))
                gain = mean - level if higher else level - mean
                checks[value] = {
                    "mean": mean,
                    "std": std,
                    "chance": level,
                    "margin": margin,
                    "higher_is_better": higher,
                    "at_chance": gain <= margin,
                }
                seeds = max(seeds, len(numbers))
            if not checks or not all(c["at_chance"] for c in checks.values()):
                continue
            described = ", ".join(
                f"{value} {format_value(c['mean'], c['std'])} against {format_value(c['chance'])}"
                for value, c in checks.items()
            )
            found.append(
                {
                    "cell": cell,
                    "task": task,
                    "seeds": seeds,
                    "values": checks,
                    "text": (
                        f"cell {cell!r} is at chance level on task {task!r}: {described} for "
                        f"a constant predictor ({seeds} seed{'s' if seeds != 1 else ''})."
                    ),
                }
            )
    return found


def summarize_grid(grid_dir: str | Path, spec: GridSpec | None = None) -> dict[str, Any]:
    """Collect the finished runs of a grid directory into tables (written next to them).

    Cells without every seed finished are listed with their state (``cell_state``); their
    means are over the finished seeds. (Cell, task) pairs at chance level
    (``chance_warnings``) are printed as warnings and noted in the tables."""
    grid_dir = Path(grid_dir)
    if spec is None:
        grid_file = grid_dir / "grid.yaml"
        if not grid_file.is_file():
            raise ConfigError(f"{grid_dir} is not a grid directory (no grid.yaml).")
        spec = read_grid_spec(grid_file)
    runs: dict[str, list[dict[str, Any]]] = {}
    seeds_of: dict[str, list[int]] = {}
    states: dict[str, dict[int, str]] = {}
    for cell in spec.cells:
        for seed in spec.seeds:
            run_path = grid_dir / cell / f"seed-{seed}"
            states.setdefault(cell, {})[seed] = run_state(run_path)
            if states[cell][seed] == FINISHED:
                runs.setdefault(cell, []).append(RunDirectory(run_path).read_results() or {})
                seeds_of.setdefault(cell, []).append(seed)
    cells_state = {cell: cell_state(s) for cell, s in states.items()}
    unfinished = {cell: st for cell, st in cells_state.items() if st != FINISHED}
    if not runs:
        raise ConfigError(
            f"{grid_dir}: no finished runs yet ("
            + "; ".join(f"{cell}: {st}" for cell, st in unfinished.items())
            + ")."
        )
    hib, auxiliary = grid_tasks(runs)
    columns = results_columns(hib, auxiliary)
    # auxiliary tasks are shown but never compared: no Delta_m, mean rank or verdict
    counted = [(t, k, hib[t][k]) for t, k, _ in columns if t not in auxiliary]
    baseline: Baseline | None = None
    if spec.baseline is not None and spec.baseline in runs:
        base_runs = runs[spec.baseline]
        values = {
            t: {k: statistics.fmean(r["test"]["metrics"][t][k] for r in base_runs) for k in vals}
            for t, vals in hib.items()
            if t not in auxiliary and all(t in r["test"]["metrics"] for r in base_runs)
        }
        seeds = [
            s
            for s in spec.seeds
            if (grid_dir / spec.baseline / f"seed-{s}" / "results.json").is_file()
        ]
        baseline = Baseline(
            values=values,
            higher_is_better={t: hib[t] for t in values},
            source=(
                f"polytask compare, grid {spec.name!r} in {grid_dir}, cell {spec.baseline!r} "
                f"(overrides {spec.cells[spec.baseline]} on base {spec.base or 'defaults'} "
                f"{spec.config or ''}), test split, mean over seeds {seeds}; "
                f"polytask {package_version()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
            ),
        )
        with guard(grid_dir / "baseline.json", "write"):
            baseline.save(grid_dir / "baseline.json")
    rows: list[dict[str, Any]] = []
    for cell, cell_runs in runs.items():
        row: dict[str, Any] = {"cell": cell, "seeds": len(cell_runs)}
        row["run_seeds"] = seeds_of[cell]
        row["seeds_total"] = len(spec.seeds)
        row["state"] = cells_state[cell]
        for t, k, _ in columns:  # a cell without the task (an auxiliary one): "-"
            row[f"{t}.{k}"] = _mean_std(
                [r["test"]["metrics"][t][k] for r in cell_runs if t in r["test"]["metrics"]]
            )
        if baseline is not None:
            per_seed = [delta_m(r["test"]["metrics"], baseline, spec.delta_m) for r in cell_runs]
            row["delta_m"] = _mean_std(per_seed)
            row["delta_m_seeds"] = per_seed
            if spec.decathlon_score:
                scores = [decathlon_score(r["test"]["metrics"], baseline) for r in cell_runs]
                row["decathlon"] = _mean_std(scores)
                row["decathlon_seeds"] = scores
        row["time_s"] = _mean_std([r["train_time_s"] for r in cell_runs])
        row["parameters"] = sum(cell_runs[0].get("parameters", {}).values())
        rows.append(row)
    ranks = mean_ranks(rows, counted)
    for row in rows:
        row["mean_rank"] = ranks[row["cell"]]
    headers = ["cell", "seeds"] + [h for _, _, h in columns]
    if baseline is not None:
        arrow = "↑" if delta_m_higher_is_better(spec.delta_m) else "↓"
        headers.append(
            f"Δm % ({spec.delta_m}) {arrow}"
            if spec.delta_m == "metric_mean"
            else f"Δm ({spec.delta_m}) {arrow}"
        )
    scored = baseline is not None and spec.decathlon_score
    if scored:
        headers.append("decathlon score ↑")
    headers += ["mean rank ↓", "train time s", "parameters"]
    table_rows = []
    for row in rows:
        seeds_shown = str(row["seeds"])
        if row["seeds"] < row["seeds_total"]:
            seeds_shown += f"/{row['seeds_total']}"
        cells = [row["cell"], seeds_shown]
        cells += [format_value(*row[f"{t}.{k}"]) for t, k, _ in columns]
        if baseline is not None:
            cells.append(
                format_value(*row["delta_m"], decimals=2 if spec.delta_m == "metric_mean" else 4)
            )
        if scored:
            cells.append(format_value(*row["decathlon"], decimals=1).lstrip("+"))  # unsigned
        cells += [
            f"{row['mean_rank']:.2f}",
            format_value(*row["time_s"]),
            f"{row['parameters']:,}",
        ]
        table_rows.append(cells)
    # many tasks: the per-task columns move to a long table (bounded width; see report.tables)
    table = fitted_table(
        headers,
        table_rows,
        keys=2,
        columns=[(f"{t} aux" if t in auxiliary else t, k, hib[t][k]) for t, k, _ in columns],
    )
    rank_note = (
        f" Mean rank: a cell's rank among the {len(rows)} cells in each of the "
        f"{len(counted)} metric columns (1 = best, ties share), averaged over the columns."
    )
    if auxiliary:
        rank_note += (
            f" Auxiliary tasks ({', '.join(auxiliary)}; columns marked aux) are trained and "
            "shown, but left out of Δm, the mean rank, the verdict and the Pareto front; "
            "'-': a cell without the task."
        )
    note = (
        "Test split, mean ± standard deviation over seeds; parameters of the network (the "
        "balancer's own state excluded). "
        f"Δm against cell {spec.baseline!r} "
        f"({'CAGrad / Nash-MTL convention, percent, lower is better' if spec.delta_m == 'metric_mean' else 'LibMTL convention, fraction, higher is better'})."
        if baseline is not None
        else "Test split, mean ± standard deviation over seeds; parameters of the network."
    ) + rank_note
    if scored:
        note += (
            " Decathlon score: Rebuffi et al. 2017, per task 1000 max(0, 1 - E / (2 E_b))^2 "
            f"with E the test error and E_b the mean error of {spec.baseline!r}, summed over "
            f"the tasks ({spec.baseline!r} itself scores about 250 per task); higher is better."
        )
    header = f"# Grid {spec.name}\n\n"
    if spec.protocol:
        header += f"Protocol: {spec.protocol.strip()}\n\n"
    per_class = class_gains(runs, spec.baseline) if spec.baseline is not None else None
    per_class_md = ""
    if per_class is not None:
        per_class_md = f"\n## Per-class IoU against training pixels\n\n{per_class['table']}\n\n{per_class['note']}\n"
    verdict = verdict_sentence(rows, spec.baseline, spec.delta_m) if baseline is not None else None
    verdict_md = f"\n**Verdict.** {verdict}\n" if verdict else ""
    unfinished_md = ""
    if unfinished:
        unfinished_md = (
            f"**Unfinished cells** ({len(unfinished)} of {len(cells_state)}): a cell in the "
            "table with fewer seeds than the grid has (K/N) is the mean over its finished "
            "seeds; a cell without any finished seed is not in the table.\n\n"
            + markdown_table(["cell", "state"], [[c, st] for c, st in unfinished.items()])
        )
    warnings = chance_warnings(runs)
    chance_md = ""
    if warnings:
        chance_md = (
            "**At chance level.** "
            + " ".join(w["text"][0].upper() + w["text"][1:] for w in warnings)
            + " A cell is at chance on a task when on every value of the task its mean over "
            "seeds is not better than what a constant predictor (the majority class, the "
            "label prevalences or the mean target) scores on the test split by more than "
            f"max(2 x its standard deviation over seeds, {CHANCE_MARGIN:.0%} of the "
            "constant predictor's value)."
        )
    for w in warnings:
        print(f"polytask: warning: {w['text']}", file=sys.stderr)
    extra_md = "".join(f"\n{part}\n" for part in (unfinished_md, chance_md) if part)
    write_atomic(
        grid_dir / "results.md",
        f"{header}{table}\n\n{note}\n{verdict_md}{extra_md}{per_class_md}",
        "write",
    )
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        keys = [f"{t}.{k}" for t, k, _ in columns] + (["delta_m"] if baseline else [])
        keys += (["decathlon"] if scored else []) + ["time_s"]
        writer.writerow(
            [
                "cell",
                "seeds",
                *[f"{k}{suffix}" for k in keys for suffix in ("", "_std")],
                "mean_rank",
                "parameters",
                "state",
            ]
        )
        for row in rows:
            cells = [v for k in keys for v in row[k]]
            writer.writerow(
                [
                    row["cell"],
                    row["seeds"],
                    *cells,
                    row["mean_rank"],
                    row["parameters"],
                    row["state"],
                ]
            )
        for cell, st in unfinished.items():  # without any finished seed: no values
            if cell not in runs:
                writer.writerow([cell, 0, *[""] * (2 * len(keys)), "", "", st])
        write_atomic(grid_dir / "results.csv", f.getvalue(), "write")
    summary = {
        "grid": spec.name,
        "protocol": spec.protocol,
        "table": table,
        "note": note,
        "rows": rows,
        "baseline": None if baseline is None else baseline.source,
        "auxiliary": auxiliary,
        "per_class": per_class,
        "verdict": verdict,
        "cells": {
            cell: {"state": cells_state[cell], "runs": {str(k): v for k, v in s.items()}}
            for cell, s in states.items()
        },
        "unfinished": unfinished,
        "unfinished_note": unfinished_md or None,
        "chance_warnings": warnings,
        "chance_note": chance_md or None,
    }
    write_atomic(grid_dir / "results.json", json.dumps(summary, indent=2, default=str), "write")
    from .report.grid_html import write_grid_html

    try:  # the tables are written: the HTML report only describes them and must not fail them
        summary["html"] = str(write_grid_html(grid_dir))
    except Exception as exc:
        print(
            f"polytask: warning: the grid's HTML report could not be written "
            f"({type(exc).__name__}: {exc})",
            file=sys.stderr,
        )
        summary["html"] = None
    return summary


def grid_tasks(
    runs: dict[str, list[dict[str, Any]]],
) -> tuple[dict[str, dict[str, bool]], list[str]]:
    """Every task of the grid's runs with ``higher_is_better`` of its values (in the order
    they first appear) and the auxiliary ones (a task any run marks auxiliary, from its
    ``results.json``), so that cells with and without an auxiliary task share a table."""
    hib: dict[str, dict[str, bool]] = {}
    auxiliary: list[str] = []
    for cell_runs in runs.values():
        for r in cell_runs:
            for task, values in r["higher_is_better"].items():
                hib.setdefault(task, dict(values))
            auxiliary += [t for t in r.get("auxiliary") or [] if t not in auxiliary]
    return hib, auxiliary


def verdict_sentence(
    rows: Sequence[dict[str, Any]], baseline_cell: str | None, convention: str
) -> str | None:
    """One plain sentence: does the best cell beat the baseline cell by more than the spread
    over seeds? ``None`` without a baseline or any other cell with a Delta_m."""
    others = [
        r
        for r in rows
        if r["cell"] != baseline_cell and "delta_m" in r and math.isfinite(r["delta_m"][0])
    ]
    if baseline_cell is None or not others:
        return None
    higher = delta_m_higher_is_better(convention)
    best = (max if higher else min)(others, key=lambda r: r["delta_m"][0])
    mean, std = best["delta_m"]
    unit = " %" if convention == "metric_mean" else ""
    value = f"Δm = {mean:+.2f}{unit}" + (f" ± {std:.2f}" if std is not None else "")
    better = mean > 0 if higher else mean < 0
    seeds = f"{best['seeds']} seeds"
    if better and std is not None and abs(mean) > std:
        return (
            f"The best cell, {best['cell']!r} ({value} over {seeds}), beats {baseline_cell!r} "
            "by more than the standard deviation over seeds."
        )
    if better:
        return (
            f"The best cell, {best['cell']!r} ({value} over {seeds}), is ahead of "
            f"{baseline_cell!r} by less than the standard deviation over seeds (or with one "
            "seed): on this data no cell clearly beats it."
        )
    return (
        f"No cell beats {baseline_cell!r} on this data: the best, {best['cell']!r}, has "
        f"{value} over {seeds}."
    )


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN if either is constant."""

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def class_gains(runs: dict[str, list[dict[str, Any]]], baseline_cell: str) -> dict[str, Any] | None:
    """Per-class test IoU gain of every cell over ``baseline_cell`` against training pixels.

    Needs runs whose results have ``classes`` (training pixels per class) and per-class test
    IoU (``test.details``) for one segmentation task; ``None`` otherwise. Classes are sorted
    by their share of training pixels; each cell's column is its mean IoU over seeds minus
    the baseline cell's; the last row is Spearman's rank correlation of gain and share.
    """
    base_runs = runs.get(baseline_cell)
    if not base_runs:
        return None
    first = base_runs[0]
    for task, info in (first.get("classes") or {}).items():
        pixels = info.get("train_pixels")
        if pixels is None or "iou" not in first["test"].get("details", {}).get(task, {}):
            continue
        names = info.get("names") or [str(i) for i in range(len(pixels))]
        total = float(sum(pixels))
        share = [100.0 * p / total if total else math.nan for p in pixels]

        def mean_iou(cell_runs: list[dict[str, Any]], c: int, t: str = task) -> float:
            values = [
                r["test"]["details"][t]["iou"][c]
                for r in cell_runs
                if t in r["test"].get("details", {})
            ]
            defined = [v for v in values if v is not None]
            return statistics.fmean(defined) if defined else math.nan

        classes = sorted(range(len(pixels)), key=lambda c: share[c])
        base = [mean_iou(base_runs, c) for c in range(len(pixels))]
        cells = [cell for cell in runs if cell != baseline_cell]
        gains = {
            cell: [mean_iou(runs[cell], c) - base[c] for c in range(len(pixels))] for cell in cells
        }
        headers = ["class", "train pixels %", f"{baseline_cell} IoU"] + [
            f"{cell} ΔIoU" for cell in cells
        ]
        rows = [
            [names[c], f"{share[c]:.2f}", format_value(base[c])]
            + [format_value(gains[cell][c], decimals=2) for cell in cells]
            for c in classes
        ]
        correlation: dict[str, float] = {}
        for cell in cells:
            # a class that neither the cell nor the baseline learned (IoU 0 in both) has a
            # gain of 0 that says nothing about data starvation: leave it out
            pairs = [
                (share[c], g)
                for c, g in enumerate(gains[cell])
                if math.isfinite(g) and max(base[c], base[c] + g) > 0
            ]
            correlation[cell] = (
                _spearman([p for p, _ in pairs], [g for _, g in pairs])
                if len(pairs) > 2
                else math.nan
            )
        rows.append(
            ["Spearman(share, gain)", "", ""]
            + [format_value(correlation[cell], decimals=2) for cell in cells]
        )
        note = (
            f"Task {task!r}, test split, IoU in percent, mean over seeds; ΔIoU is a cell's IoU "
            f"minus {baseline_cell!r}'s. Classes sorted by their share of labelled training "
            "pixels. Spearman: the rank correlation of share and gain over the classes that "
            "the cell or the baseline learned (IoU above 0); negative means the cell gains "
            "most on the rarest classes (the cross-stitch paper's data-starved-class effect)."
        )
        return {
            "task": task,
            "classes": [names[c] for c in classes],
            "train_pixel_share": [share[c] for c in classes],
            "baseline_iou": [base[c] for c in classes],
            "gain": {cell: [gains[cell][c] for c in classes] for cell in cells},
            "spearman": correlation,
            "table": markdown_table(headers, rows),
            "note": note,
        }
    return None
