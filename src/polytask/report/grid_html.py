"""The HTML report of a comparison grid (``GRID_DIR/report.html``).

It reads the grid directory only: ``grid.yaml``, the summary ``results.json`` that
:func:`~polytask.compare.summarize_grid` writes (rows with mean and standard deviation over
seeds, and where present each row's ``mean_rank`` and per-seed ``delta_m_seeds``),
``baseline.json``, and each run's ``config.yaml`` (the architecture and balancing method of
a cell are read from there, never parsed from the cell's name) and ``results.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..metrics.delta_m import Baseline, delta_m
from ..yamlio import load_file
from .figures import cost_figure, delta_m_figure, robustness_figure, tradeoff_figure
from .html import Raw, Section, draw, esc, page, table_html, write_page
from .tables import format_value, results_columns

__all__ = ["task_improvements", "write_grid_html"]


def _pair(value: Any) -> tuple[float, float | None]:
    """A summary entry ``[mean, std]`` (std ``None`` for one seed) as numbers."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        mean = math.nan if value[0] is None else float(value[0])
        std = None if len(value) < 2 or value[1] is None else float(value[1])
        return mean, std
    return (math.nan if value is None else float(value)), None


def task_improvements(
    rows: Sequence[Mapping[str, Any]], baseline: Baseline
) -> dict[str, dict[str, float]]:
    """Each cell's relative change on each task against the baseline, in percent, higher
    is better: ``100 * mean_m s_m (M_m - B_m) / B_m`` over the task's metrics, from the mean
    values over seeds (the Delta_m of the task alone, with the sign that makes gains
    positive)."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        method = {
            t: {k: _pair(row.get(f"{t}.{k}"))[0] for k in values}
            for t, values in baseline.values.items()
        }
        out[row["cell"]] = {}
        for task in baseline.values:
            alone = Baseline(
                values={task: baseline.values[task]},
                higher_is_better={task: baseline.higher_is_better[task]},
                source=baseline.source,
            )
            out[row["cell"]][task] = -delta_m(method, alone, "metric_mean")
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _cell_runs(grid_dir: Path, cell: str, seeds: Sequence[int]) -> list[Path]:
    return [
        grid_dir / cell / f"seed-{s}" for s in seeds if (grid_dir / cell / f"seed-{s}").is_dir()
    ]


def _cell_setup(runs: Sequence[Path]) -> tuple[str, str]:
    """The architecture and balancing method of a cell, from its first run's config.yaml."""
    for run in runs:
        path = run / "config.yaml"
        if path.is_file():
            config = load_file(path, what="run configuration")
            if not isinstance(config, dict):
                config = {}
            model, balancer = config.get("model"), config.get("balancer")
            return (
                str(model.get("architecture", "?")) if isinstance(model, dict) else "?",
                str(balancer.get("name", "?")) if isinstance(balancer, dict) else "?",
            )
    return "?", "?"


def _links(grid_dir: Path, runs: Sequence[Path]) -> Raw:
    links = []
    for run in runs:
        for name in ("report.html", "report.md"):
            if (run / name).is_file():
                href = (run / name).relative_to(grid_dir).as_posix()
                links.append(f'<a href="{esc(href)}">{esc(run.name)}</a>')
                break
        else:
            links.append(f"{esc(run.name)} (no report)")
    return Raw(" ".join(links))


def write_grid_html(grid_dir: str | Path, *, strict: bool = False) -> Path:
    """Write ``GRID_DIR/report.html`` from the grid's summary and runs; returns its path.

    Needs the summary (``results.json``) that ``summarize_grid`` writes. With ``strict`` a
    figure that cannot be drawn raises its error instead of being replaced by it.
    """
    from ..compare import GridSpec
    from ..config import from_dict, read_yaml

    grid_dir = Path(grid_dir)
    summary_path = grid_dir / "results.json"
    grid_file = grid_dir / "grid.yaml"
    if not grid_file.is_file() or not summary_path.is_file():
        raise ConfigError(
            f"{grid_dir} has no grid.yaml or no results.json: run `polytask report {grid_dir}` "
            "to summarise its finished runs first."
        )
    spec = from_dict(GridSpec, read_yaml(grid_file), "grid")
    summary = _read_json(summary_path)
    rows: list[dict[str, Any]] = summary["rows"]
    runs = {row["cell"]: _cell_runs(grid_dir, row["cell"], spec.seeds) for row in rows}
    setup = {cell: _cell_setup(paths) for cell, paths in runs.items()}
    hib: dict[str, dict[str, bool]] = {}
    for paths in runs.values():  # every task of the grid, as the summary's table has them
        for run in paths:
            if (run / "results.json").is_file():
                for task, values in _read_json(run / "results.json")["higher_is_better"].items():
                    hib.setdefault(task, values)
    auxiliary = summary.get("auxiliary") or []
    columns = results_columns(hib, auxiliary)
    has_dm = any("delta_m" in row for row in rows)
    conv = spec.delta_m
    dm_higher = conv == "task_mean"
    dm_unit = "%" if conv == "metric_mean" else "(fraction)"
    has_rank = any("mean_rank" in row for row in rows)
    has_score = any("decathlon" in row for row in rows)

    headers = ["cell", "architecture", "balancing", "seeds"] + [h for _, _, h in columns]
    if has_dm:
        headers.append(f"Δm {dm_unit} ({conv}) {'↑' if dm_higher else '↓'}")
    if has_score:
        headers.append("decathlon score ↑")
    if has_rank:
        headers.append("mean rank ↓")
    headers += ["train time s", "parameters", "run reports"]
    table_rows = []
    for row in rows:
        cell = row["cell"]
        total = row.get("seeds_total", row["seeds"])  # K/N: only K of N seeds finished
        seeds = row["seeds"] if row["seeds"] >= total else f"{row['seeds']}/{total}"
        cells: list[object] = [cell, *setup[cell], seeds]
        cells += [format_value(*_pair(row.get(f"{t}.{k}"))) for t, k, _ in columns]
        if has_dm:
            cells.append(
                format_value(*_pair(row.get("delta_m")), decimals=2 if conv == "metric_mean" else 4)
                if "delta_m" in row
                else "-"
            )
        if has_score:
            cells.append(
                format_value(*_pair(row["decathlon"]), decimals=1).lstrip("+")
                if "decathlon" in row
                else "-"
            )
        if has_rank:
            rank = row.get("mean_rank")
            cells.append("-" if rank is None else f"{float(rank):.2f}")
        cells += [format_value(*_pair(row.get("time_s"))), f"{row.get('parameters', 0):,}"]
        cells.append(_links(grid_dir, runs[cell]))
        table_rows.append(cells)
    results_body = ""
    if summary.get("verdict"):
        results_body += (
            f'<p class="verdict"><strong>Verdict.</strong> {esc(summary["verdict"])}</p>'
        )
    results_body += table_html(headers, table_rows)
    results_body += f'<p class="note">{esc(summary.get("note", ""))}</p>'
    if summary.get("baseline"):
        results_body += f'<p class="note">Baseline: {esc(summary["baseline"])}</p>'
    unfinished = summary.get("unfinished") or {}
    if unfinished:
        results_body += (
            f"<p><strong>Unfinished cells</strong> ({len(unfinished)}): a cell with K/N seeds "
            "is the mean over its K finished seeds; a cell without any is not in the table.</p>"
            + table_html(["cell", "state"], [[c, st] for c, st in unfinished.items()])
        )
    if summary.get("chance_note"):
        results_body += f'<p class="verdict">{esc(summary["chance_note"].replace("**", ""))}</p>'
    sections = [Section("results", "Results", results_body)]

    dm_rows = [row for row in rows if "delta_m" in row]
    if dm_rows:
        seeds = {
            row["cell"]: [float(v) for v in row["delta_m_seeds"] if v is not None]
            for row in dm_rows
            if isinstance(row.get("delta_m_seeds"), list)
        }
        bars = draw(
            lambda: delta_m_figure(
                [r["cell"] for r in dm_rows],
                [_pair(r["delta_m"])[0] for r in dm_rows],
                [_pair(r["delta_m"])[1] for r in dm_rows],
                higher_is_better=dm_higher,
                unit=dm_unit,
                baseline=str(spec.baseline),
                seeds=seeds or None,
            ),
            f"Δm of every cell against {spec.baseline} ({conv}), best first: the bar is the "
            "mean over seeds, the error bar the standard deviation"
            + (", the dots the seeds" if seeds else "")
            + ". Green: better than the baseline on average.",
            strict=strict,
        )
    else:
        bars = "<p>The grid has no baseline cell with finished runs: no Δm.</p>"
    sections.append(Section("delta-m", "Δm", bars or ""))

    baseline_path = grid_dir / "baseline.json"
    if baseline_path.is_file() and len(hib) >= 1:
        baseline = Baseline.load(baseline_path)
        improvement = task_improvements(rows, baseline)
        trade = draw(
            lambda: tradeoff_figure(improvement, str(spec.baseline)),
            "Per-task trade-off: each cell's relative change on each task against "
            f"{spec.baseline} (percent; the mean over the task's metrics, signed so that a "
            "gain is positive; from the means over seeds). Stars: the cells on the Pareto "
            "front, which no other cell beats on every task at once.",
            strict=strict,
        )
        trade_table = table_html(  # the baseline's tasks: auxiliary tasks are not compared
            ["cell"] + [f"{t} change % ↑" for t in baseline.values],
            [
                [c] + [format_value(v, decimals=2) for v in imp.values()]
                for c, imp in improvement.items()
            ],
        )
        sections.append(Section("trade-off", "Per-task trade-off", (trade or "") + trade_table))
    else:
        sections.append(
            Section("trade-off", "Per-task trade-off", "<p>No baseline: no per-task change.</p>")
        )

    groups: dict[str, dict[str, tuple[float, float | None]]] = {}
    for row in dm_rows:
        arch, balancer = setup[row["cell"]]
        if row["cell"] != spec.baseline:
            groups.setdefault(arch, {})[balancer] = _pair(row["delta_m"])
    groups = {a: g for a, g in groups.items() if len(g) > 1}
    if groups:
        robust = draw(
            lambda: robustness_figure(groups, higher_is_better=dm_higher, unit=dm_unit),
            "Robustness to the weighting scheme: the Δm of each architecture under each "
            "balancing method it was trained with (mean ± std over seeds; architecture and "
            "method read from each run's config.yaml). Points close together: the "
            "architecture does not depend much on the weighting.",
            strict=strict,
        )
        spread_rows = [
            [
                arch,
                len(g),
                format_value(
                    max(m for m, _ in g.values()) - min(m for m, _ in g.values()), decimals=2
                ),
            ]
            for arch, g in groups.items()
        ]
        robust = (robust or "") + table_html(
            ["architecture", "balancing methods", f"spread of the mean Δm {dm_unit}"], spread_rows
        )
    else:
        robust = (
            "<p>No architecture was trained with more than one balancing method (or there "
            "is no Δm): nothing to compare.</p>"
        )
    sections.append(Section("robustness", "Robustness to the weighting", robust))

    cost = draw(
        lambda: cost_figure(
            [r["cell"] for r in rows],
            [_pair(r.get("time_s"))[0] for r in rows],
            [_pair(r.get("time_s"))[1] for r in rows],
            [int(r.get("parameters", 0)) for r in rows],
        ),
        "Training cost: the training time of one run of each cell (mean ± std over seeds, "
        "evaluation excluded) and the network's parameter count.",
        strict=strict,
    )
    sections.append(Section("cost", "Training cost", cost or ""))

    per_class = summary.get("per_class")
    if isinstance(per_class, Mapping):
        gains = per_class.get("gain", {})
        head = ["class", "train pixels %", f"{spec.baseline} IoU"] + [f"{c} ΔIoU" for c in gains]
        body_rows: list[list[object]] = [
            [name, f"{share:.2f}", format_value(base)]
            + [format_value(g[i], decimals=2) for g in gains.values()]
            for i, (name, share, base) in enumerate(
                zip(
                    per_class["classes"],
                    per_class["train_pixel_share"],
                    per_class["baseline_iou"],
                    strict=True,
                )
            )
        ]
        spearman: list[object] = ["Spearman(share, gain)", "", ""]
        spearman += [format_value(per_class["spearman"].get(c), decimals=2) for c in gains]
        body_rows.append(spearman)
        sections.append(
            Section(
                "per-class",
                "Per class",
                table_html(head, body_rows)
                + f'<p class="note">{esc(per_class.get("note", ""))}</p>',
            )
        )

    run_rows = [[cell, *setup[cell], _links(grid_dir, paths)] for cell, paths in runs.items()]
    sections.append(
        Section(
            "runs",
            "Runs",
            table_html(["cell", "architecture", "balancing", "reports"], run_rows)
            + '<p class="note">Also: <a href="results.md">results.md</a>, '
            '<a href="results.csv">results.csv</a>, <a href="grid.yaml">grid.yaml</a>.</p>',
        )
    )
    subtitle = f"<p>{len(rows)} cells, seeds {esc(', '.join(map(str, spec.seeds)))}."
    if summary.get("protocol"):
        subtitle += f" Protocol: {esc(summary['protocol'])}"
    subtitle += "</p>"
    return write_page(grid_dir / "report.html", page(f"Grid {spec.name}", subtitle, sections))
