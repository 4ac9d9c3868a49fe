"""Helpers shared by the tests (importable as ``helpers``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor


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


#: families of seeded Jacobians for the solver tests (the index enters the seed)
JACOBIAN_KINDS = (
    "ordinary",
    "nearly_collinear",
    "rank_deficient",
    "conflicting",
    "duplicates",
    "zero_rows",
)


def seeded_jacobian(kind: str, k: int, seed: int, dim: int = 64) -> Tensor:
    """A K x dim float64 Jacobian of the given family, rows of scales spread over e^+-2."""
    g = torch.Generator().manual_seed(10_000 * k + 100 * JACOBIAN_KINDS.index(kind) + seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    j = randn(k, dim)
    if kind == "nearly_collinear":
        j = randn(1, dim) + 1e-3 * j
    elif kind == "rank_deficient":
        r = max(1, k // 3)
        j = randn(k, r) @ randn(r, dim)
    elif kind == "conflicting":
        # a strong shared direction, pointing either way: about half the pairs conflict
        j = j + 3.0 * (2 * torch.rand(k, 1, generator=g, dtype=torch.float64) - 1) * randn(1, dim)
    j = j * torch.exp(randn(k, 1).clamp(-2.0, 2.0))
    if kind == "duplicates":
        j = j[torch.arange(k) % max(1, (k + 1) // 2)]  # the second half copies the first
    elif kind == "zero_rows":
        j[:: max(2, k // 2)] = 0.0
    return j


# -- the command line, in-process ------------------------------------------------------------

PREFIX = "polytask: error:"


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run ``polytask ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from polytask.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(code: int, err: str, *fragments: str, whole: bool = False) -> str:
    """Exit code 2 and one ``polytask: error:`` message containing every fragment
    (with ``whole``, that line is all of stderr)."""
    assert "Traceback" not in err, err
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    lines = [line for line in err.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1, f"expected one error line, stderr:\n{err}"
    assert err.startswith(PREFIX), f"stderr has more than the message:\n{err}"
    if whole:
        assert len(err.strip().splitlines()) == 1, f"stderr has more than one line:\n{err}"
    message = err[len(PREFIX) :].strip()
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the message {message!r}"
    return message


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under ``root`` with its content hash, size and modification time."""
    state: dict[str, Any] = {}
    if not root.exists():
        return state
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            state[rel] = "dir"
        else:
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[rel] = (digest, st.st_size, st.st_mtime_ns)
    return state


def resumed_equals_uninterrupted(
    tmp_path: Path, overrides: dict[str, Any], stop_after: int = 4
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the tiny configuration with ``overrides`` once straight through and once stopped
    by KeyboardInterrupt at global step ``stop_after`` and resumed; asserts that the test
    results and every weight of the last checkpoints are equal, and returns both last
    checkpoints (uninterrupted, resumed) for further checks."""
    from polytask.api import resume, train
    from polytask.training.checkpoint import load_checkpoint
    from polytask.training.rundir import RunDirectory

    first, whole = train(tiny_config_dict(tmp_path / "a", **overrides), console=False)

    def interrupt(info: Any) -> None:
        if info.global_step == stop_after:
            raise KeyboardInterrupt

    run_dir = tmp_path / "b" / "run"
    with pytest.raises(KeyboardInterrupt):
        train(
            tiny_config_dict(tmp_path / "b", **overrides),
            run_dir=run_dir,
            step_callbacks=[interrupt],
            console=False,
        )
    resumed = resume(run_dir, console=False)
    assert resumed["test"]
    assert resumed["test"] == whole["test"]
    a = load_checkpoint(first.last_checkpoint)
    b = load_checkpoint(RunDirectory(run_dir).last_checkpoint)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    return a, b
