"""The ``polytask`` command line.

Mistakes in the user's input (config keys, values, names, paths, checkpoints) end with one
message on stderr and exit code 2, never a traceback; nothing already written is overwritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import PolytaskError

__all__ = ["main"]

EPILOG = "Overrides are dotted keys, e.g. train.epochs=5 optim.lr=1e-3 model.architecture=hps."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polytask",
        description="Multi-task learning: train, resume, evaluate, compare, report.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a YAML recipe into a new run directory", epilog=EPILOG)
    p.add_argument("config", help="path to a YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument(
        "--run-dir", help="the run directory to create (default OUTPUT_DIR/NAME-TIMESTAMP)"
    )
    p.add_argument("--quiet", action="store_true", help="log to the run directory only")

    p = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--allow-change",
        metavar="KEYS",
        action="append",
        default=[],
        help="continue although config.yaml changed these comma-separated keys since the run "
        "started (only keys such as train.epochs, where continuing is meaningful)",
    )

    p = sub.add_parser("eval", help="evaluate a run's checkpoint on a split")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser(
        "compare", help="run a grid of configurations and tabulate them", epilog=EPILOG
    )
    p.add_argument("grid", help="path to a grid YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every cell")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--cells",
        metavar="PATTERNS",
        help="train only the cells matching these comma-separated names or shell patterns "
        "(e.g. 'single_task,hps-*'); the table still shows every finished cell",
    )

    p = sub.add_parser("report", help="(re)write the report of run or grid directories")
    p.add_argument("dirs", nargs="+", metavar="DIR")

    sub.add_parser("list", help="list the registered architectures, methods, data sets, ...")
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from .api import train
    from .report.run_report import results_table

    run, results = train(args.config, args.overrides, run_dir=args.run_dir, console=not args.quiet)
    if _is_writer():
        print(results_table(results, "test"))
        print(f"run directory: {run.path}")
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from .api import resume
    from .report.run_report import results_table

    allow = [k.strip() for keys in args.allow_change for k in keys.split(",") if k.strip()]
    results = resume(args.run_dir, console=not args.quiet, allow_change=allow)
    if _is_writer():
        print(results_table(results, "test"))
    return 0


def _is_writer() -> bool:
    """Whether this process prints results: rank 0 of a torchrun job, or a single process."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _cmd_eval(args: argparse.Namespace) -> int:
    from .api import evaluate_run
    from .report.tables import format_value, markdown_table

    result = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    rows = [
        [task, name, format_value(value)]
        for task, values in result.metrics.items()
        for name, value in values.items()
    ]
    rows += [[task, "loss", format_value(value)] for task, value in result.losses.items()]
    print(markdown_table(["task", "value", f"{args.split} ({args.checkpoint})"], rows))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_grid

    cells = None if args.cells is None else [c.strip() for c in args.cells.split(",")]
    summary = run_grid(args.grid, args.overrides, console=not args.quiet, cells=cells)
    if not _is_writer():  # under torchrun rank 0 prints the grid's summary
        return 0
    print()
    print(summary["table"])
    print()
    print(summary["note"])
    if summary.get("verdict"):
        print()
        print(summary["verdict"])
    if summary.get("unfinished_note"):
        print()
        print(summary["unfinished_note"])
    if summary.get("html"):
        print()
        print(f"report: {summary['html']}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .api import warn_if_written
    from .fsio import guard

    for d in args.dirs:
        path = Path(d)
        warn_if_written(path)
        with guard(path, "write the report in"):
            _report_one(path)
    return 0


def _report_one(path: Path) -> None:
    from .compare import summarize_grid
    from .errors import ConfigError
    from .report.run_report import write_run_report
    from .training.rundir import RunDirectory

    if (path / "grid.yaml").is_file():
        summary = summarize_grid(path)
        print(summary["table"])
        if summary.get("unfinished_note"):
            print(summary["unfinished_note"])
        print(f"written: {path / 'results.md'}")
        if summary.get("html"):
            print(f"written: {summary['html']}")
    elif (path / "config.yaml").is_file():
        run = RunDirectory.open(path)
        write_run_report(run)
        print(f"written: {path / 'report.md'}")
        print(f"written: {path / 'report.html'}")
    else:
        raise ConfigError(f"{path} is neither a run directory nor a grid directory.")


def _cmd_list(args: argparse.Namespace) -> int:
    from .balancing import BALANCERS
    from .data import DATASETS
    from .metrics import METRICS
    from .models import ARCHITECTURES, BACKBONES, HEADS
    from .models.regularizers import REGULARIZERS
    from .registry import Registry

    registries: list[tuple[str, Registry[Any]]] = [
        ("architectures", ARCHITECTURES),
        ("backbones", BACKBONES),
        ("heads", HEADS),
        ("task regularizers", REGULARIZERS),
        ("balancing methods", BALANCERS),
        ("data sets", DATASETS),
        ("metrics", METRICS),
    ]
    for title, registry in registries:
        print(f"{title}: {', '.join(registry.names())}")
    return 0


COMMANDS = {
    "train": _cmd_train,
    "resume": _cmd_resume,
    "eval": _cmd_eval,
    "compare": _cmd_compare,
    "report": _cmd_report,
    "list": _cmd_list,
}


STOPPABLE = ("train", "resume", "compare")
"""Commands that SIGINT, SIGTERM and SIGHUP stop at a safe point (see training.stopping)."""


def _stopped_line(args: argparse.Namespace, exc: Any) -> str:
    """The one line of a run stopped by a signal: which signal, and how to go on."""
    how = "stopped at once (a second signal)" if exc.immediate else "stopped"
    head = f"polytask: {how} by {exc.signal_name}"
    path = exc.run_path
    if args.command == "compare":
        cell = f": {path} resumes from {exc.detail}" if path is not None else ""
        return f"{head}; `polytask compare {args.grid}` goes on with the grid{cell}."
    if path is None:
        path = getattr(args, "run_dir", None)
        if path is None:
            return f"{head} before training began; nothing to resume."
    if not exc.resumable:
        return f"{head}; {path} has no checkpoint: start it again with `polytask train`."
    return f"{head}; `polytask resume {path}` goes on from {exc.detail}."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``polytask`` console script; returns the exit code."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options: `train CONFIG --quiet train.epochs=2`
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    rank = _rank_prefix()
    try:
        if args.command in STOPPABLE:
            from .training.stopping import stop_on_signals

            with stop_on_signals():
                return COMMANDS[args.command](args)
        return COMMANDS[args.command](args)
    except PolytaskError as exc:
        print(f"polytask: error: {rank}{exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file system failure outside polytask's own writers
        from .fsio import file_system_error

        where = exc.filename if isinstance(exc.filename, str) else "a file"
        print(f"polytask: error: {file_system_error(exc, where, 'access')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from .training.stopping import RunStopped

        if isinstance(exc, RunStopped):
            print(_stopped_line(args, exc), file=sys.stderr)
            return exc.exit_code
        hints = {
            "compare": f"run `polytask compare {getattr(args, 'grid', 'GRID')}` again to go on",
            "train": "`polytask resume RUN_DIR` (the directory logged at the start) goes on "
            "from the last checkpoint",
            "resume": f"`polytask resume {getattr(args, 'run_dir', 'RUN_DIR')}` goes on from "
            "the last checkpoint",
        }
        print(
            f"polytask: interrupted; {hints.get(args.command, 'nothing was lost')}.",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:
        if not rank:
            raise
        # one process of a torchrun job: name the rank and the cause; torchrun then ends the
        # other processes (a collective with a lost peer fails on them too)
        print(
            f"polytask: error: {rank}{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
            file=sys.stderr,
        )
        return 1
    finally:
        _leave_process_group()


def _rank_prefix() -> str:
    """``[rank R of N] `` in a process started by torchrun with several processes."""
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        return f"[rank {os.environ.get('RANK', '?')} of {world}] "
    return ""


def _leave_process_group() -> None:
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
