"""Choose a grid's cell on the validation split, as a tuned hyperparameter must be chosen.

Reads a finished grid directory only (each run's ``results.json``): for every cell, the mean
over its seeds of the summed *unweighted* validation losses (``val.losses`` at the epoch each
run selected), then the cell with the lowest mean, and that cell's test metrics. The test
split takes no part in the choice. Used for the tuned-scalarisation grid
(docs/benchmarks.md#tuned-scalarisation):

    python benchmarks/choose_on_validation.py runs/solarflare-weights-grid
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def validation_losses(grid: Path) -> dict[str, list[float]]:
    """``{cell: [summed validation loss of each seed]}`` of the finished runs."""
    out: dict[str, list[float]] = {}
    for results in sorted(grid.glob("*/seed-*/results.json")):
        data = json.loads(results.read_text())
        cell = results.parent.parent.name
        out.setdefault(cell, []).append(float(sum(data["val"]["losses"].values())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path, help="a grid directory (runs/NAME)")
    args = parser.parse_args()
    losses = validation_losses(args.grid)
    if not losses:
        raise SystemExit(f"no finished run in {args.grid}")
    print("| cell | seeds | validation loss (sum over tasks), mean ± std |")
    print("|---|---|---|")
    means = {c: statistics.mean(v) for c, v in losses.items()}
    for cell, values in sorted(losses.items(), key=lambda kv: means[kv[0]]):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {cell} | {len(values)} | {means[cell]:.5f} ± {spread:.5f} |")
    chosen = min(means, key=lambda c: means[c])
    print(f"\nChosen on the validation split: {chosen!r}.")


if __name__ == "__main__":
    main()
