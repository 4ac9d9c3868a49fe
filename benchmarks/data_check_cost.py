"""What the per-batch data check (polytask.data.checks) costs a training step, on the CPU.

Usage (the recorded results in benchmarks/results/ give the exact command):

    python benchmarks/data_check_cost.py configs/multidigits.yaml configs/tabular/yeast.yaml \
        --out benchmarks/results/data-check-cost-cpu.md

For every recipe, two measures:

- **per batch**: the median time of ``check_step`` on the recipe's own training batches,
  against the median time of a whole training step (the trainer's ``time_s`` over the
  epoch's steps, data loading included), so the share of a step the check takes;
- **paired epochs**: ``--rounds`` rounds, each training ``--epochs`` epochs with the check
  and without it (in a random order per round), and the median ratio of seconds per epoch
  (the first epoch of every run is left out: warm-up). On a shared machine this one is
  noisier than the first.

Run reports are not written (they are not part of training).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import polytask.evaluation as evaluation
import polytask.report as report
import polytask.training.trainer as trainer_module
from polytask.config import load_config, to_dict
from polytask.data.checks import check_step
from polytask.data.loading import epoch_schedule, iterate_batches
from polytask.evaluation import split_datasets
from polytask.training import RunDirectory, Trainer
from polytask.training.build import build_components


def _off(*args: Any, **kwargs: Any) -> None:
    return None


def _epoch_seconds(recipe: str, overrides: list[str], epochs: int, check: bool) -> list[float]:
    config = load_config(recipe, [*overrides, f"train.epochs={epochs}", "train.progress=false"])
    trainer_module.check_step = check_step if check else _off  # type: ignore[assignment]
    evaluation.check_step = check_step if check else _off  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = RunDirectory.create(Path(tmp) / "run", to_dict(config))
            trainer = Trainer(build_components(config), run, console=False)
            trainer.fit()
            times = [r["time_s"] for r in run.read_metrics()]
    finally:
        trainer_module.check_step = check_step  # type: ignore[assignment]
        evaluation.check_step = check_step  # type: ignore[assignment]
    per_epoch = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    return per_epoch[1:]


def _per_batch(recipe: str, overrides: list[str]) -> tuple[float, int, str]:
    """Median seconds of check_step on the first training batches, their count, a shape."""
    config = load_config(recipe, overrides)
    c = build_components(config)
    datasets = split_datasets(c.bundle.train, c.tasks)
    steps = epoch_schedule(
        {k: len(d) for k, d in datasets.items()},
        batch_size=config.data.batch_size,
        seed=0,
        epoch=0,
        strategy=config.data.sampling,
    )[:20]
    batches = list(iterate_batches(datasets, steps))
    shape = tuple(next(iter(batches[0].values()))["input"].shape)
    timings = []
    for step, batch in zip(steps, batches, strict=True):
        for _ in range(5):
            started = time.perf_counter()
            check_step(batch, step, c.tasks, split="train", where="", input_shape=None)
            timings.append(time.perf_counter() - started)
    return statistics.median(timings), len(steps), str(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every recipe")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report.write_run_report = lambda run: None  # type: ignore[assignment]
    rows = []
    for recipe in args.recipes:
        check_s, _n, shape = _per_batch(recipe, args.set)
        ratios, with_check, without = [], [], []
        for _ in range(args.rounds):
            order = [True, False]
            random.shuffle(order)
            seconds = {flag: _epoch_seconds(recipe, args.set, args.epochs, flag) for flag in order}
            on, off = statistics.mean(seconds[True]), statistics.mean(seconds[False])
            with_check.append(on)
            without.append(off)
            ratios.append(on / off)
        config = load_config(recipe, args.set)
        c = build_components(config)
        datasets = split_datasets(c.bundle.train, c.tasks)
        steps = len(
            epoch_schedule(
                {k: len(d) for k, d in datasets.items()},
                batch_size=config.data.batch_size,
                seed=0,
                epoch=0,
                strategy=config.data.sampling,
            )
        )
        step_s = statistics.median(without) / steps
        rows.append(
            f"| {recipe} | {shape} | {check_s * 1e6:.0f} us | {step_s * 1e3:.2f} ms | "
            f"{100 * check_s / step_s:.2f} % | {statistics.median(without):.3f} s | "
            f"{statistics.median(with_check):.3f} s | {statistics.median(ratios):.3f} |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# The per-batch data check's cost (CPU, 1 thread)",
            "",
            f"`python benchmarks/data_check_cost.py {' '.join(args.recipes)}"
            + (f" --set {' '.join(args.set)}" if args.set else "")
            + f" --epochs {args.epochs} --rounds {args.rounds}`",
            "",
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"Python {sys.version.split()[0]}; a shared machine.",
            "",
            "| recipe | batch input | check per batch | step (no check) | check / step | "
            "epoch without | epoch with | with / without (median of rounds) |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
