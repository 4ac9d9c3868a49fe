"""The spread of balancing-cost ratios over repeated runs of ``benchmarks/balancing.py``.

One run of ``balancing.py`` gives, per method, the median over its rounds of paired ratios
(to equal weighting's block and to the K-backward floor's block of the same round) and a
peak-memory ratio. On a shared machine those medians still move from run to run, so a claim
such as "parameter-level CAGrad costs at most 1.05x the floor" holds only as a range over
runs. This script reads the ``--json`` files of several runs and prints, per method and K,
the lowest, median and highest of each ratio over the runs that measured it.

Usage (the recorded results give the exact command)::

    python benchmarks/balancing.py --setting mtan ... --json runs/mtan-1.json   # several times
    python benchmarks/balancing_spread.py runs/mtan-*.json --out benchmarks/results/x.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def paired(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios of two methods' blocks (balancing.py's ratio)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def ratios(run: dict[str, Any]) -> dict[tuple[str, int], dict[str, float]]:
    """(label, K) -> {"x equal", "x floor", "mem x equal"} for one run."""
    rows = run["rows"]
    base = {r["k"]: r for r in rows if r["label"] == "equal"}
    floor = {r["k"]: r for r in rows if r["label"].startswith("K backward")}
    out: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        b, f = base.get(r["k"]), floor.get(r["k"])
        if b is None or f is None:
            continue
        out[(r["label"], r["k"])] = {
            "x equal": paired(r["blocks"], b["blocks"]),
            "x floor": paired(r["blocks"], f["blocks"]),
            "mem x equal": r["peak_mib"] / b["peak_mib"],
        }
    return out


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def render(paths: list[Path], min_runs: int = 1) -> str:
    runs = [json.loads(p.read_text()) for p in paths]
    per_run = [ratios(run) for run in runs]
    keys: list[tuple[str, int]] = []
    for r in per_run:
        keys += [key for key in r if key not in keys]
    lines = [
        f"Runs: {len(runs)} ("
        + "; ".join(f"`{Path(p).name}` {run['date']}" for p, run in zip(paths, runs, strict=True))
        + ").",
        "",
        "Each cell: lowest / median / highest over the runs that measured the method (each "
        "run's own value is already a median of paired per-round ratios).",
        "",
        "| method | K | runs | x equal | x floor | peak memory x equal |",
        "|---|---|---|---|---|---|",
    ]
    for label, k in keys:
        cells = [r[(label, k)] for r in per_run if (label, k) in r]
        if len(cells) < min_runs:
            continue
        lines.append(
            f"| {label} | {k} | {len(cells)} | "
            + " | ".join(
                spread([c[m] for c in cells]) for m in ("x equal", "x floor", "mem x equal")
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+", help="balancing.py --json files")
    parser.add_argument(
        "--min-runs", type=int, default=1, help="leave out methods measured in fewer runs"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    table = render(args.runs, args.min_runs)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
