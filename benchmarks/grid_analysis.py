"""Record a finished comparison grid: its tables plus the analyses the MTAN paper argues with.

Usage (the recorded results in benchmarks/results/ give the exact command):

    python benchmarks/grid_analysis.py runs/scenes-mtan-paper-cpu \
        --out benchmarks/results/scenes-mtan-paper-cpu.md

Reads only the grid directory (``polytask report`` rewrites its tables first): the results
table with Delta_m and parameter counts, the robustness of each architecture to the balancing
method (the architecture and method of each cell read from its runs' config.yaml: the spread
of Delta_m across the methods, seed by seed and of the means), and the per-class table of IoU gains against
each class's share of training pixels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml

from polytask.compare import summarize_grid
from polytask.metrics.delta_m import Baseline, delta_m


def _runs(grid_dir: Path, cell: str) -> dict[int, dict[str, Any]]:
    runs = {}
    for path in sorted((grid_dir / cell).glob("seed-*/results.json")):
        runs[int(path.parent.name.split("-")[1])] = json.loads(path.read_text(encoding="utf-8"))
    return runs


def _designs(grid_dir: Path, cells: list[str]) -> dict[str, tuple[str, str]]:
    """The (architecture, balancing method) each cell trained with, read from a run's
    config.yaml; an architecture's options that differ between cells are part of its name
    (``split variant=deep``)."""
    configs = {}
    for cell in cells:
        path = next(iter(sorted((grid_dir / cell).glob("seed-*/config.yaml"))))
        configs[cell] = yaml.safe_load(path.read_text(encoding="utf-8"))
    options: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for config in configs.values():
        options[config["model"]["architecture"]].append(config["model"].get("options") or {})
    varying = {
        arch: sorted({k for o in opts for k in o if any(p.get(k) != o[k] for p in opts)})
        for arch, opts in options.items()
    }
    designs = {}
    for cell, config in configs.items():
        arch = config["model"]["architecture"]
        opts = config["model"].get("options") or {}
        label = " ".join([arch, *(f"{k}={opts.get(k)}" for k in varying[arch])])
        designs[cell] = (label, str(config["balancer"]["name"]))
    return designs


def robustness(grid_dir: Path, summary: dict[str, Any]) -> str:
    """Delta_m of every (balancing method, architecture) pair, and each architecture's spread
    across the methods it was trained with (seed by seed and of the means)."""
    baseline = Baseline.load(grid_dir / "baseline.json")
    per_seed: dict[str, dict[str, dict[int, float]]] = defaultdict(dict)  # arch -> method -> seed
    designs = _designs(grid_dir, [row["cell"] for row in summary["rows"]])
    for row in summary["rows"]:
        arch, method = designs[row["cell"]]
        if arch.split()[0] in ("single_task", "stan"):
            continue
        per_seed[arch][method] = {
            seed: delta_m(r["test"]["metrics"], baseline, "metric_mean")
            for seed, r in _runs(grid_dir, row["cell"]).items()
        }
    archs = [a for a, methods in per_seed.items() if len(methods) > 1]
    if not archs:
        return "(no architecture was trained with more than one balancing method)"
    methods = list(dict.fromkeys(m for a in archs for m in per_seed[a]))
    lines = [
        "| balancing method | " + " | ".join(f"{a} Δm %" for a in archs) + " |",
        "|---|" + "---|" * len(archs),
    ]
    for method in methods:
        cells = []
        for arch in archs:
            values = per_seed[arch].get(method)
            if not values:
                cells.append("-")
                continue
            sd = statistics.stdev(values.values()) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values.values()):+.2f} ± {sd:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    spreads, seed_spreads, best = [], [], []
    for arch in archs:
        means = {m: statistics.fmean(v.values()) for m, v in per_seed[arch].items()}
        spreads.append(f"{max(means.values()) - min(means.values()):.2f}")
        best.append(min(means, key=lambda m: means[m]))
        seeds = set.intersection(*(set(v) for v in per_seed[arch].values()))
        per = [
            max(v[s] for v in per_seed[arch].values()) - min(v[s] for v in per_seed[arch].values())
            for s in sorted(seeds)
        ]
        seed_spreads.append(f"{statistics.fmean(per):.2f}" if per else "-")
    lines.append("| **spread of the means** | " + " | ".join(spreads) + " |")
    lines.append("| **mean per-seed spread** | " + " | ".join(seed_spreads) + " |")
    lines.append("| **best method** | " + " | ".join(best) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--command", default=None, help="the command that trained the grid")
    parser.add_argument("--wall", default=None, help="its wall time, as measured")
    args = parser.parse_args()
    summary = summarize_grid(args.grid_dir)  # rewrites results.md from the runs
    results_md = (args.grid_dir / "results.md").read_text(encoding="utf-8")
    body = results_md.split("\n", 2)[2]  # drop the "# Grid" title
    train_s = sum(r["time_s"][0] * r["seeds"] for r in summary["rows"])
    header = [
        f"# Grid {summary['grid']}",
        "",
        *([f"Command: `{args.command}`"] if args.command else []),
        f"Recorded with: `python benchmarks/grid_analysis.py {args.grid_dir} --out {args.out}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d')}. Training time summed over runs "
        f"{train_s / 60:.1f} min" + (f"; wall time of the grid {args.wall}." if args.wall else "."),
        "",
    ]
    text = "\n".join(header) + "\n" + body.strip() + "\n\n## Robustness to the balancing method\n\n"
    text += robustness(args.grid_dir, summary) + "\n\n"
    text += (
        "Δm (CAGrad / Nash-MTL convention, percent, lower is better) of each method, mean ± "
        "standard deviation over seeds; the spread of the means is the largest minus the "
        "smallest; the per-seed spread is the same within each seed, averaged over seeds.\n"
    )
    args.out.write_text(text, encoding="utf-8")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
