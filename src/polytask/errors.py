"""Errors that polytask raises for problems in the user's input or environment.

Every error a user can cause by a mistake (a config key, a file path, a name) is a
:class:`PolytaskError`. The command line prints its message and exits with
:attr:`PolytaskError.exit_code` without a traceback; library users can catch it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FileSystemError",
    "PolytaskError",
    "RunDirectoryError",
    "RunLockedError",
    "TrainingDiverged",
    "did_you_mean",
]


#: the longest message an error gives: a longer one (a huge value in it) is cut in the middle
MAX_MESSAGE = 1500


class PolytaskError(Exception):
    """Base class of every error caused by the user's input; the CLI exits with ``exit_code``.

    Its message is one line (line breaks become spaces) of at most :data:`MAX_MESSAGE`
    characters, whatever values were put in it."""

    exit_code: int = 2

    def __str__(self) -> str:
        text = super().__str__()
        if len(text) > 4 * MAX_MESSAGE:
            text = text[: 2 * MAX_MESSAGE] + text[-MAX_MESSAGE:]
        lines = text.splitlines()
        if len(lines) > 1:
            text = " ".join(line.strip() for line in lines if line.strip())
        if len(text) > MAX_MESSAGE:
            head = MAX_MESSAGE * 2 // 3
            tail = MAX_MESSAGE - head - 5
            text = f"{text[:head]} ... {text[-tail:]}"
        return text


class ConfigError(PolytaskError, ValueError):
    """A configuration key, value or name is unknown, of the wrong type or out of range."""


class DataError(PolytaskError, ValueError):
    """A data path is missing or a file does not have the expected content."""


class CheckpointError(PolytaskError, ValueError):
    """A checkpoint is corrupted, unreadable or belongs to a different model or run."""


class FileSystemError(PolytaskError, OSError):
    """Writing (or creating) a file or directory failed: disk full, read-only, no permission,
    a path that is a file, a name too long or with a NUL byte. Names the path and the
    operation; nothing already written is lost."""

    def __init__(
        self, message: str, *, path: str, operation: str, errno: int | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.operation = operation
        self.errno = errno


class RunLockedError(PolytaskError, RuntimeError):
    """Another process is writing the run (or grid) directory: one writer per directory."""

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class RunDirectoryError(PolytaskError, ValueError):
    """A run directory was edited or damaged: a changed config.yaml, a damaged meta.json,
    metrics.jsonl or results.json."""


class TrainingDiverged(PolytaskError, RuntimeError):
    """A loss became NaN or infinite; the run directory keeps its last good checkpoint."""

    exit_code = 3


def did_you_mean(name: str, allowed: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest allowed name, or an empty string."""
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
