"""Run under torchrun: train (or resume) the runs of a JSON plan, one after the other, in
one process group.

``python -m torch.distributed.run --nproc-per-node N ddp_runner.py PLAN.json``; the plan is
a list of ``{"run_dir": ..., "config": {...}}`` (train; ``"stop_at": S`` stops it as if
the processes died at global step S) or ``{"run_dir": ..., "resume": true}`` (resume).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from polytask.api import resume, train


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

        try:
            if item.get("resume"):
                resume(item["run_dir"], console=False, step_callbacks=[stop])
            else:
                train(item["config"], run_dir=item["run_dir"], step_callbacks=[stop], console=False)
        except Stop:
            pass


if __name__ == "__main__":
    main(sys.argv[1])
