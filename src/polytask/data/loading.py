"""The deterministic order of batches: a function of (seed, epoch), resumable at any step.

Each epoch's batch schedule is computed up front from ``(seed, epoch)`` alone, so a run
resumed at step ``s`` of an epoch sees exactly the batches it would have seen, without
loading the skipped ones.

Single-input mode: every step is one batch of the (one) training set, under the key
:data:`JOINT`. Multi-input mode: every task has its own data set, and a step is
``{task: batch indices}`` for the tasks drawn at that step, by a named strategy:

- ``all``: every step draws one batch from every task (LibMTL's multi-input mode); the
  epoch has as many steps as the largest task has batches, smaller data sets are cycled
  with a fresh permutation each pass;
- ``round_robin``: one task per step, cycling through the tasks; a task drops out of the
  cycle once its batches are used up; every sample is seen once per epoch;
- ``proportional``: one task per step, drawn at random with probability proportional to
  the number of batches it has left (every sample seen once per epoch).
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "JOINT",
    "STRATEGIES",
    "epoch_schedule",
    "iterate_batches",
    "to_device",
]

JOINT = "__joint__"
STRATEGIES = ("all", "round_robin", "proportional")

Step = dict[str, list[int]]


def _rng(seed: int, epoch: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed % 2**32, epoch, salt])


def _batches(perm: np.ndarray, batch_size: int, drop_last: bool) -> list[list[int]]:
    n = len(perm)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [perm[i : i + batch_size].tolist() for i in range(0, stop, batch_size)]


def epoch_schedule(
    sizes: Mapping[str, int],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = False,
    strategy: str = "all",
) -> list[Step]:
    """All steps of one epoch: ``[{key: sample indices}, ...]``.

    ``sizes`` is ``{JOINT: n}`` in single-input mode, ``{task: n_task}`` in multi-input mode.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Expected a sampling strategy in {STRATEGIES}, found {strategy!r}.")
    keys = list(sizes)
    per_key: dict[str, list[list[int]]] = {}
    for i, key in enumerate(keys):
        n = sizes[key]
        perm = _rng(seed, epoch, i).permutation(n) if shuffle else np.arange(n)
        per_key[key] = _batches(perm, batch_size, drop_last)
    if len(keys) == 1:
        (key,) = keys
        return [{key: b} for b in per_key[key]]
    if strategy == "all":
        n_steps = max(len(b) for b in per_key.values())
        for i, key in enumerate(keys):
            rounds = 1
            while len(per_key[key]) < n_steps:
                n = sizes[key]
                rng = _rng(seed, epoch, 1000 * rounds + i)
                perm = rng.permutation(n) if shuffle else np.arange(n)
                per_key[key] += _batches(perm, batch_size, drop_last)
                rounds += 1
            per_key[key] = per_key[key][:n_steps]
        return [{key: per_key[key][s] for key in keys} for s in range(n_steps)]
    if strategy == "round_robin":
        steps: list[Step] = []
        longest = max(len(b) for b in per_key.values())
        for s in range(longest):
            steps += [{key: per_key[key][s]} for key in keys if s < len(per_key[key])]
        return steps
    # proportional: a random interleaving of every task's batches
    order = [key for key in keys for _ in per_key[key]]
    rng = _rng(seed, epoch, 999_999)
    rng.shuffle(order)
    cursor = dict.fromkeys(keys, 0)
    steps = []
    for key in order:
        steps.append({key: per_key[key][cursor[key]]})
        cursor[key] += 1
    return steps


def steps_per_epoch(
    sizes: Mapping[str, int], batch_size: int, drop_last: bool, strategy: str
) -> int:
    counts = [(n // batch_size) if drop_last else math.ceil(n / batch_size) for n in sizes.values()]
    if len(counts) == 1 or strategy != "all":
        return sum(counts)
    return max(counts)


def _ignore_stop_signals(worker_id: int) -> None:
    """In a loader's worker process: SIGINT, SIGTERM and SIGHUP (which a terminal or a
    scheduler sends to the whole process group) are for the main process, which stops the
    run at a safe point and then ends its workers; a worker killed first would fail the run
    with a traceback."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def iterate_batches(
    datasets: Mapping[str, Dataset[Any]],
    steps: Sequence[Step],
    *,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield ``{key: collated batch}`` for each step, loading with one DataLoader per key.

    A data set that has a ``collate(samples) -> batch`` method (graphs, variable-size inputs)
    is collated with it; others with PyTorch's default collation.
    """
    iterators: dict[str, Iterator[Any]] = {}
    for i, (key, dataset) in enumerate(datasets.items()):
        batch_list = [step[key] for step in steps if key in step]
        if not batch_list:
            continue
        generator = torch.Generator()
        generator.manual_seed(seed * 7919 + i)  # worker seeds: never drawn from the global RNG
        loader: DataLoader[Any] = DataLoader(
            dataset,
            batch_sampler=batch_list,
            num_workers=num_workers,
            generator=generator,
            pin_memory=pin_memory,
            collate_fn=getattr(dataset, "collate", None),
            worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
        )
        iterators[key] = iter(loader)
    for step in steps:
        yield {key: next(iterators[key]) for key in step}


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor of a nested batch to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
