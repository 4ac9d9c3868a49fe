"""Helpers shared by the tests (importable as ``helpers``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_config_dict(output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A MultiDigits run that trains in about a second on a CPU."""
    config: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(output_dir),
        "data": {
            "name": "multidigits",
            "options": {"n_train": 256, "n_val": 64, "n_test": 64},
            "batch_size": 32,
        },
        "model": {
            "architecture": "hps",
            "backbone": "small_cnn",
            "backbone_options": {"channels": [8, 8], "out_features": 16},
        },
        "optim": {"lr": 0.01},
        "train": {"epochs": 2, "progress": False, "deterministic": True},
    }
    for dotted, value in overrides.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config


def own_copies(rep: Any, task: str) -> list[Any]:
    """The copies of the shared-representation points that ``task`` reads (per-task points)
    or the single copy every task reads."""
    return [
        p.leaves[task] if task in p.leaves else p.leaves[None]
        for p in rep.points
        if task in p.leaves or None in p.leaves
    ]


def other_copies(rep: Any, task: str) -> list[Any]:
    """The copies of the shared-representation points given to tasks other than ``task``."""
    return [leaf for p in rep.points for t, leaf in p.leaves.items() if t not in (None, task)]
