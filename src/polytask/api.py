"""The high-level API behind the command line: train, resume, evaluate."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import Config, from_dict, load_config, to_dict
from .errors import ConfigError
from .evaluation import EvalResult, evaluate
from .fsio import make_dir
from .training.build import build_components
from .training.checkpoint import check_model_signature, load_checkpoint
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
    components = build_components(config)  # fails on bad input before anything is written
    path = Path(run_dir) if run_dir is not None else new_run_path(config.output_dir, config.name)
    RunDirectory.check_new(path)  # refused before anything is written
    make_dir(path, "create the run directory")
    with DirectoryLock(path):  # one writer per run directory
        run = RunDirectory.create(path, to_dict(config))
        trainer = Trainer(components, run, step_callbacks=step_callbacks, console=console)
        return run, trainer.fit()


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
    check_model_signature(data["model_signature"], c.model, path)
    c.model.load_state_dict(data["model"])
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
