"""Checkpoints: written atomically, read with weights-only unpickling, checked against the model.

A checkpoint is a plain mapping of tensors and Python scalars/containers, so that
``torch.load(..., weights_only=True)`` can read it: opening a checkpoint never runs code
from it. It carries the SHA-256 of its contents (``content_sha256``: every tensor's dtype,
shape and bytes, every key and value, in order), checked when it is read: a file with the
right format tag but other contents (edited, damaged, or assembled by hand) is refused.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..fsio import guard, write_atomic
from ..models.base import MultiTaskModel

__all__ = [
    "DIGEST_KEY",
    "FORMAT",
    "check_model_signature",
    "content_digest",
    "load_checkpoint",
    "load_model_state",
    "model_signature",
    "save_atomic",
]

FORMAT = "polytask-checkpoint-v1"
DIGEST_KEY = "content_sha256"
"""The key of a checkpoint's content hash (see :func:`content_digest`)."""


def content_digest(obj: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's contents (without :data:`DIGEST_KEY`): keys, values and
    every tensor's dtype, shape and bytes, in order. The same before saving and after a
    weights-only load."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != DIGEST_KEY})
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(f"D{len(value)}:".encode())
        for k, v in value.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(value, list | tuple):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
        for v in value:
            _feed(h, v)
    elif isinstance(value, bytes | bytearray):
        h.update(f"B{len(value)}:".encode())
        h.update(bytes(value))
    else:  # str, int, float, bool, None, torch.dtype / device / Size
        text = repr(value)
        h.update(f"S{type(value).__name__}{len(text)}:{text}".encode())


def save_atomic(obj: Mapping[str, Any], path: str | Path) -> None:
    """Write ``obj`` with its content hash to ``path`` so that a crash or a full disk leaves
    either the old file or the new one (a full disk is a one-line FileSystemError)."""
    data = dict(obj)
    data[DIGEST_KEY] = content_digest(data)
    write_atomic(path, lambda f: torch.save(data, f), "write the checkpoint")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a polytask checkpoint; a missing, corrupted or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with guard(path, "read the checkpoint"), path.open("rb") as f:  # permissions first
        f.read(1)
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
    digest = data.pop(DIGEST_KEY, None)
    if not isinstance(digest, str):
        raise CheckpointError(
            f"cannot read checkpoint {path}: it has no content hash ({DIGEST_KEY}), so its "
            "contents cannot be checked; use a checkpoint written by polytask."
        )
    if content_digest(data) != digest:
        raise CheckpointError(
            f"cannot read checkpoint {path}: its contents do not match its hash (damaged or "
            "edited); resume from another copy, or start the run again."
        )
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


def load_model_state(model: MultiTaskModel, data: Mapping[str, Any], path: Path) -> None:
    """Load a checkpoint's weights into ``model``: first its structure (``data["structure"]``,
    written for architectures that change during training, see
    :meth:`~polytask.models.MultiTaskModel.adapt`), then, once the signatures match, the
    state dict."""
    structure = data.get("structure")
    if structure is not None:
        model.set_structure(structure)
    check_model_signature(data["model_signature"], model, path)
    model.load_state_dict(data["model"])
