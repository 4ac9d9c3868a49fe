"""Training time per epoch of a recipe under several balancing methods and levels, paired.

Usage (the recorded results in benchmarks/results/ give the exact command):

    python benchmarks/epoch_cost.py configs/tabular/yeast.yaml \
        --architectures hps mmoe ple --out benchmarks/results/epoch-cost-yeast-cpu.md

Where ``benchmarks/balancing.py`` times one synthetic step, this trains the recipe itself
with polytask's trainer: the time is the trainer's own ``time_s`` (the training steps of an
epoch, data loading included; validation excluded). Every variant (architecture x method x
level) trains ``--epochs`` epochs per round; the rounds run every variant once, in a fresh
random order, so that a slow phase of a shared machine hits every variant alike. The first
epoch of every run is left out (warm-up). **x equal** is the median over rounds of the ratio
of the variant's seconds per epoch to those of equal weighting on the same architecture in
the same round. Run reports are not written (they are not part of training).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import polytask.report as report
from polytask.config import load_config, to_dict
from polytask.training import RunDirectory, Trainer
from polytask.training.build import build_components

METHODS: list[tuple[str, list[str]]] = [
    ("equal", ["balancer.name=equal"]),
    ("pcgrad (parameter)", ["balancer.name=pcgrad", "balancer.options.level=parameter"]),
    ("pcgrad (feature)", ["balancer.name=pcgrad", "balancer.options.level=feature"]),
    ("mgda (parameter)", ["balancer.name=mgda", "balancer.options.level=parameter"]),
    ("mgda (feature)", ["balancer.name=mgda", "balancer.options.level=feature"]),
]
"""(label, overrides) of the methods timed; the first is the reference."""
ARCHITECTURES: dict[str, list[str]] = {
    "hps": ["model.architecture=hps"],
    "mmoe": ["model.architecture=mmoe", "model.options={num_experts: 4}"],
    "ple": ["model.architecture=ple", "model.options={shared_experts: 2, task_experts: 1}"],
}


def seconds_per_epoch(config: Path, overrides: list[str], epochs: int, root: Path) -> float:
    """Median training seconds of epochs 2..``epochs`` of one fresh run."""
    cfg = load_config(config, [*overrides, f"train.epochs={epochs}", f"output_dir={root}"])
    run = RunDirectory.create(root / f"run-{time.monotonic_ns()}", to_dict(cfg))
    Trainer(build_components(cfg), run, console=False).fit()
    cumulative = [float(r["time_s"]) for r in run.read_metrics()]
    per_epoch = [b - a for a, b in itertools.pairwise(cumulative)]
    return statistics.median(per_epoch)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path)
    parser.add_argument("--architectures", nargs="+", default=["hps"], choices=ARCHITECTURES)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # the run report is not training: leave it out of the timed runs
    report.write_run_report = lambda run: None
    variants = [
        (arch, label, ARCHITECTURES[arch] + overrides)
        for arch in args.architectures
        for label, overrides in METHODS
    ]
    times: dict[tuple[str, str], list[float]] = {(a, m): [] for a, m, _ in variants}
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = list(variants)
            rng.shuffle(order)
            for arch, label, overrides in order:
                t = seconds_per_epoch(args.config, overrides, args.epochs, Path(tmp))
                times[(arch, label)].append(t)
                print(f"round {r + 1} {arch:5s} {label:20s} {1000 * t:8.1f} ms / epoch", flush=True)
    table = render(times, args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


def render(times: dict[tuple[str, str], list[float]], args: argparse.Namespace) -> str:
    command = " ".join(sys.argv[1:])
    reference = METHODS[0][0]
    lines = [
        f"# Training time per epoch, `{args.config.as_posix()}`",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {command}`",
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. {args.repeats} rounds of "
        f"every variant in a random order, {args.epochs} epochs a run, the first left out. "
        "**x equal**: the median over rounds of the ratio to equal weighting on the same "
        "architecture in the same round.",
        "",
        "| architecture | method | median ms / epoch | fastest | x equal |",
        "|---|---|---|---|---|",
    ]
    for (arch, label), values in times.items():
        base = times[(arch, reference)]
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        lines.append(
            f"| {arch} | {label} | {1000 * statistics.median(values):.1f} | "
            f"{1000 * min(values):.1f} | {ratio:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
