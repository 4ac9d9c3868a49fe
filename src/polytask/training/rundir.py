"""Run directories: one per training run, never overwritten.

Layout::

    RUN_DIR/
      .lock              held (fcntl.flock) by the one process writing the run; its pid
      config.yaml        the resolved configuration (what was actually run)
      meta.json          versions, command, start time, the SHA-256 of config.yaml
      train.log          the log
      metrics.jsonl      one JSON record per epoch (train losses, weights, val/test metrics)
      checkpoints/       last.pt (resume), best.pt (selected weights)
      results.json       final results (written once training has finished)
      inspection.npz     what the architecture shows on a few validation samples (at the end)
      report.md, report.html, plots/  human-readable reports
      tensorboard/       optional TensorBoard events
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml

from .._meta import package_version
from ..errors import ConfigError, RunDirectoryError, RunLockedError
from ..fsio import (
    TMP_SUFFIX,
    append_line,
    check_path,
    file_system_error,
    guard,
    make_dir,
    write_atomic,
)
from ..fsio import _hook as fsio_hook
from ..yamlio import load_bytes, show_path

__all__ = [
    "ALLOWED_CHANGES",
    "LOCK_NAME",
    "DirectoryLock",
    "RunDirectory",
    "check_path_component",
    "lock_holder",
    "new_run_path",
]

ALLOWED_CHANGES: dict[str, str] = {
    "train.epochs": "train for more (or fewer, not fewer than done) epochs",
    "train.progress": "progress lines on or off",
    "data.num_workers": "loader processes; the batches are the same",
}
"""Keys of config.yaml that may change between a run's start and ``polytask resume
--allow-change KEY``: continuing with the new value is the same run, continued. Any other
key (the learning rate, the optimizer, the seed, the model, the data) makes another run."""


def check_path_component(name: str, what: str) -> str:
    """``name`` if it is one directory name that stays inside its parent (not empty, ``.``,
    ``..``, absolute, with a ``/`` or a NUL byte), else a ConfigError."""
    if (
        not isinstance(name, str)
        or not name.strip(".")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name != name.strip()
    ):
        raise ConfigError(
            f"{what} {name!r} cannot name a directory: it must be one name, not empty, '.', "
            "'..' or a path (no '/', no NUL byte, no surrounding spaces)."
        )
    return name


def new_run_path(output_dir: str | Path, name: str) -> Path:
    """A fresh directory path ``OUTPUT_DIR/NAME-YYYYmmdd-HHMMSS[-k]`` that does not exist yet."""
    check_path_component(name, "name")
    output_dir = check_path(output_dir, "output_dir")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = output_dir / f"{name}-{stamp}"
    path, k = base, 1
    with guard(base, "create the run directory"):
        while path.exists():
            path = base.with_name(f"{base.name}-{k}")
            k += 1
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and (value or not prefix):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _run_log_handler(path: Path) -> logging.FileHandler:
    """A FileHandler for ``train.log`` that survives a full disk: a record it cannot write
    is dropped (the run's records that matter are written, and checked, elsewhere) instead
    of printing a traceback per record."""

    class _Handler(logging.FileHandler):
        def handleError(self, record: logging.LogRecord) -> None:
            pass

    with guard(path, "open the log"):
        fsio_hook(path, "open the log")
        return _Handler(path, encoding="utf-8")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# -- one writer per directory -------------------------------------------------------------------

LOCK_NAME = ".lock"
"""The lock file of a run or grid directory (it holds the pid of the process writing it)."""


def _lock_holder_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


class DirectoryLock:
    """An exclusive lock on a run or grid directory: ``fcntl.flock`` on ``DIR/.lock``, which
    holds the pid of the holder while it is held (and is empty after).

    The operating system releases a ``flock`` when its process ends, however it ends: a
    lock file left by a killed process (SIGKILL, a crash, a lost machine) holds a stale pid
    but no lock, and the next process takes it over. A second process while the first one
    lives is refused with a :class:`RunLockedError` naming the holder's pid.
    """

    def __init__(self, directory: str | Path, what: str = "run directory") -> None:
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._times: tuple[int, int] | None = None
        self.stale_pid: int | None = None

    def acquire(self) -> DirectoryLock:
        with guard(self.path, "lock"):
            fsio_hook(self.path, "lock")
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _lock_holder_pid(fd)
            os.close(fd)
            holder = f"process {pid}" if pid is not None else "another process"
            raise RunLockedError(
                f"{self.directory} is being written by {holder} (polytask "
                f"{'compare' if self.what == 'grid directory' else 'train or resume'}); one "
                f"process at a time writes a {self.what}: wait for it to end (or stop it), "
                "then run the command again.",
                pid=pid,
            ) from None
        except OSError as exc:
            os.close(fd)
            raise file_system_error(exc, self.path, "lock") from None
        try:
            st = os.fstat(fd)
            # an empty lock file gets its times back on release: a process that takes the
            # lock and then refuses to go on leaves the directory exactly as it was
            self._times = (st.st_atime_ns, st.st_mtime_ns) if st.st_size == 0 else None
            self.stale_pid = _lock_holder_pid(fd)  # a killed holder's pid, taken over
            if self.stale_pid == os.getpid():
                self.stale_pid = None
            with guard(self.path, "write the lock file"):
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no holder any more
                if self._times is not None:
                    os.utime(fd, ns=self._times)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(directory: str | Path) -> int | None:
    """The pid of the process writing ``directory`` now (it holds its lock), else ``None``.
    Reads only: a directory without a lock file is not being written."""
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except (OSError, ValueError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _lock_holder_pid(fd)
            return pid if pid is not None else -1
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunDirectory:
    """Paths and writers of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- paths ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint_dir / "best.pt"

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def inspection_path(self) -> Path:
        return self.path / "inspection.npz"

    # -- lifecycle -----------------------------------------------------------------------
    @staticmethod
    def check_new(path: str | Path) -> Path:
        """Refuse a run directory path that exists and is a file or a non-empty directory
        (runs are never overwritten), before anything is written."""
        path = check_path(path, "the run directory")
        with guard(path, "create the run directory"):
            if path.exists() and not path.is_dir():
                raise ConfigError(
                    f"run directory {path} is a file, not a directory; choose another path."
                )
            if path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()):
                raise ConfigError(
                    f"run directory {path} already exists and is not empty; runs are never "
                    "overwritten. Use `polytask resume` to continue it, or choose another "
                    "directory."
                )
        return path

    @classmethod
    def create(cls, path: str | Path, config: Mapping[str, Any]) -> RunDirectory:
        """Create a new run directory; an existing non-empty directory is never reused."""
        path = cls.check_new(path)
        make_dir(path, "create the run directory")
        run = cls(path)
        text = yaml.safe_dump(dict(config), sort_keys=False)
        write_atomic(run.config_path, text, "write")
        meta = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "polytask": package_version(),
            # what `polytask resume` checks config.yaml against (see check_config)
            "config_sha256": _sha256(text.encode("utf-8")),
            "config": _json_safe(dict(config)),
        }
        run.write_meta(meta)
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        """An existing run directory (it must contain ``config.yaml``)."""
        path = Path(path)
        if not (path / "config.yaml").is_file():
            raise ConfigError(
                f"{path} is not a polytask run directory (no config.yaml found there)."
            )
        return cls(path)

    def read_config(self) -> dict[str, Any]:
        with guard(self.config_path, "read"):
            raw = self.config_path.read_bytes()
        data = load_bytes(raw, f"{show_path(self.config_path)} (damaged)")
        if not isinstance(data, dict):
            raise ConfigError(f"{self.config_path} does not hold a configuration mapping.")
        return data

    # -- meta.json and the configuration's hash -----------------------------------------------
    def write_meta(self, meta: Mapping[str, Any]) -> None:
        write_atomic(self.meta_path, json.dumps(_json_safe(meta), indent=2), "write")

    def read_meta(self) -> dict[str, Any]:
        """``meta.json``; missing or damaged: a RunDirectoryError."""
        if not self.meta_path.is_file():
            raise RunDirectoryError(
                f"{self.meta_path} is missing, so config.yaml cannot be checked against the "
                "configuration the run started with; restore it, or start a new run."
            )
        with guard(self.meta_path, "read"):
            text = self.meta_path.read_text(encoding="utf-8", errors="replace")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RunDirectoryError(
                f"{self.meta_path} is damaged, not valid JSON ({exc}); restore it, or start a "
                "new run."
            ) from None
        if not isinstance(data, dict):
            raise RunDirectoryError(f"{self.meta_path} is damaged: expected a JSON object.")
        return data

    def check_config(self, allow: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
        """Compare config.yaml with the configuration the run started with (its SHA-256 and
        copy in meta.json). Returns the changes ``{key: (old, new)}`` when every changed key
        is in ``allow``; else a RunDirectoryError naming the keys that differ. ``allow``
        may only name keys of :data:`ALLOWED_CHANGES`."""
        allowed = set(allow)
        refused = sorted(allowed - set(ALLOWED_CHANGES))
        if refused:
            raise ConfigError(
                f"--allow-change {', '.join(refused)}: this key cannot change while a run goes "
                "on (the result would be neither the old run nor a new one); keys that can: "
                f"{', '.join(ALLOWED_CHANGES)}. Start a new run with `polytask train`."
            )
        meta = self.read_meta()
        with guard(self.config_path, "read"):
            raw = self.config_path.read_bytes()
        expected = meta.get("config_sha256")
        if expected is None:
            return {}  # a run started before config.yaml had a hash
        if not isinstance(expected, str) or not isinstance(meta.get("config"), dict):
            raise RunDirectoryError(
                f"{self.meta_path} is damaged: config_sha256 or config is not what polytask "
                "writes; restore it, or start a new run."
            )
        if _sha256(raw) == expected:
            return {}
        old = _flatten(meta["config"])
        new = _flatten(_json_safe(self.read_config()))
        keys = sorted(
            k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>")
        )
        if not keys:  # the same configuration, written differently
            return {}
        changes = {k: (old.get(k, "<unset>"), new.get(k, "<unset>")) for k in keys}
        described = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        not_allowed = [k for k in keys if k not in allowed]
        if not_allowed:
            can = [k for k in not_allowed if k in ALLOWED_CHANGES]
            cannot = [k for k in not_allowed if k not in ALLOWED_CHANGES]
            advice = []
            if can:
                advice.append(f"to continue with the new value, add --allow-change {','.join(can)}")
            if cannot:
                advice.append(
                    f"{', '.join(cannot)} cannot change while a run goes on: undo the edit, or "
                    "train a new run with the new configuration"
                )
            raise RunDirectoryError(
                f"{self.config_path} was changed since the run started ({described}); "
                + "; ".join(advice)
                + "."
            )
        if "train.epochs" in changes:
            epochs = changes["train.epochs"][1]
            done = len(self.read_metrics())
            if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < max(done, 1):
                raise RunDirectoryError(
                    f"{self.config_path}: train.epochs {epochs!r} is less than the {done} "
                    "epochs the run has done (or not a positive integer)."
                )
        return changes

    def accept_config(self, changes: Mapping[str, tuple[Any, Any]]) -> None:
        """Record allowed changes of config.yaml in meta.json (a later resume checks against
        the new configuration)."""
        if not changes:
            return
        meta = self.read_meta()
        with guard(self.config_path, "read"):
            raw = self.config_path.read_bytes()
        meta["config_sha256"] = _sha256(raw)
        meta["config"] = _json_safe(self.read_config())
        meta.setdefault("config_changes", []).append(
            {
                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()},
            }
        )
        self.write_meta(meta)

    # -- records -------------------------------------------------------------------------
    def append_metrics(self, record: Mapping[str, Any]) -> None:
        append_line(self.metrics_path, json.dumps(_json_safe(record)), "append a record to")

    def _metric_lines(self) -> tuple[list[dict[str, Any]], str | None]:
        """The records of metrics.jsonl and a note on a last line cut short (``None`` if the
        file ends cleanly); a damaged line before the last is a RunDirectoryError."""
        if not self.metrics_path.exists():
            return [], None
        with guard(self.metrics_path, "read"):
            text = self.metrics_path.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")
        tail = lines.pop()  # "" when the file ends with a newline
        records: list[dict[str, Any]] = []
        cut: str | None = None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                if i == len(lines) and not tail.strip():
                    cut = f"line {i} is not a complete record"
                    continue
                raise RunDirectoryError(
                    f"{self.metrics_path} is damaged: line {i} is not a JSON record of an "
                    "epoch; restore the file, or start a new run."
                )
            records.append(record)
        if tail.strip():
            cut = f"line {len(lines) + 1} ends without a newline"
        return records, cut

    def read_metrics(self) -> list[dict[str, Any]]:
        """The epochs' records. A last line cut short (a crash, or a record being written
        right now) is left out with a warning on stderr; a damaged line before it is a
        RunDirectoryError."""
        records, cut = self._metric_lines()
        if cut is not None:
            print(
                f"polytask: warning: {self.metrics_path}: {cut} (a write cut short by a crash, "
                f"or one in progress); it is left out. `polytask resume {self.path}` rebuilds it.",
                file=sys.stderr,
            )
        return records

    def truncate_metrics(self, epochs_done: int) -> list[str]:
        """Keep the records of the ``epochs_done`` epochs the checkpoint has done (drop those
        written after it, and a last line cut short by a crash: its epoch is trained again);
        returns notes for the log. Records missing or out of order: a RunDirectoryError."""
        if not self.metrics_path.exists() and epochs_done == 0:
            return []
        records, cut = self._metric_lines()
        kept = [r for r in records if r["epoch"] < epochs_done]
        if [r["epoch"] for r in kept] != list(range(epochs_done)):
            raise RunDirectoryError(
                f"{self.metrics_path} is damaged: the checkpoint has done {epochs_done} epochs "
                f"but the file records epochs {[r['epoch'] for r in kept]}; restore the file, "
                "or start a new run."
            )
        notes = []
        if cut is not None:
            notes.append(
                f"{self.metrics_path}: {cut}, cut short by a crash; dropped, the epoch it "
                "recorded is trained and recorded again"
            )
        if len(kept) != len(records) or cut is not None:
            text = "".join(json.dumps(_json_safe(r)) + "\n" for r in kept)
            write_atomic(self.metrics_path, text, "rewrite")
        return notes

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporary files of writes cut short (``.NAME.XXXX.tmp``, and older
        ``NAME.tmp``) from the run directory and its checkpoints; returns them. Only for the
        process holding the run's lock: no write of another process is in progress."""
        removed = []
        for folder in (self.path, self.checkpoint_dir):
            if not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if p.is_file() and p.name.endswith(TMP_SUFFIX):
                    with guard(p, "remove the stale temporary file"):
                        p.unlink()
                    removed.append(p)
        return removed

    def write_results(self, results: Mapping[str, Any]) -> None:
        write_atomic(self.results_path, json.dumps(_json_safe(results), indent=2), "write")

    def read_results(self) -> dict[str, Any] | None:
        if not self.results_path.exists():
            return None
        with guard(self.results_path, "read"):
            text = self.results_path.read_text(encoding="utf-8", errors="replace")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RunDirectoryError(
                f"{self.results_path} is damaged, not valid JSON ({exc}); remove it and run "
                "`polytask resume` to evaluate the run again."
            ) from None
        if not isinstance(data, dict):
            raise RunDirectoryError(
                f"{self.results_path} is damaged: expected a JSON object; remove it and run "
                "`polytask resume` to evaluate the run again."
            )
        return data

    def write_inspection(self, arrays: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Write ``inspection.npz``: the tensors (as float32 NumPy arrays, float16 for those
        of more than a million values) and ``meta`` as JSON under the key ``meta``."""
        data: dict[str, Any] = {}
        for key, tensor in arrays.items():
            value = tensor.detach().cpu().float()
            data[key] = value.half().numpy() if value.numel() > 1_000_000 else value.numpy()
        data["meta"] = np.array(json.dumps(dict(meta)))

        def fill(f: IO[bytes]) -> None:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **data)
            f.write(buffer.getbuffer())

        write_atomic(self.inspection_path, fill, "write")

    def read_inspection(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]] | None:
        """The arrays and the meta data of ``inspection.npz``; ``None`` without one."""
        if not self.inspection_path.is_file():
            return None
        with np.load(self.inspection_path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
        return {k: v.astype(np.float32) for k, v in arrays.items()}, meta

    def logger(self, console: bool = True) -> logging.Logger:
        """A logger writing to ``train.log`` (and to stderr when ``console``)."""
        log = logging.getLogger(f"polytask.run.{self.path.resolve()}")
        log.setLevel(logging.INFO)
        log.propagate = False
        if not log.handlers:
            fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
            fh = _run_log_handler(self.path / "train.log")
            fh.setFormatter(fmt)
            log.addHandler(fh)
            if console:
                sh = logging.StreamHandler(sys.stderr)
                sh.setFormatter(logging.Formatter("%(message)s"))
                log.addHandler(sh)
        return log

    def close_logger(self) -> None:
        log = logging.getLogger(f"polytask.run.{self.path.resolve()}")
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)
