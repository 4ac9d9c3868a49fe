"""Checkpoints: written atomically, read with weights-only unpickling, checked against the model.

A checkpoint is a plain mapping of tensors and Python scalars/containers, so that
``torch.load(..., weights_only=True)`` can read it: opening a checkpoint never runs code
from it.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["FORMAT", "check_model_signature", "load_checkpoint", "model_signature", "save_atomic"]

FORMAT = "polytask-checkpoint-v1"


def save_atomic(obj: Mapping[str, Any], path: str | Path) -> None:
    """Write ``obj`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a polytask checkpoint; a missing, corrupted or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", _plain(str(exc)))
        what = f" `{refused.group(1)}`" if refused else " an object that is not plain data"
        raise CheckpointError(
            f"cannot read checkpoint {path}: refused, it asks to unpickle{what}, which "
            "could run code. polytask reads checkpoints with weights-only unpickling; use a checkpoint "
            "written by polytask."
        ) from None
    except Exception as exc:  # torch raises many types for damaged files
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupted, truncated or not a polytask "
            f"checkpoint ({type(exc).__name__})."
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a polytask checkpoint (format {FORMAT!r} expected).")
    return data


def _plain(text: str) -> str:
    """``text`` without ANSI escape sequences."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def model_signature(model: nn.Module) -> dict[str, list[int]]:
    """Name and shape of every entry of the model's state dict."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def check_model_signature(saved: Mapping[str, list[int]], model: nn.Module, path: Path) -> None:
    """Raise a CheckpointError describing how the checkpoint's model differs from ``model``."""
    current = model_signature(model)
    if dict(saved) == current:
        return
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    reshaped = sorted(k for k in set(saved) & set(current) if list(saved[k]) != current[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} entries missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected entries (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} entries of another shape (e.g. {k}: {saved[k]} vs {current[k]})"
        )
    raise CheckpointError(
        f"checkpoint {path} belongs to a different model: {'; '.join(parts)}. "
        "Use the configuration the checkpoint was trained with."
    )
