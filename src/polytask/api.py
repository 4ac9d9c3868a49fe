"""The high-level API behind the command line: train, resume, evaluate."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import Config, from_dict, load_config, to_dict
from .errors import ConfigError, PolytaskError
from .evaluation import EvalResult, evaluate
from .fsio import make_dir
from .training.build import build_components
from .training.checkpoint import load_checkpoint, load_model_state
from .training.distributed import Distributed, check_batch_size, init_from_environment
from .training.rundir import DirectoryLock, RunDirectory, lock_holder, new_run_path
from .training.trainer import StepEnd, Trainer

__all__ = ["evaluate_run", "resume", "train", "warn_if_written"]


def warn_if_written(path: Path) -> None:
    """A warning on stderr when another process is writing the run or grid directory now:
    what is read from it is partial."""
    pid = lock_holder(path)
    if pid is not None:
        holder = f"process {pid}" if pid > 0 else "another process"
        print(
            f"polytask: warning: {path} is being written by {holder}; what is read from it "
            "now is partial (a run in progress).",
            file=sys.stderr,
        )


def train(
    config: Config | str | Path | Mapping[str, Any],
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    run_dir: str | Path | None = None,
    step_callbacks: Sequence[Callable[[StepEnd], None]] = (),
    console: bool = True,
) -> tuple[RunDirectory, dict[str, Any]]:
    """Train a configuration into a new run directory; returns it and the results.

    ``config`` is a :class:`Config`, a YAML path or a mapping; ``overrides`` are
    ``key=value`` strings or a mapping of dotted keys. Without ``run_dir`` the run goes to
    ``OUTPUT_DIR/NAME-TIMESTAMP``.
    """
    if isinstance(config, Config):
        if overrides:
            config = load_config(to_dict(config), overrides)
    else:
        config = load_config(config, overrides)
    dist_info = init_from_environment(config.train.device)
    if dist_info.active:
        check_batch_size(config.data.batch_size, dist_info.world)
    components = build_components(config)  # fails on bad input before anything is written
    if dist_info.active:
        return _train_distributed(dist_info, config, components, run_dir, step_callbacks, console)
    path = Path(run_dir) if run_dir is not None else new_run_path(config.output_dir, config.name)
    RunDirectory.check_new(path)  # refused before anything is written
    make_dir(path, "create the run directory")
    with DirectoryLock(path):  # one writer per run directory
        run = RunDirectory.create(path, to_dict(config))
        trainer = Trainer(components, run, step_callbacks=step_callbacks, console=console)
        return run, trainer.fit()


def _agreed(dist_info: Distributed, value: Any, error: str | None) -> Any:
    """Rank 0's ``value`` (or its error, raised on every rank) on every process."""
    import torch.distributed as dist

    box = [(value, error)]
    dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        if dist_info.is_writer:
            raise ConfigError(error)
        raise ConfigError(f"rank 0 could not start the run: {error}")
    return value


def _train_distributed(
    dist_info: Distributed,
    config: Config,
    components: Any,
    run_dir: str | Path | None,
    step_callbacks: Sequence[Callable[[StepEnd], None]],
    console: bool,
) -> tuple[RunDirectory, dict[str, Any]]:
    """A data-parallel run: rank 0 creates, locks and writes the run directory; the others
    receive its path and write nothing."""
    lock: DirectoryLock | None = None
    value: Any = None
    error: str | None = None
    if dist_info.is_writer:
        try:
            path = (
                Path(run_dir)
                if run_dir is not None
                else new_run_path(config.output_dir, config.name)
            )
            RunDirectory.check_new(path)
            make_dir(path, "create the run directory")
            lock = DirectoryLock(path).acquire()
            RunDirectory.create(path, to_dict(config))
            value = str(path)
        except PolytaskError as exc:
            error = str(exc)
            if lock is not None:
                lock.release()
    path = Path(_agreed(dist_info, value, error))
    run = RunDirectory(path)
    try:
        trainer = Trainer(
            components, run, step_callbacks=step_callbacks, console=console, distributed=dist_info
        )
        return run, trainer.fit()
    finally:
        if lock is not None:
            lock.release()


def resume(
    run_dir: str | Path,
    *,
    step_callbacks: Sequence[Callable[[StepEnd], None]] = (),
    console: bool = True,
    allow_change: Sequence[str] = (),
) -> dict[str, Any]:
    """Continue a run from its last checkpoint (exactly where it stopped).

    config.yaml must be the configuration the run started with (meta.json holds its hash);
    ``allow_change`` names keys of :data:`~polytask.training.rundir.ALLOWED_CHANGES` (such as
    ``train.epochs``) that may differ, and the run continues with their new values."""
    run = RunDirectory.open(run_dir)
    existing = run.read_results()
    if existing is not None:
        raise ConfigError(
            f"{run.path} has already finished (results.json exists); nothing to resume."
        )
    changes = run.check_config(allow_change)
    config = from_dict(Config, run.read_config())
    components = build_components(config)
    if not run.last_checkpoint.exists():
        raise ConfigError(
            f"{run.path} has no checkpoint yet (it stopped before its first one); start it again "
            "with `polytask train`."
        )
    dist_info = init_from_environment(config.train.device)
    if dist_info.active:
        check_batch_size(config.data.batch_size, dist_info.world)
        return _resume_distributed(dist_info, run, components, changes, step_callbacks, console)
    with DirectoryLock(run.path) as lock:  # one writer per run directory
        if run.read_results() is not None:  # finished by another process meanwhile
            raise ConfigError(
                f"{run.path} has already finished (results.json exists); nothing to resume."
            )
        run.accept_config(changes)
        trainer = Trainer(components, run, step_callbacks=step_callbacks, console=console)
        if lock.stale_pid is not None:
            trainer.log.info(
                f"took over {lock.path} from process {lock.stale_pid}, which ended without "
                "releasing it (the system releases the lock of a process that dies)"
            )
        if changes:
            described = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
            trainer.log.warning(f"continuing with changed configuration: {described}")
        return trainer.fit(resume=True)


def _resume_distributed(
    dist_info: Distributed,
    run: RunDirectory,
    components: Any,
    changes: Mapping[str, tuple[Any, Any]],
    step_callbacks: Sequence[Callable[[StepEnd], None]],
    console: bool,
) -> dict[str, Any]:
    """Resume on several processes (the run may have been trained on any number)."""
    lock: DirectoryLock | None = None
    error: str | None = None
    if dist_info.is_writer:
        try:
            lock = DirectoryLock(run.path).acquire()
            run.accept_config(changes)
        except PolytaskError as exc:
            error = str(exc)
            if lock is not None:
                lock.release()
                lock = None
    _agreed(dist_info, True, error)
    try:
        trainer = Trainer(
            components, run, step_callbacks=step_callbacks, console=console, distributed=dist_info
        )
        if changes:
            described = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
            trainer.log.warning(f"continuing with changed configuration: {described}")
        return trainer.fit(resume=True)
    finally:
        if lock is not None:
            lock.release()


def evaluate_run(
    run_dir: str | Path, *, split: str = "test", checkpoint: str = "best"
) -> EvalResult:
    """Evaluate a run's ``best`` or ``last`` checkpoint on a split."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split: expected train, val or test, found {split!r}.")
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"checkpoint: expected best or last, found {checkpoint!r}.")
    run = RunDirectory.open(run_dir)
    warn_if_written(run.path)
    config = from_dict(Config, run.read_config())
    c = build_components(config)
    path = run.best_checkpoint if checkpoint == "best" else run.last_checkpoint
    data = load_checkpoint(path)
    load_model_state(c.model, data, path)
    return evaluate(
        c.model,
        c.tasks,
        c.bundle.split(split),
        batch_size=config.data.eval_batch_size or config.data.batch_size,
        device=c.device,
        precision=config.train.precision,
        num_workers=config.data.num_workers,
        split_name=split,
        input_shape=tuple(c.bundle.input_shape),
        integer_inputs=any(getattr(m, "integer_inputs", False) for m in c.model.modules()),
    )
