"""Step time of a SAMO step (Ban, Subramani & Ji, ICCV 2025) relative to equal weighting,
the K-backward floor and parameter-level MGDA, on the MLP setting of benchmarks/balancing.py.

Written before polytask's ``samo`` balancer (docs/balancing.md, "Sharpness-aware wrapping"), this
script runs the step of the official code (``experiments/nyuv2/trainer_samo.py``) outside the engine,
to measure what it would cost:

1. one forward pass and the backward pass of the mean loss (the global gradient);
2. per task, a zeroth-order estimate of its shared gradient from two forward passes at
   ``theta +- eps z`` (one Gaussian ``z``): ``(L_k(+) - L_k(-)) / (2 eps) z``;
3. per task, the perturbation ``rho g / ||g||`` of the shared parameters with
   ``g = (1 - beta) * global + beta * estimate`` and ``rho h / ||h||`` of its own head
   (``h`` the head's global gradient), then one forward and backward pass of that task's
   loss at the perturbed point, and the parameters restored;
4. the K perturbed shared gradients combined by the wrapped method (here MGDA), the heads
   given their perturbed gradients; one Adam step.

The official code deep-copies the model for every estimate; here the parameters are
perturbed and restored in place (cheaper). Timing: interleaved blocks, medians of the
per-round ratios, as benchmarks/balancing.py.

    python benchmarks/samo_cost.py --tasks 3 --steps 5 --repeats 7
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from balancing import mlp_setting

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation import MGDA
from polytask.balancing.base import BackwardContext
from polytask.training.build import resolve_shared


def build(kind: str, k: int, batch: int, rho: float, beta: float, eps: float) -> Callable[[], None]:
    torch.manual_seed(0)
    model, x, y, tasks = mlp_setting(k, batch)
    names = list(tasks)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    shared, others = resolve_shared(model, None)
    heads = {t: list(model.heads[t].parameters()) for t in names}  # type: ignore[index]

    def losses_of() -> dict[str, torch.Tensor]:
        out = model(x)
        return {t: tasks[t].compute_loss(out[t], y[t]) for t in names}

    if kind in ("equal", "mgda"):
        balancer = BALANCERS.get(kind)(tasks=names)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            ctx = BackwardContext(shared_parameters=shared, other_parameters=others)
            balancer.backward(losses_of(), ctx)
            opt.step()

        return step
    if kind == "floor":

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            losses = losses_of()
            for i, t in enumerate(names):
                grads = torch.autograd.grad(
                    losses[t], params, retain_graph=i < k - 1, allow_unused=True
                )
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
            opt.step()

        return step
    mgda = MGDA(names)
    generator = torch.Generator().manual_seed(1)

    def samo() -> None:
        opt.zero_grad(set_to_none=True)
        losses = losses_of()
        mean = torch.stack(list(losses.values())).mean()
        every = shared + [p for t in names for p in heads[t]]
        global_grads = [
            torch.zeros_like(p) if g is None else g
            for p, g in zip(every, torch.autograd.grad(mean, every, allow_unused=True), strict=True)
        ]
        shared_global = global_grads[: len(shared)]
        head_global = dict(
            zip([p for t in names for p in heads[t]], global_grads[len(shared) :], strict=True)
        )
        originals = [p.detach().clone() for p in shared]
        rows = []
        head_grads: dict[torch.Tensor, torch.Tensor] = {}
        for t in names:
            # the zeroth-order estimate: two forward passes at theta +- eps z
            z = [torch.randn(p.shape, generator=generator) for p in shared]
            with torch.no_grad():
                for p, zi in zip(shared, z, strict=True):
                    p.add_(zi, alpha=eps)
                plus = losses_of()[t]
                for p, zi in zip(shared, z, strict=True):
                    p.add_(zi, alpha=-2 * eps)
                minus = losses_of()[t]
                for p, o in zip(shared, originals, strict=True):
                    p.copy_(o)
            scale = float(plus - minus) / (2 * eps)
            g = [
                (1 - beta) * gg + beta * scale * zi for gg, zi in zip(shared_global, z, strict=True)
            ]
            norm = float(torch.sqrt(sum((gi * gi).sum() for gi in g)))
            h = [head_global[p] for p in heads[t]]
            h_norm = float(torch.sqrt(sum((hi * hi).sum() for hi in h)))
            head_originals = [p.detach().clone() for p in heads[t]]
            with torch.no_grad():
                for p, gi in zip(shared, g, strict=True):
                    p.add_(gi, alpha=rho / (norm + 1e-12))
                for p, hi in zip(heads[t], h, strict=True):
                    p.add_(hi, alpha=rho / (h_norm + 1e-12))
            perturbed = losses_of()[t]
            grads = [
                torch.zeros_like(p) if gr is None else gr
                for p, gr in zip(
                    shared + heads[t],
                    torch.autograd.grad(perturbed, shared + heads[t], allow_unused=True),
                    strict=True,
                )
            ]
            rows.append(torch.cat([gr.flatten() for gr in grads[: len(shared)]]))
            for p, gr in zip(heads[t], grads[len(shared) :], strict=True):
                head_grads[p] = gr
            with torch.no_grad():
                for p, o in zip(shared, originals, strict=True):
                    p.copy_(o)
                for p, o in zip(heads[t], head_originals, strict=True):
                    p.copy_(o)
        jacobian = torch.stack(rows)
        combined, _ = mgda.aggregate(jacobian, names)
        offset = 0
        for p in shared:
            p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        for p, gr in head_grads.items():
            p.grad = gr
        opt.step()

    return samo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[3])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--eps", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kinds = ["equal", "floor", "mgda", "samo"]
    for k in args.tasks:
        steps = {c: build(c, k, args.batch, args.rho, args.beta, args.eps) for c in kinds}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        times: dict[str, list[float]] = {c: [] for c in kinds}
        order = list(kinds)
        rng = random.Random(k)
        for _ in range(args.repeats):
            rng.shuffle(order)
            for c in order:
                start = time.perf_counter()
                for _ in range(args.steps):
                    steps[c]()
                times[c].append((time.perf_counter() - start) / args.steps)
        print(f"K = {k}, batch {args.batch}, {args.threads} threads, {args.repeats} rounds")
        for c in kinds:
            ratios = {
                ref: statistics.median(a / b for a, b in zip(times[c], times[ref], strict=True))
                for ref in ("equal", "floor", "mgda")
            }
            print(
                f"  {c:6s} {statistics.median(times[c]) * 1e3:8.2f} ms/step   "
                + "   ".join(f"/{ref} {r:5.2f}x" for ref, r in ratios.items())
            )


if __name__ == "__main__":
    main()
