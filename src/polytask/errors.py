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
    "PolytaskError",
    "TrainingDiverged",
    "did_you_mean",
]


class PolytaskError(Exception):
    """Base class of every error caused by the user's input; the CLI exits with ``exit_code``."""

    exit_code: int = 2


class ConfigError(PolytaskError, ValueError):
    """A configuration key, value or name is unknown, of the wrong type or out of range."""


class DataError(PolytaskError, ValueError):
    """A data path is missing or a file does not have the expected content."""


class CheckpointError(PolytaskError, ValueError):
    """A checkpoint is corrupted, unreadable or belongs to a different model or run."""


class TrainingDiverged(PolytaskError, RuntimeError):
    """A loss became NaN or infinite; the run directory keeps its last good checkpoint."""

    exit_code = 3


def did_you_mean(name: str, allowed: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest allowed name, or an empty string."""
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
