"""Matplotlib figures of a run: per-task training and validation curves, task weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_run_curves"]


def plot_run_curves(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Training loss, task weight and validation metrics per epoch; ``None`` without records."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) + 1 for r in records]
    tasks = list(records[0]["train"]["loss"])
    value_keys = [(t, k) for t in tasks for k in records[0]["val"]["metrics"].get(t, {})]
    n_panels = 2 + len(value_keys)
    cols = min(3, n_panels)
    rows = (n_panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    flat = list(axes.flat)
    ax = flat[0]
    for t in tasks:
        ax.plot(
            epochs, [r["train"]["loss"][t] for r in records], marker="o", ms=3, label=f"{t} train"
        )
        ax.plot(epochs, [r["val"]["losses"][t] for r in records], ls="--", label=f"{t} val")
    ax.set_title("loss per task")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=7)
    ax = flat[1]
    for t in tasks:
        ax.plot(epochs, [r["train"]["weight"][t] for r in records], marker="o", ms=3, label=t)
    ax.set_title("mean task weight")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=7)
    for ax, (t, k) in zip(flat[2:], value_keys, strict=False):
        ax.plot(epochs, [r["val"]["metrics"][t][k] for r in records], marker="o", ms=3, label="val")
        if all("test" in r for r in records):
            ax.plot(epochs, [r["test"]["metrics"][t][k] for r in records], ls="--", label="test")
        ax.set_title(f"{t}: {k}")
        ax.set_xlabel("epoch")
    for ax in flat[n_panels:]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
