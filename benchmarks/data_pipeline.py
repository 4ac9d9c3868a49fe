"""Does the NYUv2 input pipeline keep up with training? Loader throughput against step time.

Usage (the recorded results in benchmarks/results/ give the exact command):

    python benchmarks/data_pipeline.py --out benchmarks/results/data-pipeline-cpu.md

Writes (in a temporary folder) a NYUv2-shaped copy of the published layout, 288 x 384,
float64 on disk as users report for the preprocessed copies, and measures:

1. the build of the bundle: the header scan of every file, and reading the training labels
   once for ``class_pixels``; the scan also on a folder with the full NYUv2 file count
   (795 + 654 samples, 5,796 files, at 8 x 8 pixels: the scan reads headers only);
2. the decoding of one sample (``np.load`` and conversion to float32 channels-first) by the
   reader and by two common alternatives;
3. the loader alone, polytask's path (:func:`polytask.data.loading.iterate_batches` over an
   :func:`~polytask.data.loading.epoch_schedule`, batch size 2, pin_memory off), with and
   without augmentation, for each number of workers; each epoch builds its DataLoader (and
   starts its workers) as the trainer does, and the time includes that;
4. one training step of MTAN-SegNet at batch 2 (forward, reference losses, backward, Adam) at
   ``--width`` and the given input size.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from polytask.balancing import Equal
from polytask.balancing.base import BackwardContext
from polytask.data import dense_folder
from polytask.data.loading import JOINT, epoch_schedule, iterate_batches
from polytask.data.nyuv2 import NYUV2_LAYOUT, nyuv2
from polytask.data.nyuv2_tasks import nyuv2_tasks

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from architectures import build  # noqa: E402
from timing import time_blocks  # noqa: E402

from dense_layout import write_nyuv2  # noqa: E402


def fastest(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_build(root: Path, repeats: int) -> dict[str, float]:
    def scan() -> None:
        train = dense_folder.scan_split(root, "train", NYUV2_LAYOUT)
        dense_folder.scan_split(root, "val", NYUV2_LAYOUT, train)

    def count() -> None:
        dense_folder._COUNT_CACHE.clear()
        dense_folder.count_class_pixels(dense_folder.DenseFolderDataset(train, NYUV2_LAYOUT))

    train = dense_folder.scan_split(root, "train", NYUV2_LAYOUT)
    dense_folder._HEADER_CACHE.clear()
    return {
        "scan": fastest(scan, repeats),
        "count": fastest(count, repeats),
        "labels": train.size,
    }


def time_full_count_scan(base: Path, repeats: int) -> tuple[float, int]:
    root = write_nyuv2(base / "nyu-count", train=795, val=654, size=(8, 8))

    def scan() -> None:
        dense_folder._HEADER_CACHE.clear()
        train = dense_folder.scan_split(root, "train", NYUV2_LAYOUT)
        dense_folder.scan_split(root, "val", NYUV2_LAYOUT, train)

    return fastest(scan, repeats), 4 * (795 + 654)


def decode_variants(root: Path, n: int, repeats: int) -> dict[str, float]:
    """ms per sample: converting the loaded float64 arrays three ways, and the whole reader."""
    folders = ("image", "depth", "normal")
    arrays = [[np.load(root / "train" / f / f"{i}.npy") for f in folders] for i in range(n)]

    def moveaxis_astype() -> None:
        for sample in arrays:
            for array in sample:
                torch.from_numpy(np.moveaxis(array, -1, 0).astype(np.float32))

    def float_contiguous() -> None:
        for sample in arrays:
            for array in sample:
                torch.from_numpy(array).permute(2, 0, 1).float().contiguous()

    def one_copy() -> None:
        for sample in arrays:
            for array in sample:
                dense_folder._channels_first(array)

    dataset = dense_folder.DenseFolderDataset(
        dense_folder.scan_split(root, "train", NYUV2_LAYOUT), NYUV2_LAYOUT, range(n)
    )

    def reader() -> None:
        for i in range(n):
            dataset[i]

    def ms(fn: Callable[[], None]) -> float:
        return 1000 * fastest(fn, repeats) / n

    return {
        "`np.moveaxis(a, -1, 0).astype(float32)`: one copy, but the result is not contiguous "
        "(the transposing copy happens later, in the collate)": ms(moveaxis_astype),
        "`from_numpy(a).permute(2, 0, 1).float().contiguous()`: two copies": ms(float_contiguous),
        "polytask: `from_numpy(a).permute(2, 0, 1).to(float32, "
        "memory_format=contiguous_format)`: one copy, contiguous": ms(one_copy),
        "polytask's whole sample: `np.load` of the 4 files, value checks (image in [0, 1], "
        "label whole and in [-1, 13)), conversion": ms(reader),
    }


def time_loader(
    root: Path, augment: bool, workers: int, batch: int, epochs: int
) -> tuple[float, int]:
    """Seconds per epoch (fastest of ``epochs``), and the batches per epoch."""
    train = nyuv2(root=str(root), augment=augment).train
    n = len(train)  # type: ignore[arg-type]
    times = []
    steps: list[dict[str, list[int]]] = []
    for epoch in range(epochs):
        steps = epoch_schedule({JOINT: n}, batch_size=batch, seed=0, epoch=epoch)
        start = time.perf_counter()
        for _ in iterate_batches({JOINT: train}, steps, num_workers=workers, seed=0):
            pass
        times.append(time.perf_counter() - start)
    return min(times), len(steps)


def time_step(width: float, size: tuple[int, int], batch: int, steps: int, repeats: int) -> float:
    """Seconds per MTAN-SegNet training step (forward, losses, backward, Adam)."""
    torch.manual_seed(0)
    model = build("mtan", width, size)
    tasks = nyuv2_tasks()
    g = torch.Generator().manual_seed(0)
    h, w = size
    x = torch.rand(batch, 3, h, w, generator=g)
    depth = torch.rand(batch, 1, h, w, generator=g)
    depth[depth < 0.1] = 0
    targets = {
        "semantic": torch.randint(-1, 13, (batch, h, w), generator=g),
        "depth": depth,
        "normal": F.normalize(torch.randn(batch, 3, h, w, generator=g), dim=1),
    }
    opt = torch.optim.Adam(model.optimizer_param_groups(1e-4), lr=1e-4)
    balancer = Equal(list(tasks))
    shared = list(model.shared_parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        losses = {t: tasks[t].compute_loss(out[t], targets[t]) for t in tasks}
        balancer.backward(losses, BackwardContext(shared_parameters=shared))
        opt.step()

    step()  # warm-up
    return min(time_blocks(step, steps, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=64, help="training images written")
    parser.add_argument("--size", type=int, nargs=2, default=[288, 384])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2, help="loader epochs; the fastest counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = (args.size[0], args.size[1])
    started = time.perf_counter()
    load = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = write_nyuv2(base / "nyu", train=args.train, val=2, size=size)
        build_times = time_build(root, args.repeats)
        full_scan, full_files = time_full_count_scan(base, args.repeats)
        decode = decode_variants(root, min(16, args.train), args.repeats)
        print(f"build {build_times}, full-count scan {full_scan:.3f} s", flush=True)
        loader_rows = []
        for augment in (False, True):
            for workers in args.workers:
                seconds, batches = time_loader(root, augment, workers, args.batch, args.epochs)
                loader_rows.append((augment, workers, seconds, batches))
                print(
                    f"augment={augment} workers={workers}: {1000 * seconds / batches:.1f} ms/batch",
                    flush=True,
                )
    step_s = time_step(args.width, size, args.batch, args.steps, args.repeats)
    print(f"step {1000 * step_s:.0f} ms", flush=True)
    elapsed = time.perf_counter() - started

    n = args.train
    per_label_ms = 1000 * build_times["count"] / build_times["labels"]
    argv = " ".join(sys.argv[1:])
    lines = [
        "# Input pipeline: NYUv2 loader throughput against the training step",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {argv}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}, "
        f"torch {torch.__version__}, numpy {np.__version__}, {time.strftime('%Y-%m-%d')}; "
        f"load average {load:.1f} at the start (other processes were running). "
        f"{n} training images of {size[0]} x {size[1]} written as float64 .npy files (page "
        f"cache warm); batch {args.batch}; whole run {elapsed:.0f} s.",
        "",
        "## Building the bundle",
        "",
        "| what | time |",
        "|---|---|",
        f"| header scan of {4 * (n + 2)} files ({n} + 2 samples x 4 modalities) "
        f"| {1000 * build_times['scan']:.1f} ms |",
        f"| header scan at the full NYUv2 file count ({full_files:,} files, 8 x 8 pixels) "
        f"| {1000 * full_scan:.0f} ms |",
        f"| `class_pixels`: reading and counting {n} training labels | "
        f"{1000 * build_times['count']:.0f} ms ({per_label_ms:.2f} ms per label, so about "
        f"{795 * per_label_ms / 1000:.1f} s for NYUv2's 795, once per process) |",
        "",
        "## Decoding one sample (float64 on disk)",
        "",
        "Converting image, depth and normal (H x W x C float64, already loaded) to float32 "
        "channels first, and then the reader's whole sample:",
        "",
        "| decoding | ms / sample |",
        "|---|---|",
    ]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in decode.items()]
    lines += [
        "",
        f"## The loader alone ({n} images per epoch, fastest of {args.epochs} epochs, "
        "worker start-up included)",
        "",
        "The rows with workers include starting them, once per epoch as in the trainer (each "
        "epoch builds its DataLoader); over a short epoch that start-up dominates, and on two "
        "cores the workers compete with the main process.",
        "",
        "| augmentation | workers | samples / s | ms / batch |",
        "|---|---|---|---|",
    ]
    for augment, workers, seconds, batches in loader_rows:
        lines.append(
            f"| {'on' if augment else 'off'} | {workers} | {n / seconds:.0f} | "
            f"{1000 * seconds / batches:.1f} |"
        )
    slowest = max(1000 * s / b for _, w, s, b in loader_rows if w == 0)
    step_ms = 1000 * step_s
    lines += [
        "",
        "## Against one training step",
        "",
        "| model | ms / step (batch 2) |",
        "|---|---|",
        f"| MTAN-SegNet, width {args.width} (CPU-sized), {size[0]} x {size[1]}, measured here "
        f"| {step_ms:.0f} |",
        "| MTAN-SegNet, width 1 (the reference), 288 x 384, from "
        "`architectures-cpu-nyuv2.md` | 25933 |",
        "",
        f"The slowest loader configuration in the main process (augmentation on, no worker) "
        f"takes {slowest:.1f} ms per batch, {100 * slowest / step_ms:.1f} % of the CPU-sized "
        f"step and {100 * slowest / 25933:.2f} % of the full-width step: "
        + (
            "the loader keeps up without workers on the CPU. "
            if slowest < 0.1 * step_ms
            else "the loader is a noticeable part of the CPU-sized step; use workers. "
        )
        + "In the main process its time adds to every step (nothing overlaps); with "
        "`data.num_workers >= 1` it overlaps with the step, at the cost of starting the "
        "workers every epoch.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
