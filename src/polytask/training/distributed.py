"""Data-parallel training over several processes (``torchrun``), exact to rounding.

Started by ``torchrun --nproc-per-node N -m polytask train CONFIG``: every process reads
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and torchrun's rendezvous) from its environment and
joins one process group (gloo on the CPU, NCCL on CUDA).

Sharding: the batch order is that of a single process (a function of the seed and the
epoch); every step's batch of ``data.batch_size`` samples is cut into ``N`` contiguous
shards, rank ``r`` taking the ``r``-th. The union of the shards of a step is the single-process
batch: no sample is duplicated or dropped, whatever ``N``.

Gradients: each process's loss of task ``k`` is rescaled by ``N n_rk / N_k`` (``n_rk`` its
labelled samples of the task, ``N_k`` the step's total), so that the *mean* over processes of
any gradient is the gradient of the single-process loss. Gradient methods see the global
Jacobian (:class:`JacobianSync`, one collective per step); every other gradient (the model's
other parameters, a balancer's own parameters) is averaged once per step in one collective
(:meth:`Distributed.average_gradients`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from ..errors import ConfigError

T = TypeVar("T")

__all__ = [
    "Distributed",
    "JacobianSync",
    "init_from_environment",
    "shard_bounds",
    "shard_step",
]


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous slice ``[start, stop)`` of ``n`` items that ``rank`` of ``world`` takes
    (sizes differ by at most one; together the slices cover ``range(n)`` once)."""
    return rank * n // world, (rank + 1) * n // world


def shard_step(step: Mapping[str, list[int]], rank: int, world: int) -> dict[str, list[int]]:
    """This rank's contiguous shard of every batch of one step."""
    out = {}
    for key, indices in step.items():
        start, stop = shard_bounds(len(indices), rank, world)
        out[key] = indices[start:stop]
    return out


@dataclass
class Distributed:
    """The process group of a data-parallel run (``world == 1``: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes the run directory."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        import torch.distributed as dist

        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        import torch.distributed as dist

        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def decide(self, decide: Callable[[], T]) -> T:
        """``decide()``, run on rank 0 only, and its result on every process (one
        broadcast). An exception of ``decide`` is raised on rank 0 as it is and on the
        others as a :class:`ConfigError` that names it, so that no process is left waiting
        for rank 0 in a later collective."""
        if not self.active:
            return decide()
        import torch.distributed as dist

        value: Any = None
        failure: Exception | None = None
        if self.is_writer:
            try:
                value = decide()
            except Exception as exc:
                failure = exc
        box = [(value, None if failure is None else str(failure).splitlines()[0][:300])]
        dist.broadcast_object_list(box, src=0)
        if failure is not None:
            raise failure
        value, error = box[0]
        if error is not None:
            raise ConfigError(f"rank 0 stopped: {error}")
        return cast(T, value)

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.active:
            dist.barrier()

    def mean_losses(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The per-task means over processes (a balancer's ``loss_reducer``; one collective)."""
        names = list(losses)
        stacked = torch.stack([losses[t].detach().double() for t in names])
        self.all_reduce_sum(stacked)
        stacked /= self.world
        return {t: stacked[i].to(losses[t].dtype) for i, t in enumerate(names)}

    def average_gradients(self, params: Iterable[Tensor]) -> None:
        """Average the ``.grad`` of ``params`` over processes, in one collective (every
        process has gradients for the same parameters: the same tasks run everywhere)."""
        with_grad = [p for p in params if p.grad is not None]
        if not self.active or not with_grad:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in with_grad])  # type: ignore[union-attr]
        self.all_reduce_sum(flat)
        flat /= self.world
        offset = 0
        for p in with_grad:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every process."""
        import torch.distributed as dist

        if not self.active:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)

    def broadcast_parameters(self, module: nn.Module) -> None:
        import torch.distributed as dist

        if not self.active:
            return
        with torch.no_grad():
            for p in module.parameters():
                dist.broadcast(p.data, 0)


class JacobianSync:
    """Makes a gradient method's Jacobian global (see
    :meth:`~polytask.balancing.gradient.GradientBalancer.synchronize`).

    Parameter level: the rows are gradients with respect to the shared parameters; the global
    rows are their mean over processes (one ``all_reduce`` of the K x n matrix). Feature level:
    the rows are gradients with respect to this process's samples' representation; the global
    Jacobian is the concatenation of every process's columns (one ``all_gather``, after an
    exchange of the widths), divided by ``N``; :meth:`local_part` returns this process's
    columns of the combined gradient, multiplied by ``N`` so that averaging the trunk's
    gradients afterwards sums the processes' contributions.
    """

    def __init__(self, dist_info: Distributed) -> None:
        self.d = dist_info
        self._bounds: tuple[int, int] = (0, 0)

    def gather(self, jacobian: Tensor, level: str) -> Tensor:
        import torch.distributed as dist

        d = self.d
        if level == "parameter":
            dist.all_reduce(jacobian)
            return jacobian.div_(d.world)
        k, width = jacobian.shape
        widths_t = torch.tensor([width], dtype=torch.int64, device=jacobian.device)
        gathered_w = [torch.zeros_like(widths_t) for _ in range(d.world)]
        dist.all_gather(gathered_w, widths_t)
        widths = [int(w) for w in gathered_w]
        most = max(widths)
        padded = jacobian
        if width < most:
            padded = torch.zeros((k, most), dtype=jacobian.dtype, device=jacobian.device)
            padded[:, :width] = jacobian
        parts = [torch.empty_like(padded) for _ in range(d.world)]
        dist.all_gather(parts, padded.contiguous())
        start = sum(widths[: d.rank])
        self._bounds = (start, start + width)
        whole = torch.cat([p[:, :w] for p, w in zip(parts, widths, strict=True)], dim=1)
        return whole.div_(d.world)

    def local_part(self, combined: Tensor) -> Tensor:
        start, stop = self._bounds
        return combined[start:stop] * self.d.world


def init_from_environment(device_name: str | None = None) -> Distributed:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (a single process otherwise).

    gloo on the CPU, NCCL when the run's device is CUDA (each process on ``cuda:LOCAL_RANK``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed.")
    if not dist.is_initialized():
        cuda = (device_name or "").startswith("cuda") or (
            device_name in (None, "auto") and torch.cuda.is_available()
        )
        backend = "nccl" if cuda and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        timeout = float(os.environ.get("POLYTASK_DIST_TIMEOUT_S", "600"))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return Distributed(rank=rank, world=world, local_rank=local_rank)


def check_batch_size(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ConfigError(
            f"data.batch_size {batch_size} is not divisible by the {world} processes: each "
            f"process takes batch_size / {world} samples of every step's batch. Choose a "
            f"batch size that is a multiple of {world}."
        )


def check_shards(steps: Sequence[Mapping[str, list[int]]], world: int, where: str) -> None:
    """Refuse a schedule with a batch smaller than the number of processes (a process would
    have no sample of that step)."""
    for i, step in enumerate(steps):
        for indices in step.values():
            if len(indices) < world:
                raise ConfigError(
                    f"{where}: step {i + 1} has a batch of {len(indices)} sample(s), fewer "
                    f"than the {world} processes (the last, partial batch of an epoch). Set "
                    "data.drop_last=true, or choose a split size or batch size that leaves at "
                    f"least {world} samples in the last batch."
                )
