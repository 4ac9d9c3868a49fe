"""Run the command line as a separate process on bad input, and check what it left behind.

Two ways to start the process:

- :func:`run_cli` forks this test process (which has polytask and torch imported already)
  and runs ``polytask.cli.main(args)`` in the child with its own working directory, stdout
  and stderr, exactly as ``python -m polytask ARGS`` would after its imports: a real process
  with a real exit code, at a few milliseconds instead of two seconds of interpreter and
  torch start-up. A child that does not finish within ``timeout`` seconds is killed and
  reported as hung (exit code ``None``).
- :func:`run_cli_subprocess` starts ``python -m polytask`` from scratch, for the cases where
  the start-up itself matters (environment, signals) and to show both agree.

:func:`snapshot` records every file under a directory (size and SHA-256) so that a test can
assert that a refused command changed nothing; :func:`assert_refused` checks the one-line
``polytask: error:`` contract.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "polytask: error: "
SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass(frozen=True)
class Result:
    """What a command did: exit code (``None`` if it hung), stdout and stderr."""

    code: int | None
    out: str
    err: str

    @property
    def hung(self) -> bool:
        return self.code is None


def run_cli(
    *args: object,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Result:
    """``polytask ARGS`` in a forked child process (see the module docstring)."""
    argv = [str(a) for a in args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                # the parent's OpenMP thread pool does not survive fork(): a child entering a
                # parallel region with it waits forever (as DataLoader workers, run on one
                # thread)
                import torch

                torch.set_num_threads(1)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                # pytest replaces sys.stdout / sys.stderr with its capture: write to the fds
                sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
                if cwd is not None:
                    os.chdir(cwd)
                if env is not None:
                    os.environ.clear()
                    os.environ.update(env)
                from polytask.cli import main

                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        status: int | None = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.005)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if status is None:
        return Result(None, stdout, stderr)
    code = os.waitstatus_to_exitcode(status)
    return Result(code, stdout, stderr)


def run_cli_subprocess(
    *args: object,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    stdin: bytes | None = None,
) -> Result:
    """``python -m polytask ARGS`` in a fresh interpreter."""
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SRC), environment.get("PYTHONPATH", "")) if p
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "polytask", *(str(a) for a in args)],
            cwd=cwd,
            env=environment,
            input=stdin,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return Result(None, _text(exc.stdout), _text(exc.stderr))
    return Result(proc.returncode, _text(proc.stdout), _text(proc.stderr))


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


def snapshot(root: str | Path) -> dict[str, tuple[int, str]]:
    """``{relative path: (size, sha256)}`` of every file under ``root`` (empty if none)."""
    root = Path(root)
    files: dict[str, tuple[int, str]] = {}
    if not root.exists():
        return files
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            files[path.relative_to(root).as_posix()] = (len(data), hashlib.sha256(data).hexdigest())
    return files


def assert_refused(result: Result, *fragments: str, code: int = 2, max_length: int = 2000) -> str:
    """The command answered (did not hang), exited with ``code``, wrote no traceback, and
    stderr is exactly one ``polytask: error:`` line (of at most ``max_length`` characters)
    containing every fragment; returns the message."""
    assert not result.hung, f"no answer; stderr so far:\n{result.err[-2000:]}"
    assert "Traceback" not in result.err, result.err[-4000:]
    assert result.code == code, f"exit code {result.code}, stderr:\n{result.err[-2000:]}"
    lines = [line for line in result.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(PREFIX)]
    assert len(errors) == 1, f"expected one error line, stderr:\n{result.err[-2000:]}"
    assert len(errors[0]) <= max_length, f"a {len(errors[0])}-character message"
    message = errors[0][len(PREFIX) :]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_unchanged(before: Mapping[str, tuple[int, str]], root: str | Path) -> None:
    """No file under ``root`` was added, removed or changed since ``before``."""
    after = snapshot(root)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), f"added {added}, removed {removed}, changed {changed}"


def write(path: Path, content: str | bytes) -> Path:
    """Write ``content`` (text as UTF-8) to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


__all__: Sequence[str] = [
    "PREFIX",
    "Result",
    "assert_refused",
    "assert_unchanged",
    "run_cli",
    "run_cli_subprocess",
    "snapshot",
    "write",
]
