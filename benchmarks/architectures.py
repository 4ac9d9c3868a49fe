"""Forward + backward + Adam step time and peak memory of every dense-prediction architecture.

Usage (the recorded results in benchmarks/results/ give the exact command):

    python benchmarks/architectures.py --width 0.125 --size 72 96 --out benchmarks/results/architectures-cpu.md

NYUv2-shaped synthetic batches (13-class labels with -1 = ignore, depth with zeros = invalid,
unit normals), the reference losses, equal weighting, Adam; SegNet backbone of the given
width with the reference heads. Fastest of ``--repeats`` blocks of ``--steps`` steps after
warm-up; each architecture in a fresh subprocess so that its peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from polytask.balancing import Equal
from polytask.balancing.base import BackwardContext
from polytask.data.nyuv2_tasks import nyuv2_tasks
from polytask.models import ARCHITECTURES, BACKBONES, MultiTaskModel
from polytask.models.heads_dense import segnet_head
from polytask.tasks import Task

sys.path.insert(0, str(Path(__file__).parent))
from timing import time_blocks

#: benchmark name -> (registered architecture, options); ``stan`` has the semantic task only
SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "single_task": ("single_task", {}),
    "split_standard": ("split", {"variant": "standard"}),
    "split_wide": ("split", {"variant": "wide"}),
    "split_deep": ("split", {"variant": "deep"}),
    "dense": ("dense", {}),
    "cross_stitch": ("cross_stitch", {}),
    "cross_stitch_reference": ("cross_stitch", {"variant": "mtan_reference"}),
    "sluice": ("sluice", {}),
    "soft": ("soft", {}),
    "mtan": ("mtan", {}),
    "stan": ("stan", {}),
}
ARCHS = list(SPECS)


def nyu_tasks(arch: str) -> dict[str, Task]:
    tasks = nyuv2_tasks()
    return {"semantic": tasks["semantic"]} if arch == "stan" else dict(tasks)


def build(arch: str, width: float, size: tuple[int, int]) -> MultiTaskModel:
    name, options = SPECS[arch]
    segnet = BACKBONES.get("segnet")
    model: MultiTaskModel = ARCHITECTURES.get(name)(
        tasks=nyu_tasks(arch),
        backbone=lambda: segnet(input_shape=(3, *size), width=width),
        head=segnet_head,
        **options,
    )
    return model


def measure(args: argparse.Namespace, arch: str) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    size = (args.size[0], args.size[1])
    model = build(arch, args.width, size)
    tasks = nyu_tasks(arch)
    g = torch.Generator().manual_seed(0)
    b, (h, w) = args.batch, size
    x = torch.rand(b, 3, h, w, generator=g)
    label = torch.randint(-1, 13, (b, h, w), generator=g)
    depth = torch.rand(b, 1, h, w, generator=g)
    depth[depth < 0.1] = 0
    normal = F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
    targets = {"semantic": label, "depth": depth, "normal": normal}
    opt_groups = model.optimizer_param_groups(1e-4)
    opt = torch.optim.Adam(opt_groups, lr=1e-4)
    balancer = Equal(list(tasks))
    shared = list(model.shared_parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        losses = {t: tasks[t].compute_loss(out[t], targets[t]) for t in tasks}
        penalty = model.regularization()  # soft sharing, sluice: never weighted
        if penalty is not None:
            penalty.backward(retain_graph=True)
        balancer.backward(losses, BackwardContext(shared_parameters=shared))
        opt.step()

    for _ in range(args.warmup):
        step()
    blocks = time_blocks(step, args.steps, args.repeats)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "ms": 1000 * min(blocks),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=ARCHS)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--size", type=int, nargs=2, default=[72, 96])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    rows = []
    for arch in args.archs:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", arch]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{arch}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((arch, result))
        print(
            f"{arch:14s} {result['params']:>12,d} params {result['ms']:9.1f} ms  peak {result['peak_mib']:7.0f} MiB",
            flush=True,
        )
    command = " ".join(a for a in sys.argv[1:] if not a.startswith("--child"))
    lines = [
        "# Architectures: one training step (forward, reference losses, backward, Adam)",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {command}`",
        f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
        f"SegNet width {args.width}, input 3 x {args.size[0]} x {args.size[1]}, batch {args.batch}; fastest of "
        f"{args.repeats} blocks of {args.steps} steps after {args.warmup} warm-up steps.",
        "",
        "| architecture | parameters | ms / step | x split (standard) | peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    base = dict(rows).get("split_standard")
    for arch, r in rows:
        ratio = f"{r['ms'] / base['ms']:.2f}" if base else "-"
        lines.append(
            f"| {arch} | {r['params']:,} | {r['ms']:.1f} | {ratio} | {r['peak_mib']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
