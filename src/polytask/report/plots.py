"""PNG files of a run's figures, for the Markdown report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .figures import Plot, curves_figure

__all__ = ["plot_run_curves", "save_plot"]


def save_plot(plot: Plot, path: str | Path, dpi: int = 110) -> Path:
    """Write the figure of ``plot`` as a PNG file and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        plot.figure.savefig(path, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(plot.figure)
    return path


def plot_run_curves(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    higher_is_better: Mapping[str, Mapping[str, bool]] | None = None,
) -> Path | None:
    """Training and validation loss per task and validation metrics per epoch (see
    :func:`~polytask.report.figures.curves_figure`); ``None`` without records."""
    plot = curves_figure(records, higher_is_better or {})
    return None if plot is None else save_plot(plot, path)
