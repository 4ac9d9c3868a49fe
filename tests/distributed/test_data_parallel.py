"""Data parallelism (torchrun, gloo on the CPU): N steps on 2 processes, each with half of
every batch, equal N steps on one process with the whole batch, to rounding; resume across
process counts; ``balancer.distributed: local`` against a computation outside the trainer;
a grid (``compare``) on 2 processes gives the table of one; one killed process stops the
job, its checkpoint intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import tiny_config_dict
from polytask.api import resume, train
from polytask.compare import run_grid
from polytask.config import load_config
from polytask.data.loading import epoch_schedule, iterate_batches
from polytask.errors import TrainingDiverged
from polytask.evaluation import split_datasets
from polytask.training.build import build_components
from polytask.training.checkpoint import load_checkpoint
from polytask.training.rundir import lock_holder

RUNNER = Path(__file__).with_name("ddp_runner.py")


class Stop(Exception):
    """Raised by :func:`stop_at`'s callback: the run stops as if its process died there."""


def stop_at(step: int) -> Callable[[Any], None]:
    def callback(info: Any) -> None:
        if info.global_step + 1 == step:
            raise Stop

    return callback


#: (name, overrides): loss-level state, gradient methods at both levels
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("equal", {"balancer.name": "equal"}),
    ("uncertainty", {"balancer.name": "uncertainty"}),
    ("dwa", {"balancer.name": "dwa"}),
    ("famo", {"balancer.name": "famo"}),
    ("pcgrad_parameter", {"balancer.name": "pcgrad"}),
    ("pcgrad_feature", {"balancer.name": "pcgrad", "balancer.options": {"level": "feature"}}),
    ("mgda_parameter", {"balancer.name": "mgda"}),
    ("mgda_feature", {"balancer.name": "mgda", "balancer.options": {"level": "feature"}}),
    ("nash_parameter", {"balancer.name": "nash_mtl"}),
    ("nash_feature", {"balancer.name": "nash_mtl", "balancer.options": {"level": "feature"}}),
    ("gradnorm", {"balancer.name": "gradnorm"}),
    ("rlw", {"balancer.name": "rlw"}),
]


def config(output: Path, **overrides: Any) -> dict[str, Any]:
    """MultiDigits through an MLP (no BatchNorm: its statistics are per process); 64
    samples, batches of 16 (8 per process): 4 steps an epoch, 2 epochs; val and test of 30
    samples (shards of 15, not a multiple of the batch)."""
    base = {
        "data.options": {"n_train": 64, "n_val": 30, "n_test": 30},
        "data.batch_size": 16,
        "data.eval_batch_size": 8,
        "model.backbone": "mlp",
        "model.backbone_options": {"hidden": [16]},
        "train.device": "cpu",
    }
    return tiny_config_dict(output, **{**base, **overrides})


def torchrun(plan: list[dict[str, Any]], folder: Path, n: int = 2) -> subprocess.CompletedProcess:
    path = folder / "plan.json"
    path.write_text(json.dumps(plan), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLYTASK_DIST_TIMEOUT_S": "60"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]
    cmd += ["--standalone", str(RUNNER), str(path)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def assert_same_state(one: Path, two: Path) -> None:
    a, b = (
        load_checkpoint(one / "checkpoints/last.pt"),
        load_checkpoint(two / "checkpoints/last.pt"),
    )
    for key in ("model", "balancer"):
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(b[key][name], value, rtol=1e-4, atol=1e-5, msg=name)
            else:
                assert _close(b[key][name], value), (key, name, value, b[key][name])
    for name, value in a["accumulators"].items():
        torch.testing.assert_close(b["accumulators"][name], value, rtol=1e-5, atol=1e-6)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    ra = json.loads((one / "results.json").read_text())
    rb = json.loads((two / "results.json").read_text())
    for split in ("val", "test"):
        assert _close(rb[split]["metrics"], ra[split]["metrics"]), split
        assert _close(rb[split]["losses"], ra[split]["losses"], tol=1e-4), split


def _close(x: Any, y: Any, tol: float = 1e-5) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k], tol) for k in x)
    if isinstance(x, list | tuple):
        return len(x) == len(y) and all(_close(u, v, tol) for u, v in zip(x, y, strict=True))
    if isinstance(x, torch.Tensor):
        return torch.allclose(x.double(), torch.as_tensor(y).double(), rtol=tol, atol=tol)
    if isinstance(x, float):
        return abs(x - y) <= tol * (1 + abs(y))
    return bool(x == y)


#: the interrupted runs: a checkpoint every 3 steps (mid-epoch: 4 steps an epoch), stopped at
#: global step 6; resumed from the checkpoint at step 3
INTERRUPTED = {"balancer.name": "uncertainty", "train.checkpoint_every_steps": 3}
STOP_AT = 6
#: the global step after which SIGTERM is sent (4 steps an epoch, 2 epochs)
SIGNAL_AT = 2


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every method's 2-process run, a run interrupted on 1 process and resumed on 2, and a
    run interrupted on 2 processes (resumed on 1 by the test), in one torchrun job."""
    folder = tmp_path_factory.mktemp("ddp")
    one_then_two = folder / "single" / "one_then_two"
    with pytest.raises(Stop):
        train(
            config(folder, **INTERRUPTED),
            run_dir=one_then_two,
            console=False,
            step_callbacks=[stop_at(STOP_AT)],
        )
    plan: list[dict[str, Any]] = [
        {"run_dir": str(folder / "two" / name), "config": config(folder, **overrides)}
        for name, overrides in METHODS
    ]
    plan.append(
        {
            "run_dir": str(folder / "two" / "two_then_one"),
            "config": config(folder, **INTERRUPTED),
            "stop_at": STOP_AT,
        }
    )
    plan.append({"run_dir": str(one_then_two), "resume": True})
    for level in ("parameter", "feature"):
        run_dir = str(folder / "two" / f"local_{level}")
        plan.append({"run_dir": run_dir, "config": local_config(folder, level)})
    grid = grid_file(folder / "grid", GRID_CELLS)
    plan.append({"compare": str(grid), "errors": str(folder / "grid" / "errors")})
    # again: every run finished, skipped by both processes
    plan.append({"compare": str(grid), "errors": str(folder / "grid" / "errors")})
    failing = grid_file(folder / "failing", FAILING_CELLS)
    plan.append({"compare": str(failing), "errors": str(folder / "failing" / "errors")})
    # last: the command line leaves the process group
    recipe = folder / "signal" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text(json.dumps(config(folder)), encoding="utf-8")
    args = ["train", str(recipe), "--quiet", "--run-dir", str(folder / "signal" / "run")]
    plan.append({"cli": args, "signal_at": SIGNAL_AT, "out": str(folder / "signal" / "exits")})
    done = torchrun(plan, folder)
    assert done.returncode == 0, "\n".join(
        line for line in done.stderr.splitlines() if "rror" in line or "rank" in line
    )
    return folder


@pytest.mark.parametrize(("name", "overrides"), METHODS, ids=[m[0] for m in METHODS])
def test_two_processes_equal_one(
    two_process_runs: Path, tmp_path: Path, name: str, overrides: dict[str, Any]
) -> None:
    one = tmp_path / name
    train(config(tmp_path, **overrides), run_dir=one, console=False)
    two = two_process_runs / "two" / name
    assert_same_state(one, two)
    # only rank 0 wrote: one log, one lock file, nothing from rank 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_resume_across_process_counts(two_process_runs: Path, tmp_path: Path) -> None:
    reference = tmp_path / "uninterrupted"
    train(config(tmp_path, **INTERRUPTED), run_dir=reference, console=False)
    # interrupted on 1 process, resumed on 2
    assert_same_state(reference, two_process_runs / "single" / "one_then_two")
    # interrupted on 2 processes, resumed on 1
    two_then_one = two_process_runs / "two" / "two_then_one"
    resume(two_then_one, console=False)
    assert_same_state(reference, two_then_one)


def test_batch_size_not_divisible(tmp_path: Path) -> None:
    plan = [
        {"run_dir": str(tmp_path / "run"), "config": config(tmp_path, **{"data.batch_size": 15})}
    ]
    done = torchrun(plan, tmp_path)
    assert done.returncode != 0
    assert "not divisible by the 2 processes" in done.stderr


def test_killed_process_stops_the_job(tmp_path: Path) -> None:
    """Rank 1 killed mid-run: the job ends, torchrun names rank 1 and its signal as the
    root cause, and the last checkpoint (written by rank 0) loads."""
    cfg = config(tmp_path, **{"data.options": {"n_train": 4096, "n_val": 30, "n_test": 30}})
    cfg["train"].update({"epochs": 3, "checkpoint_every_steps": 20})
    path = tmp_path / "kill.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLYTASK_DIST_TIMEOUT_S": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += ["2", "-m", "polytask", "train", str(path), "--quiet", "--run-dir", str(run_dir)]
    job = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "last.pt").exists():
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        os.kill(_rank_pid(job.pid, 1), signal.SIGKILL)
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    root = output[output.index("Root Cause") :]
    assert "rank      : 1" in root and "SIGKILL" in root, output[-3000:]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["global_step"] >= 20


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of the process of ``rank`` among the descendants of ``parent`` (Linux)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                status = (entry / "status").read_text()
            except OSError:
                continue
            ppid = int(status.split("PPid:")[1].split()[0])
            if f"RANK={rank}".encode() in environ and ppid in (parent, *_children(parent)):
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no process of rank {rank}")


def _children(parent: int) -> list[int]:
    path = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


# -- balancer.distributed: local ----------------------------------------------------------


def local_config(output: Path, level: str) -> dict[str, Any]:
    """MGDA at ``level``, one plain SGD step (16 samples, batch 16, 1 epoch): the
    parameters' change divided by the learning rate is the step's gradient."""
    return config(
        output,
        **{
            "data.options": {"n_train": 16, "n_val": 30, "n_test": 30},
            "train.epochs": 1,
            "optim": {"name": "sgd", "lr": 0.5, "momentum": 0.0},
            "balancer.name": "mgda",
            "balancer.options": {"level": level},
            "balancer.distributed": "local",
        },
    )


def local_oracle(cfg: dict[str, Any], shards: int) -> dict[str, torch.Tensor]:
    """The parameters after the step in which each of ``shards`` processes combines the
    Jacobian of its own contiguous part of the batch with MGDA, and the gradients are
    averaged: computed here from the initial model (hard sharing: an encoder, a head per
    task), the step's batch and MGDA's ``aggregate``, outside the trainer.

    Parameter level: the rows are the tasks' gradients of the encoder's parameters, and the
    combination is the encoder's gradient. Feature level: the rows are the tasks' gradients
    of the encoder's output ``z`` on the part's samples, and the encoder's gradient is the
    vector-Jacobian product of ``z`` with the combination. The heads' gradients are those of
    their own task's loss."""
    conf = load_config(cfg)
    c = build_components(conf)
    model, tasks, names = c.model, c.tasks, list(c.tasks)
    datasets = split_datasets(c.bundle.train, tasks)
    sizes = {key: len(d) for key, d in datasets.items()}
    (step,) = epoch_schedule(sizes, batch_size=conf.data.batch_size, seed=conf.seed, epoch=0)
    encoder = list(model.encoder.parameters())
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.train()
    for r in range(shards):
        part = {
            key: indices[r * 16 // shards : (r + 1) * 16 // shards] for key, indices in step.items()
        }
        (batches,) = list(iterate_batches(datasets, [part]))
        (batch,) = batches.values()  # single-input: one joint batch
        z = model.encoder(batch["input"])
        copies = {t: z.detach().requires_grad_(True) for t in names}
        losses = {
            t: tasks[t].compute_loss(model.decode(copies[t], t), batch["targets"][t], None)
            for t in names
        }
        rows = []
        for t in names:
            if conf.balancer.options["level"] == "feature":
                rows.append(torch.autograd.grad(losses[t], copies[t], retain_graph=True)[0])
            else:
                (of_z,) = torch.autograd.grad(losses[t], copies[t], retain_graph=True)
                grads = torch.autograd.grad(z, encoder, grad_outputs=of_z, retain_graph=True)
                rows.append(torch.cat([g.reshape(-1) for g in grads]))
        combined, _ = c.balancer.aggregate(torch.stack([row.reshape(-1) for row in rows]), names)
        if conf.balancer.options["level"] == "feature":
            encoder_grads = torch.autograd.grad(z, encoder, grad_outputs=combined.view_as(z))
        else:
            pieces = combined.split([p.numel() for p in encoder])
            encoder_grads = tuple(g.view_as(p) for g, p in zip(pieces, encoder, strict=True))
        for (n, _), g in zip(model.encoder.named_parameters(), encoder_grads, strict=True):
            total[f"encoder.{n}"] += g
        for t in names:
            head = dict(model.heads[t].named_parameters())
            grads = torch.autograd.grad(losses[t], list(head.values()), retain_graph=True)
            for n, g in zip(head, grads, strict=True):
                total[f"heads.{t}.{n}"] += g
    lr = conf.optim.lr
    return {n: (p.detach() - lr * total[n] / shards) for n, p in model.named_parameters()}


@pytest.mark.parametrize("level", ["parameter", "feature"])
def test_local_aggregation(two_process_runs: Path, tmp_path: Path, level: str) -> None:
    """``local``: 2 processes equal the mean of the aggregations of the two halves of the
    batch (not the aggregation of the whole batch); on 1 process ``local`` is the
    single-process method (the aggregation of the whole batch)."""
    one = tmp_path / "one_local"
    train(local_config(tmp_path, level), run_dir=one, console=False)
    one_model = load_checkpoint(one / "checkpoints/last.pt")["model"]
    two_run = two_process_runs / "two" / f"local_{level}"
    two = load_checkpoint(two_run / "checkpoints/last.pt")["model"]
    halves = local_oracle(local_config(tmp_path, level), 2)
    whole = local_oracle(local_config(tmp_path, level), 1)
    assert whole.keys() == one_model.keys()
    for name, value in whole.items():
        torch.testing.assert_close(one_model[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two[name], halves[name], rtol=1e-5, atol=1e-6)
    # the two computations differ, by far more than the tolerance: local is not the method
    # of one process on the whole batch (largest difference: 8e-4 at the feature level, over
    # 1e-3 at the parameter level)
    gap = max(float((halves[n] - whole[n]).abs().max()) for n in whole)
    assert gap > 1e-4


# -- compare --------------------------------------------------------------------------------

GRID_CELLS = {"equal": {"balancer.name": "equal"}, "mgda": {"balancer.name": "mgda"}}
#: a learning rate that makes every loss NaN at the second step (TrainingDiverged)
FAILING_CELLS = {"diverge": {"optim": {"name": "sgd", "lr": 1e38}}}


def grid_file(folder: Path, cells: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(json.dumps(config(folder)), encoding="utf-8")
    spec = {
        "name": "g",
        "output_dir": str(folder / "grids"),
        "base": "base.yaml",
        "seeds": [0],
        "baseline": next(iter(cells)),
        "cells": cells,
    }
    path = folder / "grid.yaml"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def test_compare_on_two_processes(two_process_runs: Path, tmp_path: Path) -> None:
    """Every cell trained by both processes: the grid's table is that of one process; only
    rank 0 wrote (one set of files, the grid's lock released); the grid run again (every
    run finished) raised nothing and trained nothing."""
    one = run_grid(grid_file(tmp_path, GRID_CELLS), console=False)
    grid_dir = two_process_runs / "grid" / "grids" / "g"
    rows_one = json.loads((tmp_path / "grids" / "g" / "results.json").read_text())["rows"]
    rows_two = json.loads((grid_dir / "results.json").read_text())["rows"]
    for row in (*rows_one, *rows_two):
        row.pop("time_s")
    assert len(rows_two) == len(GRID_CELLS)
    assert _close(rows_two, rows_one)
    assert one["table"].count("\n") >= len(GRID_CELLS)
    assert sorted(p.name for p in grid_dir.iterdir()) == sorted(
        p.name for p in (tmp_path / "grids" / "g").iterdir()
    )
    assert lock_holder(grid_dir) is None
    assert not (two_process_runs / "grid" / "errors").exists()
    for cell in GRID_CELLS:  # one epoch line per epoch: trained once
        lines = (grid_dir / cell / "seed-0" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2, cell


def test_failing_cell_on_two_processes(two_process_runs: Path, tmp_path: Path) -> None:
    """A cell that diverges raises on every process the error it raises on one."""
    with pytest.raises(TrainingDiverged) as single:
        run_grid(grid_file(tmp_path, FAILING_CELLS), console=False)
    errors = two_process_runs / "failing" / "errors"
    messages = {p.name: p.read_text() for p in errors.iterdir()}
    assert sorted(messages) == ["rank-0", "rank-1"]
    expected = f"TrainingDiverged: {single.value}"
    run_dir = tmp_path / "grids" / "g" / "diverge" / "seed-0"
    for message in messages.values():
        assert message == expected.replace(
            str(run_dir), str(errors.parent / "grids/g/diverge/seed-0")
        )
    assert lock_holder(errors.parent / "grids" / "g") is None


# -- a signal to one process ---------------------------------------------------------------


def test_signal_to_one_process(two_process_runs: Path, tmp_path: Path) -> None:
    """SIGTERM to rank 1 only (not to the launcher): both processes stop after the same
    step (agreed by the per-step all_reduce; neither is left waiting in a collective) with
    exit code 143, rank 0 writes the checkpoint, and resume ends as the uninterrupted run."""
    folder = two_process_runs / "signal"
    exits = {p.name: p.read_text().split() for p in (folder / "exits").iterdir()}
    assert exits == {"rank-0": ["143", str(SIGNAL_AT)], "rank-1": ["143", str(SIGNAL_AT)]}
    run_dir = folder / "run"
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["global_step"] == SIGNAL_AT
    reference = tmp_path / "reference"
    train(config(tmp_path), run_dir=reference, console=False)
    resume(run_dir, console=False)
    assert_same_state(reference, run_dir)
