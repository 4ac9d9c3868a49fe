"""Stopping a run cleanly on SIGINT (Ctrl-C), SIGTERM (schedulers) and SIGHUP (a closed
terminal).

While :func:`stop_on_signals` is active, the first of these signals only *requests* a stop:
the trainer finishes the step it is in, writes a checkpoint where one is needed (see
:meth:`polytask.training.trainer.Trainer.fit`) and raises :class:`RunStopped`, so that
``polytask resume`` continues bit for bit as if the run had not stopped. A second signal
while stopping raises :class:`RunStopped` at once, wherever the program is (checkpoints are
written atomically, so the last one stays whole). Outside :func:`stop_on_signals` (library
use), nothing changes: no handler is installed and :func:`stop_requested` is always None.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["STOP_SIGNALS", "RunStopped", "stop_on_signals", "stop_requested"]

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)
"""The signals that request a stop (those of them this platform has)."""


class RunStopped(KeyboardInterrupt):
    """A run stopped on a signal; ``exit_code`` is ``128 + signal number`` (130, 143, 129).

    Attributes:
        signum: the signal.
        run_path: the run directory that stopped (None if it stopped before having one).
        detail: where the run can go on from, in words (e.g. "a checkpoint at epoch 2,
            step 5 of 8").
        resumable: whether the run directory has a checkpoint to resume from.
        immediate: a second signal stopped it at once, without a new checkpoint.
    """

    def __init__(
        self,
        signum: int,
        *,
        run_path: Path | None = None,
        detail: str = "",
        resumable: bool = True,
        immediate: bool = False,
    ) -> None:
        super().__init__(signum)
        self.signum = signum
        self.run_path = run_path
        self.detail = detail
        self.resumable = resumable
        self.immediate = immediate

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    requested: int | None = None
    pid: int | None = None
    #: the run being trained, for the message of an immediate stop: (path, last checkpoint)
    run: tuple[Path, Path] | None = None


def stop_requested() -> int | None:
    """The signal that requested a stop, or None (always None outside
    :func:`stop_on_signals`)."""
    return _State.requested


def set_current_run(path: Path | None, checkpoint: Path | None = None) -> None:
    """Name the run being trained (for the message of a second, immediate signal)."""
    _State.run = None if path is None or checkpoint is None else (path, checkpoint)


def _handler(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _State.pid:
        return  # a forked DataLoader worker: the main process decides
    if _State.requested is None:
        _State.requested = signum
        return
    run = _State.run
    raise RunStopped(
        signum,
        run_path=None if run is None else run[0],
        detail="its last checkpoint",
        resumable=run is not None and run[1].exists(),
        immediate=True,
    )


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP request a stop (see the module
    docstring); the previous handlers are restored after it. Outside the main thread, where
    handlers cannot be installed, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}
    _State.requested, _State.pid, _State.run = None, os.getpid(), None
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, _handler)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _State.requested, _State.pid, _State.run = None, None, None
