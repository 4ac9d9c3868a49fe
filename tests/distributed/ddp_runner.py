"""Run under torchrun: train (or resume) the runs of a JSON plan, one after the other, in
one process group.

``python -m torch.distributed.run --nproc-per-node N ddp_runner.py PLAN.json``; the plan is
a list of ``{"run_dir": ..., "config": {...}}`` (train; ``"stop_at": S`` stops it as if
the processes died at global step S), ``{"run_dir": ..., "resume": true}`` (resume) or
``{"compare": GRID_FILE, "errors": FOLDER}`` (``polytask compare``; an error of it, raised
on every process at the same point, is written to ``FOLDER/rank-R`` as ``TYPE: MESSAGE``) or,
last (the command line leaves the process group), ``{"cli": ARGS, "signal_at": S, "out":
FOLDER}``: ``polytask ARGS`` with SIGTERM sent to rank 1 only after global step S (see
:mod:`signal_runner`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import signal_runner

from polytask.api import resume, train
from polytask.compare import run_grid
from polytask.errors import PolytaskError


class Stop(Exception):
    """Raised by a step callback on every process at the same step."""


def main(plan_path: str) -> None:
    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    for item in plan:
        stop_at = item.get("stop_at")

        def stop(info: Any, stop_at: Any = stop_at) -> None:
            if stop_at is not None and info.global_step + 1 == stop_at:
                raise Stop

        if "compare" in item:
            try:
                run_grid(item["compare"], console=False)
            except PolytaskError as exc:
                errors = Path(item["errors"])
                errors.mkdir(parents=True, exist_ok=True)
                message = f"{type(exc).__name__}: {exc}"
                (errors / f"rank-{os.environ['RANK']}").write_text(message, encoding="utf-8")
            continue
        if "cli" in item:
            signal_runner.run("rank1", item["signal_at"], Path(item["out"]), item["cli"])
            return
        try:
            if item.get("resume"):
                resume(item["run_dir"], console=False, step_callbacks=[stop])
            else:
                train(item["config"], run_dir=item["run_dir"], step_callbacks=[stop], console=False)
        except Stop:
            pass


if __name__ == "__main__":
    main(sys.argv[1])
