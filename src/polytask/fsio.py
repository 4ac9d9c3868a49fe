"""Every file polytask writes goes through here: atomic writes, appended lines, directories.

A failure of the file system (disk full, a read-only or unwritable directory, a path that is
a file, a name too long or with a NUL byte) becomes a :class:`~polytask.errors.FileSystemError`
naming the path and the operation, which the command line prints as one line (exit 2).
Nothing already written is lost on the way: an atomic write leaves the old file or the new
one and removes its temporary file; an appended line that could not be written whole is cut
off again, so the file keeps only complete lines.

:data:`before_write` is called with ``(path, operation)`` right before each write touches the
file system; tests replace it to inject faults at every write point.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import FileSystemError

__all__ = [
    "TMP_SUFFIX",
    "append_line",
    "before_write",
    "check_path",
    "file_system_error",
    "guard",
    "make_dir",
    "write_atomic",
]

TMP_SUFFIX = ".tmp"
"""Temporary files of atomic writes are ``.NAME.XXXXXXXX.tmp`` next to their target."""

_SPACE = (
    "free some space, then go on with `polytask resume RUN_DIR` (a grid: the same "
    "`polytask compare`); what was written is kept"
)
_HINTS = {
    errno.ENOSPC: _SPACE,
    errno.EDQUOT: _SPACE,
    errno.EROFS: "the file system is read-only; choose another directory",
    errno.EACCES: "no permission to write there; choose another directory",
    errno.EPERM: "no permission to write there; choose another directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "a file of that name is in the way",
    errno.EISDIR: "that path is a directory",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter one",
}


def _no_fault(path: Path, operation: str) -> None:
    """The default :data:`before_write`: nothing."""


before_write: Callable[[Path, str], None] = _no_fault


def _hook(path: Path, operation: str) -> None:
    # looked up at each call, so that a test's replacement takes effect everywhere
    globals()["before_write"](path, operation)


def file_system_error(
    exc: OSError | ValueError, path: str | Path, operation: str
) -> FileSystemError:
    """The one-line error for ``exc``, raised while doing ``operation`` on ``path``."""
    if isinstance(exc, ValueError):  # "embedded null byte"
        return FileSystemError(
            f"cannot {operation} {str(path)!r}: the path contains a NUL byte.",
            path=str(path),
            operation=operation,
            errno=None,
        )
    where = exc.filename if isinstance(exc.filename, str) and exc.filename else str(path)
    code = exc.errno
    reason = exc.strerror or type(exc).__name__
    name = errno.errorcode.get(code, "") if code is not None else ""
    hint = _HINTS.get(code, "") if code is not None else ""
    text = f"cannot {operation} {where}: {reason}" + (f" ({name})" if name else "")
    return FileSystemError(
        text + (f"; {hint}." if hint else "."), path=where, operation=operation, errno=code
    )


@contextlib.contextmanager
def guard(path: str | Path, operation: str) -> Iterator[None]:
    """Turn an ``OSError`` (or a NUL byte's ``ValueError``) in the block into a
    :class:`FileSystemError` naming ``path`` (or the file the error names) and ``operation``."""
    try:
        yield
    except OSError as exc:
        raise file_system_error(exc, path, operation) from None
    except ValueError as exc:
        if "null" not in str(exc):
            raise
        raise file_system_error(exc, path, operation) from None


def check_path(path: str | Path, what: str) -> Path:
    """``path`` as a Path; a NUL byte in it is a :class:`FileSystemError`."""
    if "\x00" in str(path):
        raise file_system_error(ValueError("embedded null byte"), path, f"use {what}")
    return Path(path)


def make_dir(path: str | Path, operation: str = "create the directory") -> Path:
    """Create ``path`` and its parents (an existing directory is fine)."""
    path = Path(path)
    with guard(path, operation):
        _hook(path, operation)
        path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(
    path: str | Path,
    data: str | bytes | Callable[[IO[bytes]], None],
    operation: str = "write",
) -> None:
    """Write ``data`` (text as UTF-8, bytes, or a function writing to a binary file) to
    ``path`` so that a crash or a full disk leaves either the old file or the new one."""
    path = Path(path)
    tmp: str | None = None
    with guard(path, operation):
        _hook(path, operation)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                if callable(data):
                    data(f)
                else:
                    f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is done
    finally:
        os.close(dir_fd)


def append_line(path: str | Path, line: str, operation: str = "append to") -> None:
    """Append ``line`` and a newline to ``path``, whole or not at all: after a failed write
    the file is cut back to its former length, so it keeps only complete lines."""
    path = Path(path)
    with guard(path, operation):
        _hook(path, operation)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                data = (line + "\n").encode("utf-8")
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
