"""Per-step cost of data-parallel training on the CPU (docs/distributed.md).

``python benchmarks/distributed_cost.py steps OUT_DIR [--repeats R]``: trains the recipe of
``benchmarks/results/distributed-cpu.md`` (MultiDigits, MLP 784-256-128, 4096 samples, batch
64: 64 steps) with MGDA at the parameter level, ``balancer.distributed`` global and local, on
1 and 2 processes (``torchrun --standalone``), ``R`` times each (the four cases in turn),
and prints the time per step (the run's ``train_time_s`` / 64: loading, forward, backward,
collectives, optimizer step) as a markdown table: the median and the range of the repeats.

``python benchmarks/distributed_cost.py flag``: times the stop-signal agreement alone (the
``all_reduce`` MAX of one int64 that every process makes after each step), 2000 times on 2
gloo processes, and prints microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RECIPE = {
    "name": "ddp-bench",
    "seed": 0,
    "data": {
        "name": "multidigits",
        "options": {"n_train": 4096, "n_val": 64, "n_test": 64},
        "batch_size": 64,
    },
    "model": {"architecture": "hps", "backbone": "mlp", "backbone_options": {"hidden": [256, 128]}},
    "optim": {"lr": 0.01},
    "train": {"epochs": 1, "progress": False, "deterministic": True, "device": "cpu"},
}
STEPS = 64


def _train(out: Path, name: str, processes: int, overrides: list[str]) -> float:
    """Milliseconds per step of one run."""
    recipe = out / "bench.yaml"
    recipe.write_text(json.dumps({**RECIPE, "output_dir": str(out)}), encoding="utf-8")
    run_dir = out / name
    cli = ["-m", "polytask", "train", str(recipe), "--quiet", "--run-dir", str(run_dir)]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, "--nproc-per-node", str(processes), *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, *overrides], env=env, check=True, capture_output=True)
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    return 1000 * float(results["train_time_s"]) / STEPS


def steps(out: Path, repeats: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cases = [(mode, processes) for mode in ("global", "local") for processes in (1, 2)]
    times: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    for r in range(repeats):  # the cases interleaved, so that a change of load hits all alike
        for mode, processes in cases:
            overrides = ["balancer.name=mgda", f"balancer.distributed={mode}"]
            name = f"mgda-{mode}-{processes}-{r}"
            times[mode, processes].append(_train(out, name, processes, overrides))
    print("| method | balancer.distributed | processes | ms/step (median) | range |")
    print("|---|---|---|---|---|")
    for (mode, processes), values in times.items():
        print(
            f"| mgda | {mode} | {processes} | {statistics.median(values):.1f} | "
            f"{min(values):.1f}-{max(values):.1f} |"
        )


def flag() -> None:
    """Under torchrun: the cost of one agreement on the stop signal."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:  # start 2 processes running this function
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, "--nproc-per-node", "2", __file__, "flag"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, env=env, check=True)
        return
    dist.init_process_group("gloo")
    value = torch.zeros(1, dtype=torch.int64)
    for _ in range(100):  # warm-up
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    calls = 2000
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    elapsed = time.perf_counter() - start
    if dist.get_rank() == 0:
        print(f"stop-signal agreement: {1e6 * elapsed / calls:.0f} us per all_reduce (gloo, 2)")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("steps")
    p.add_argument("out", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    sub.add_parser("flag")
    args = parser.parse_args()
    if args.what == "steps":
        steps(args.out, args.repeats)
    else:
        flag()


if __name__ == "__main__":
    main()
