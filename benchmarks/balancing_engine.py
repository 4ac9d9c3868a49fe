"""Where a gradient method's step goes: the engine's own work, timed phase by phase.

Step-time ratios of a few percent drown in run-to-run noise on a shared CPU (see
``benchmarks/balancing.py``). This script measures the excess directly: for each method it
times, inside real training steps, the autograd passes and the engine's own work (copying
rows into J, the Gramian, the method's solve and combination, scattering the result), by
wrapping the engine's methods with timers, and compares the sum with equal weighting's step.

Usage (the recorded results give the exact command):

    python benchmarks/balancing_engine.py --setting mtan --out benchmarks/results/balancing-engine-mtan-cpu.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from balancing import build, methods
from timing import time_blocks

from polytask.balancing import gradient


def timed(totals: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    return wrapper


def measure(args: argparse.Namespace, method: str, options: dict[str, Any]) -> dict[str, float]:
    """Milliseconds per step: the whole step, the balancer's backward, and its phases."""
    totals: dict[str, float] = defaultdict(float)
    k = args.tasks
    originals = {
        "rows": (gradient.GradientBalancer, "_parameter_rows"),
        "feature_rows": (gradient.GradientBalancer, "_feature_rows"),
        "gramian": (gradient.GradientBalancer, "gramian"),
        "backward": (gradient.GradientBalancer, "backward"),
    }
    saved = {name: getattr(cls, attr) for name, (cls, attr) in originals.items()}
    for name, (cls, attr) in originals.items():
        setattr(cls, attr, timed(totals, name, saved[name]))
    autograd_backward = torch.autograd.backward
    gradient.torch.autograd.backward = timed(totals, "trunk", autograd_backward)  # type: ignore[attr-defined]
    try:
        torch.set_num_threads(args.threads)
        step = build(args, method, options, k)
        for _ in range(args.warmup):
            step()
        totals.clear()
        blocks = time_blocks(step, args.steps, args.repeats)
    finally:
        for name, (cls, attr) in originals.items():
            setattr(cls, attr, saved[name])
        gradient.torch.autograd.backward = autograd_backward  # type: ignore[attr-defined]
    n = args.steps * args.repeats
    out = {key: 1000 * value / n for key, value in totals.items()}
    out["step"] = 1000 * statistics.median(blocks)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=["mlp", "mtan"], default="mtan")
    parser.add_argument("--tasks", type=int, default=3, help="K (mlp)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--size", type=int, nargs=2, default=[72, 96])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gramian", choices=["float64", "float32"], default="float64")
    parser.add_argument("--only", nargs="*", help="registered method names to run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.setting == "mtan":
        args.tasks = 3
    rows = []
    for label, method, options in methods():
        if "level" not in options or (args.only and method not in args.only):
            continue
        r = measure(args, method, options)
        if "backward" not in r:  # a method with its own step (modo, sdmgrad): no phases
            print(f"{label:28s} skipped: it does not run the engine's backward", flush=True)
            continue
        rows_ms = r.get("rows", 0.0) + r.get("feature_rows", 0.0)
        # the engine's own work: the balancer's backward minus its autograd passes
        # (rows: the K passes or the one pass through the heads, which include the
        # copies into J; trunk: the final pass at feature level)
        own = r["backward"] - rows_ms - r.get("trunk", 0.0)
        rows.append((label, r, own))
        print(f"{label:28s} step {r['step']:8.2f} ms  own work {own:6.2f} ms", flush=True)
    command = " ".join(sys.argv[1:])
    lines = [
        f"# Engine work per step, setting `{args.setting}`, K = {args.tasks}",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {command}`",
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Per step, averaged over "
        f"{args.repeats} blocks of {args.steps} steps after {args.warmup} warm-up steps.",
        "",
        "**own work** is the time of the balancer's backward outside its autograd passes: "
        "scaling, the Gramian, the method's solve and combination, the finite check and "
        "handing the result to the parameters or the trunk (it excludes the copies of rows "
        "into J, which run inside the rows phase). **rows** is the phase producing J "
        "(K backward passes at parameter level, one pass through the task-specific parts at "
        "feature level), **trunk** the feature level's pass through the shared trunk.",
        "",
        "| method | step ms (median) | rows ms | trunk ms | Gramian ms | own work ms "
        "| own / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r, own in rows:
        rows_ms = r.get("rows", 0.0) + r.get("feature_rows", 0.0)
        lines.append(
            f"| {label} | {r['step']:.2f} | {rows_ms:.2f} | {r.get('trunk', 0.0):.2f} | "
            f"{r.get('gramian', 0.0):.2f} | {own:.2f} | {100 * own / r['step']:.1f} % |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
