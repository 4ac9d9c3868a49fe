"""Record a finished comparison grid: its tables plus the analyses the MTAN paper argues with.

Usage (the recorded results in benchmarks/results/ give the exact command):

    python benchmarks/grid_analysis.py runs/scenes-mtan-paper-cpu \
        --out benchmarks/results/scenes-mtan-paper-cpu.md

Reads only the grid directory (``polytask report`` rewrites its tables first): the results
table with Delta_m and parameter counts, the robustness of each architecture to the weighting
scheme (cells named ``ARCHITECTURE_WEIGHTING``: the spread of Delta_m across its
weightings, seed by seed and of the means), and the per-class table of IoU gains against
each class's share of training pixels.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from polytask.compare import summarize_grid
from polytask.metrics.delta_m import Baseline, delta_m

WEIGHTINGS = ("equal", "dwa", "uncert")


def _runs(grid_dir: Path, cell: str) -> dict[int, dict[str, Any]]:
    runs = {}
    for path in sorted((grid_dir / cell).glob("seed-*/results.json")):
        runs[int(path.parent.name.split("-")[1])] = json.loads(path.read_text(encoding="utf-8"))
    return runs


def robustness(grid_dir: Path, summary: dict[str, Any]) -> str:
    """Delta_m per weighting for every architecture trained with more than one."""
    baseline = Baseline.load(grid_dir / "baseline.json")
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for row in summary["rows"]:
        arch, _, weighting = row["cell"].rpartition("_")
        if weighting in WEIGHTINGS:
            groups[arch][weighting] = row["cell"]
    lines = [
        "| architecture | "
        + " | ".join(f"Δm % {w}" for w in WEIGHTINGS)
        + " | spread of the means | mean per-seed spread |",
        "|---|" + "---|" * (len(WEIGHTINGS) + 2),
    ]
    for arch, cells in groups.items():
        if len(cells) < 2:
            continue
        per_seed: dict[str, dict[int, float]] = {}
        for weighting, cell in cells.items():
            per_seed[weighting] = {
                seed: delta_m(r["test"]["metrics"], baseline, "metric_mean")
                for seed, r in _runs(grid_dir, cell).items()
            }
        means = {w: statistics.fmean(v.values()) for w, v in per_seed.items()}
        seeds = set.intersection(*(set(v) for v in per_seed.values()))
        seed_spreads = [
            max(v[s] for v in per_seed.values()) - min(v[s] for v in per_seed.values())
            for s in sorted(seeds)
        ]
        values = []
        for w in WEIGHTINGS:
            if w in per_seed:
                sd = statistics.stdev(per_seed[w].values()) if len(per_seed[w]) > 1 else 0.0
                values.append(f"{means[w]:+.2f} ± {sd:.2f}")
            else:
                values.append("-")
        spread = max(means.values()) - min(means.values())
        lines.append(
            f"| {arch} | "
            + " | ".join(values)
            + f" | {spread:.2f} | {statistics.fmean(seed_spreads):.2f} |"
        )
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
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads here, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d')}. Training time summed over runs "
        f"{train_s / 60:.1f} min" + (f"; wall time of the grid {args.wall}." if args.wall else "."),
        "",
    ]
    text = "\n".join(header) + "\n" + body.strip() + "\n\n## Robustness to the weighting scheme\n\n"
    text += robustness(args.grid_dir, summary) + "\n\n"
    text += (
        "Δm (CAGrad / Nash-MTL convention, percent, lower is better) of each weighting, mean ± "
        "standard deviation over seeds; the spread of the means is the largest minus the "
        "smallest; the per-seed spread is the same within each seed, averaged over seeds.\n"
    )
    args.out.write_text(text, encoding="utf-8")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
