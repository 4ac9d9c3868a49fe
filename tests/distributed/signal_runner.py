"""Run ``polytask`` under torchrun and send SIGTERM at a global step, as a user or a
scheduler would.

``python -m torch.distributed.run --nproc-per-node 2 signal_runner.py WHO STEP OUT ARGS...``
runs ``polytask ARGS...`` on every process. After global step ``STEP``:

- ``WHO = launcher``: rank 0 sends SIGTERM to torchrun (its parent), which forwards it to
  every process, then waits (in its step callback) until the forwarded signal has arrived;
- ``WHO = rank1``: rank 1 sends SIGTERM to itself only; no other process gets a signal.

Each process writes ``OUT/rank-R``: its exit code and the last global step it trained.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import polytask.api as api
from polytask.cli import main
from polytask.training.stopping import stop_requested


def run(who: str, step: int, out: Path, args: list[str]) -> int:
    rank = int(os.environ["RANK"])
    trained = [0]
    original = api.Trainer

    def trainer(*a: Any, **kw: Any) -> Any:
        t = original(*a, **kw)

        def callback(info: Any) -> None:
            trained[0] = info.global_step + 1
            if trained[0] != step:
                return
            if who == "launcher" and rank == 0:
                os.kill(os.getppid(), signal.SIGTERM)
                deadline = time.monotonic() + 20
                while stop_requested() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
            elif who == "rank1" and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        t.step_callbacks.append(callback)
        return t

    api.Trainer = trainer  # type: ignore[misc]
    try:
        code = main(args)
    finally:
        api.Trainer = original  # type: ignore[misc]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{rank}").write_text(f"{code} {trained[0]}", encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]))
