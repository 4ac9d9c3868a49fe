"""Step time and peak memory of every balancing method relative to equal weighting.

Usage (the recorded results in benchmarks/results/ give the exact command):

    python benchmarks/balancing.py --setting mlp --tasks 3 10 40 --out benchmarks/results/balancing-mlp-cpu.md
    python benchmarks/balancing.py --setting mtan --out benchmarks/results/balancing-mtan-cpu.md

One training step = forward, the task losses, the balancer's backward, an Adam step. Every
method (and the floor for exact per-task gradients: K plain backward passes of the same model,
``torch.autograd.grad`` of each task's loss with respect to every parameter) gets its own copy
of the model; they are timed **interleaved** in one process: ``--repeats`` rounds, each
running one block of ``--steps`` steps of every method in a fresh random order. The ratios
reported are medians of per-round (paired) ratios, which a shared machine's slow phases
affect far less than ratios of times taken minutes apart. Peak resident memory
(``VmHWM``) is measured separately, in a fresh subprocess per method.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.base import BackwardContext, Balancer
from polytask.balancing.gradient import GradientBalancer
from polytask.errors import ConfigError
from polytask.losses import MSELoss
from polytask.metrics.classification import Accuracy
from polytask.models import ARCHITECTURES, BACKBONES, MultiTaskModel, capture_representation
from polytask.models.heads import mlp_head
from polytask.tasks import Task
from polytask.training.build import resolve_shared

FLOOR = "__floor__"


ARCHITECTURE_OPTIONS: dict[str, dict[str, Any]] = {
    "hps": {},
    "mmoe": {"num_experts": 4},
    "ple": {"shared_experts": 2, "task_experts": 1},
}
"""The MLP setting's architectures (``--architecture``) and their options."""


def mlp_setting(
    k: int,
    batch: int,
    architecture: str = "hps",
    inputs: int = 256,
    hidden: tuple[int, ...] = (512, 512, 256),
) -> tuple[MultiTaskModel, Tensor, dict[str, Tensor], dict[str, Task]]:
    tasks = {
        f"t{i}": Task(name=f"t{i}", loss=MSELoss(), metrics={"accuracy": Accuracy}, output_dim=1)
        for i in range(k)
    }
    mlp = BACKBONES.get("mlp")
    extra: dict[str, Any] = dict(ARCHITECTURE_OPTIONS[architecture])
    if architecture != "hps":
        extra["input_shape"] = (inputs,)
    model = ARCHITECTURES.get(architecture)(
        tasks=tasks,
        backbone=lambda: mlp(input_shape=(inputs,), hidden=hidden),
        head=lambda t, f: mlp_head(t, f, hidden=64),
        **extra,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, inputs, generator=g)
    y = {t: torch.randn(batch, 1, generator=g) for t in tasks}
    return model, x, y, tasks


def mtan_setting(
    batch: int, width: float, size: tuple[int, int]
) -> tuple[MultiTaskModel, Tensor, dict[str, Tensor], dict[str, Task]]:
    from polytask.data.nyuv2_tasks import nyuv2_tasks
    from polytask.models.heads_dense import segnet_head

    tasks = nyuv2_tasks()
    segnet = BACKBONES.get("segnet")
    model = ARCHITECTURES.get("mtan")(
        tasks=tasks, backbone=lambda: segnet(input_shape=(3, *size), width=width), head=segnet_head
    )
    g = torch.Generator().manual_seed(0)
    h, w = size
    x = torch.rand(batch, 3, h, w, generator=g)
    label = torch.randint(-1, 13, (batch, h, w), generator=g)
    depth = torch.rand(batch, 1, h, w, generator=g)
    depth[depth < 0.1] = 0
    normal = torch.nn.functional.normalize(torch.randn(batch, 3, h, w, generator=g), dim=1)
    return model, x, {"semantic": label, "depth": depth, "normal": normal}, tasks


def build(
    args: argparse.Namespace, method: str, options: dict[str, Any], k: int
) -> Callable[[], None]:
    """One method's own model (same initialisation for every method), optimizer and step."""
    torch.manual_seed(0)
    if args.setting == "mlp":
        model, x, y, tasks = mlp_setting(
            k, args.batch, args.architecture, args.inputs, tuple(args.hidden)
        )
    else:
        model, x, y, tasks = mtan_setting(args.batch, args.width, tuple(args.size))
    names = list(tasks)
    balancer: Balancer | None = None
    if method != FLOOR:
        balancer = BALANCERS.get(method)(tasks=names, **options)
        if isinstance(balancer, GradientBalancer):
            balancer.gramian_precision = args.gramian
    params = list(model.parameters()) + (list(balancer.parameters()) if balancer else [])
    opt = torch.optim.Adam(params, lr=1e-4)
    shared, others = resolve_shared(model, None)

    parts = balancer.batch_parts if balancer is not None else 1
    cuts = [(i * len(x) // parts, (i + 1) * len(x) // parts) for i in range(parts)]
    slices = [(x[a:b], {t: v[a:b] for t, v in y.items()}) for a, b in cuts]
    param_names = {id(p): n for n, p in model.named_parameters()}

    def losses_of(
        part: tuple[Tensor, dict[str, Tensor]], values: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        inputs, targets = part
        out = (
            model(inputs)
            if values is None
            else torch.func.functional_call(model, values, (inputs,))
        )
        return {t: tasks[t].compute_loss(out[t], targets[t]) for t in names}

    def recompute(
        evaluation: bool = False, part: int | None = None, values: Any = None
    ) -> dict[str, Tensor]:
        """What the trainer's recompute does: a forward pass on buffer copies."""
        state = {n: b.clone() for n, b in model.named_buffers()}
        state.update({param_names[id(p)]: v for p, v in (values or {}).items()})
        model.train(not evaluation)
        try:
            return losses_of(slices[0 if part is None else part], state)
        finally:
            model.train(True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        feature = balancer is not None and balancer.needs_representation
        part_losses: list[dict[str, Tensor]] = []
        with capture_representation(model, feature) as rep:
            if parts == 1:
                losses = losses_of((x, y))
            else:  # the trainer's parts: one forward per part, the batch loss their mean
                part_losses = [losses_of(part) for part in slices]
                sizes = [b - a for a, b in cuts]
                losses = {
                    t: sum(n * p[t] for n, p in zip(sizes, part_losses, strict=True)) / len(x)
                    for t in names
                }
        if balancer is None:
            for i, t in enumerate(names):
                grads = torch.autograd.grad(
                    losses[t], params, retain_graph=i < len(names) - 1, allow_unused=True
                )
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
        else:
            ctx = BackwardContext(
                shared_parameters=shared,
                other_parameters=others,
                representation=rep,
                parts=part_losses,
                recompute=recompute,
                learning_rate=lambda p: (1e-4, 0.0),
            )
            balancer.backward(losses, ctx)
        opt.step()
        if balancer is not None:
            balancer.after_optimizer_step(
                None
                if not balancer.needs_post_step_losses
                else {t: v.detach() for t, v in recompute().items()}
            )

    return step


def peak_memory(args: argparse.Namespace, method: str, options: dict[str, Any], k: int) -> float:
    """Peak resident memory (MiB) of a fresh process that builds one method and runs it."""
    torch.set_num_threads(args.threads)
    step = build(args, method, options, k)
    for _ in range(args.warmup + args.steps):
        step()
    return peak_rss_mib()


def peak_rss_mib() -> float:
    """This process's peak resident memory. On Linux ``VmHWM``: ``ru_maxrss`` would carry
    over the parent's peak through fork and exec, and the parent holds every model."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleaved_times(
    args: argparse.Namespace, todo: list[tuple[str, str, dict[str, Any]]], k: int
) -> dict[str, list[float]]:
    """Seconds per step of every method, one block of ``--steps`` steps per method and
    round, the methods in a new random order each round (all in this process).

    Interleaving spreads slow phases of a shared machine over every method alike, so that
    the ratio of two methods' blocks in the same round (a paired comparison) is far less
    noisy than a ratio of times measured minutes apart.
    """
    torch.set_num_threads(args.threads)
    steps = {label: build(args, method, options, k) for label, method, options in todo}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {label: [] for label in steps}
    order = list(steps)
    rng = random.Random(k)
    for _ in range(args.repeats):
        rng.shuffle(order)
        for label in order:
            step = steps[label]
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[label].append((time.perf_counter() - start) / args.steps)
    return times


def methods() -> list[tuple[str, str, dict[str, Any]]]:
    """(label, registered name, options) for every method and level."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for name in BALANCERS.names():
        if name.startswith("test_"):
            continue
        probe = BALANCERS.get(name)(tasks=["a", "b", "c"])
        if isinstance(probe, GradientBalancer):
            builder = BALANCERS.get(name)
            if "level" not in inspect.signature(builder).parameters:  # one level only (consmtl)
                out.append((f"{name} (parameter)", name, {}))
                continue
            out.append((f"{name} (parameter)", name, {"level": "parameter"}))
            try:  # methods that need parameter gradients (modo, sdmgrad, samo) refuse it
                builder(tasks=["a", "b", "c"], level="feature")
            except ConfigError:
                continue
            out.append((f"{name} (feature)", name, {"level": "feature"}))
        else:
            out.append((name, name, {}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=["mlp", "mtan"], default="mlp")
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 10, 40])
    parser.add_argument(
        "--architecture", choices=sorted(ARCHITECTURE_OPTIONS), default="hps", help="(mlp)"
    )
    parser.add_argument("--inputs", type=int, default=256, help="input features (mlp)")
    parser.add_argument(
        "--hidden", type=int, nargs="+", default=[512, 512, 256], help="MLP widths (mlp)"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=float, default=0.125, help="SegNet width multiplier (mtan)")
    parser.add_argument("--size", type=int, nargs=2, default=[72, 96], help="input H W (mtan)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="registered method names to run")
    parser.add_argument(
        "--gramian",
        choices=["float64", "float32"],
        default="float64",
        help="balancer.gramian_precision",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--json",
        type=Path,
        help="also write every block time and peak (for benchmarks/balancing_spread.py)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        peak = peak_memory(args, spec["method"], spec["options"], spec["k"])
        print(json.dumps({"peak_mib": peak}))
        return
    ks = args.tasks if args.setting == "mlp" else [3]
    rows: list[tuple[str, int, dict[str, Any]]] = []
    todo = [("equal", "equal", {}), ("K backward passes (floor)", FLOOR, {})]
    todo += [m for m in methods() if m[1] != "equal" and (not args.only or m[1] in args.only)]
    for k in ks:
        times = interleaved_times(args, todo, k)
        for label, method, options in todo:
            child = json.dumps({"method": method, "options": options, "k": k})
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", child]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"{label} K={k}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            peak = float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])
            rows.append((label, k, {"blocks": times[label], "peak_mib": peak}))
            print(
                f"K={k:3d} {label:32s} {1000 * min(times[label]):9.2f} ms  peak {peak:8.1f} MiB",
                flush=True,
            )
    table = render(rows, args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv[1:]),
                    "setting": args.setting,
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                    "torch": torch.__version__,
                    "threads": args.threads,
                    "rows": [
                        {"label": label, "k": k, "blocks": r["blocks"], "peak_mib": r["peak_mib"]}
                        for label, k, r in rows
                    ],
                },
                indent=1,
            )
        )


def render(rows: list[tuple[str, int, dict[str, Any]]], args: argparse.Namespace) -> str:
    base = {k: r for label, k, r in rows if label == "equal"}
    floor = {k: r for label, k, r in rows if label.startswith("K backward")}
    command = " ".join(a for a in sys.argv[1:] if not a.startswith("--child"))
    lines = [
        f"# Balancing cost, setting `{args.setting}`"
        + (f", architecture `{args.architecture}`" if args.setting == "mlp" else ""),
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {command}`",
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. {args.repeats} rounds; in each "
        f"round every method runs one block of {args.steps} steps, in a random order, all in "
        f"one process (after {args.warmup} warm-up steps each). **x equal** and **x floor** are "
        "the median over rounds of the ratio of the method's block to equal weighting's (the "
        "floor's) block of the same round. Peak memory: a fresh process per method.",
        "",
        "| method | K | fastest ms / step | median ms | x equal | x floor | peak RSS MiB "
        "| x equal |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def paired(a: list[float], b: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(a, b, strict=True))

    for label, k, r in rows:
        b, f = base.get(k), floor.get(k)
        blocks = r["blocks"]
        fastest, median = 1000 * min(blocks), 1000 * statistics.median(blocks)
        if b and f:
            lines.append(
                f"| {label} | {k} | {fastest:.2f} | {median:.2f} | "
                f"{paired(blocks, b['blocks']):.2f} | {paired(blocks, f['blocks']):.2f} | "
                f"{r['peak_mib']:.0f} | {r['peak_mib'] / b['peak_mib']:.2f} |"
            )
        else:
            lines.append(
                f"| {label} | {k} | {fastest:.2f} | {median:.2f} | - | - | {r['peak_mib']:.0f} | - |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
