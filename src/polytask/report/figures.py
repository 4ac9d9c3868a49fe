"""Matplotlib figures of runs and grids, each returned with the numbers it draws.

Every function returns a :class:`Plot`: the figure and ``data``, the arrays it plotted, so
that a test can check a figure against what the run logged, or ``None`` when there is
nothing worth drawing (a task weight that never changes, no gradient diagnostics). The
functions read plain data (``metrics.jsonl`` records, ``inspection.npz`` arrays,
``results.json`` rows), never a model or a data set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Plot",
    "attention_figure",
    "cosine_figure",
    "cost_figure",
    "cross_stitch_evolution_figure",
    "cross_stitch_sorted_figure",
    "curves_figure",
    "delta_m_figure",
    "gate_figure",
    "grad_norm_figure",
    "pareto_front",
    "robustness_figure",
    "sluice_figure",
    "tradeoff_figure",
    "weights_figure",
]

Array = np.ndarray[Any, Any]


@dataclass
class Plot:
    """A figure and the numbers drawn in it."""

    figure: Any
    data: dict[str, Any] = field(default_factory=dict)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, cols: int, size: tuple[float, float]) -> tuple[Any, list[Any]]:
    plt = _plt()
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _epochs(records: Sequence[Mapping[str, Any]]) -> list[int]:
    return [int(r["epoch"]) + 1 for r in records]


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def _epoch_axis(ax: Any, epochs: Sequence[int]) -> None:
    """Whole epochs on the x axis: every epoch a tick up to 12, integer ticks beyond, and a
    single epoch in the middle of an axis from ``epoch - 1`` to ``epoch + 1`` (not a
    fraction of an epoch around it)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(epochs) <= 12:
        ax.set_xticks(list(epochs))
    if len(set(epochs)) == 1:
        ax.set_xlim(epochs[0] - 1, epochs[0] + 1)


def _ms(epochs: Sequence[int]) -> float:
    """The marker size of a per-epoch line: larger when a single epoch is a single dot."""
    return 6.0 if len(epochs) <= 1 else 3.0


#: up to this many series a legend stays inside its axes; beyond, it goes to the right of
#: them (in columns of at most LEGEND_ROWS entries) and the figure widens to hold it
LEGEND_INSIDE = 8
LEGEND_ROWS = 20


def _styles(n: int) -> list[dict[str, Any]]:
    """A colour (and beyond 20 series a line style) per series: tab10 up to 10, tab20 up to
    20, then tab20 again with other line styles, so that 40 series stay apart."""
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    dashes = ["-", "--", ":", "-."]
    return [
        {"color": cmap(i % cmap.N), "ls": dashes[(i // cmap.N) % len(dashes)]} for i in range(n)
    ]


def _legend_columns(n: int) -> int:
    return max(1, math.ceil(n / LEGEND_ROWS))


def _legend_inches(labels: Sequence[str], fontsize: float = 7.0) -> float:
    """About how wide (inches) a legend of ``labels`` outside the axes is."""
    if len(labels) <= LEGEND_INSIDE:
        return 0.0
    longest = max((len(str(label)) for label in labels), default=0)
    column = longest * fontsize * 0.62 / 72 + 0.75
    return _legend_columns(len(labels)) * column + 0.3


def _legend(ax: Any, n: int, *, fontsize: float = 8, title: str | None = None) -> None:
    """The legend of ``n`` series: inside the axes for a few, outside to the right beyond
    :data:`LEGEND_INSIDE` (widen the figure by :func:`_legend_inches`)."""
    if n <= LEGEND_INSIDE:
        ax.legend(fontsize=fontsize, title=title)
    else:
        ax.legend(
            fontsize=7,
            title=title,
            ncol=_legend_columns(n),
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
        )


# -- runs ---------------------------------------------------------------------------------

#: beyond this many tasks the training curves are small multiples with one legend
CURVES_PANEL_TASKS = 6
#: beyond this many tasks the gradient cosine figure shows the spread over the pairs of
#: tasks per epoch instead of a line per pair, and its matrix drops the printed values
COSINE_PAIR_TASKS = 4


def curves_figure(
    records: Sequence[Mapping[str, Any]], higher_is_better: Mapping[str, Mapping[str, bool]]
) -> Plot | None:
    """Per task, the training and validation loss per epoch; per metric value, the
    validation (and, where recorded, test) value per epoch, its direction in the title."""
    if not records:
        return None
    epochs = _epochs(records)
    ms = _ms(epochs)
    tasks = list(records[0]["train"]["loss"])
    values = [(t, k) for t in tasks for k in records[0]["val"]["metrics"].get(t, {})]
    # many tasks: small multiples (smaller panels, more columns, one legend for all)
    small = len(tasks) > CURVES_PANEL_TASKS
    fig, axes = _grid(
        len(tasks) + len(values), 6 if small else 3, (2.6, 2.3) if small else (4.2, 3.1)
    )
    data: dict[str, Any] = {"epochs": epochs, "train_loss": {}, "val_loss": {}, "val": {}}
    data["test"] = {}
    title = {"fontsize": 8} if small else {}
    for ax, t in zip(axes, tasks, strict=False):
        train = [_nan(r["train"]["loss"][t]) for r in records]
        val = [_nan(r["val"]["losses"].get(t)) for r in records]
        data["train_loss"][t], data["val_loss"][t] = train, val
        ax.plot(epochs, train, marker="o", ms=ms, label="train")
        ax.plot(epochs, val, marker="s", ms=ms, ls="--", label="val")
        ax.set_title(f"{t}: loss" if small else f"{t}: loss (lower is better)", **title)
        if not small:
            ax.set_ylabel("mean unweighted loss")
            ax.legend(fontsize=8)
        _epoch_axis(ax, epochs)
    for ax, (t, k) in zip(axes[len(tasks) :], values, strict=True):
        val = [_nan(r["val"]["metrics"][t][k]) for r in records]
        data["val"][f"{t}.{k}"] = val
        # small multiples: other colours than the loss panels', as their shared legend says
        colours = ({"color": "tab:green"}, {"color": "tab:red"}) if small else ({}, {})
        ax.plot(epochs, val, marker="o", ms=ms, label="val", **colours[0])
        tested = [r for r in records if "test" in r]
        if tested:
            test = [_nan(r["test"]["metrics"][t][k]) for r in tested]
            data["test"][f"{t}.{k}"] = test
            ax.plot(_epochs(tested), test, marker="s", ms=ms, ls="--", label="test", **colours[1])
        hib = higher_is_better.get(t, {}).get(k)
        if small:
            ax.set_title(f"{t}: {k}{'' if hib is None else ' ↑' if hib else ' ↓'}", **title)
        else:
            direction = (
                "" if hib is None else " (higher is better)" if hib else " (lower is better)"
            )
            ax.set_title(f"{t}: {k}{direction}")
            ax.set_ylabel(k)
            ax.legend(fontsize=8)
        _epoch_axis(ax, epochs)
    if small:
        for ax in axes:
            ax.tick_params(labelsize=7)
            ax.xaxis.label.set_fontsize(7)
        handles = [*axes[0].get_lines()]
        labels = ["train loss", "val loss"]
        if values:
            handles += axes[len(tasks)].get_lines()
            labels += ["val metric", "test metric"][: len(axes[len(tasks)].get_lines())]
        width, height = fig.get_size_inches()
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
        fig.suptitle(
            f"{len(tasks)} tasks: loss per task, then each metric (↑ higher, ↓ lower is better)",
            fontsize=9,
            y=1 - 0.4 / height,
        )
        # fixed margins in inches: tight_layout takes seconds over a hundred panels
        fig.subplots_adjust(
            left=0.5 / width,
            right=1 - 0.15 / width,
            bottom=0.45 / height,
            top=1 - 0.85 / height,
            wspace=0.3,
            hspace=0.65,
        )
    else:
        fig.tight_layout()
    return Plot(fig, data)


def _series_size(labels: Sequence[str]) -> tuple[float, float]:
    """The size of a one-axes figure with a line per label: 5.5 x 3.4 inches, widened for a
    legend outside the axes and heightened for its rows."""
    rows = min(len(labels), LEGEND_ROWS) if len(labels) > LEGEND_INSIDE else 0
    return 5.5 + _legend_inches(labels), max(3.4, 0.17 * rows + 0.9)


def weights_figure(records: Sequence[Mapping[str, Any]]) -> Plot | None:
    """Each task's mean weight per epoch; ``None`` when no weight ever differs from the
    others or from epoch to epoch (equal weighting: nothing to see)."""
    if not records:
        return None
    tasks = list(records[0]["train"]["weight"])
    weights = {t: [_nan(r["train"]["weight"].get(t)) for r in records] for t in tasks}
    finite = [w for ws in weights.values() for w in ws if math.isfinite(w)]
    if not finite or max(finite) - min(finite) <= 1e-9 * max(1.0, abs(max(finite))):
        return None
    epochs = _epochs(records)
    plt = _plt()
    fig, ax = plt.subplots(figsize=_series_size(tasks))
    for t, style in zip(tasks, _styles(len(tasks)), strict=True):
        ax.plot(epochs, weights[t], marker="o", ms=_ms(epochs), label=t, **style)
    ax.set_title("task weight chosen by the balancing method")
    ax.set_ylabel("mean weight over the epoch's steps")
    _epoch_axis(ax, epochs)
    _legend(ax, len(tasks))
    fig.tight_layout()
    return Plot(fig, {"epochs": epochs, "weight": weights})


def grad_norm_figure(records: Sequence[Mapping[str, Any]]) -> Plot | None:
    """Each task's mean gradient norm per epoch (gradient methods); ``None`` without any."""
    logged = [r for r in records if r.get("balancing")]
    if not logged:
        return None
    epochs = _epochs(logged)
    tasks = list(logged[0]["balancing"]["grad_norm"])
    norms = {t: [_nan(r["balancing"]["grad_norm"].get(t)) for r in logged] for t in tasks}
    plt = _plt()
    fig, ax = plt.subplots(figsize=_series_size(tasks))
    for t, style in zip(tasks, _styles(len(tasks)), strict=True):
        ax.plot(epochs, norms[t], marker="o", ms=_ms(epochs), label=t, **style)
    if all(v > 0 for vs in norms.values() for v in vs if math.isfinite(v)):
        ax.set_yscale("log")
    ax.set_title("per-task gradient norm (shared part)")
    ax.set_ylabel("mean ||g_k|| over the epoch's steps")
    _epoch_axis(ax, epochs)
    _legend(ax, len(tasks))
    fig.tight_layout()
    return Plot(fig, {"epochs": epochs, "grad_norm": norms})


def cosine_figure(records: Sequence[Mapping[str, Any]]) -> Plot | None:
    """The task-conflict matrix: the mean cosine between the tasks' gradients in the last
    epoch (left) and of every pair of tasks per epoch (right); ``None`` without any."""
    logged = [r for r in records if r.get("balancing")]
    if not logged:
        return None
    epochs = _epochs(logged)
    cosine = logged[-1]["balancing"]["cosine"]
    tasks = list(cosine)
    matrix = np.array([[_nan(cosine[t][u]) for u in tasks] for t in tasks])
    pairs = {
        f"{a} / {b}": [_nan(r["balancing"]["cosine"][a][b]) for r in logged]
        for i, a in enumerate(tasks)
        for b in tasks[i + 1 :]
    }
    plt = _plt()
    many = len(tasks) > COSINE_PAIR_TASKS
    side = max(3.9, 0.22 * len(tasks) + 2.0)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(side + 6.0, side), gridspec_kw={"width_ratios": [side, 5.0]}
    )
    image = left.imshow(matrix, cmap="RdBu", vmin=-1, vmax=1)
    ticks = 8 if len(tasks) <= 12 else 6
    left.set_xticks(
        range(len(tasks)),
        tasks,
        rotation=30 if not many else 90,
        ha="right" if not many else "center",
        fontsize=ticks,
    )
    left.set_yticks(range(len(tasks)), tasks, fontsize=ticks)
    for i in range(len(tasks) if len(tasks) <= 10 else 0):
        for j in range(len(tasks)):
            value = matrix[i, j]
            dark = math.isfinite(value) and abs(value) > 0.6
            left.text(
                j,
                i,
                f"{value:+.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
            )
    left.set_title(f"gradient cosine, epoch {epochs[-1]}")
    fig.colorbar(image, ax=left, fraction=0.046, pad=0.04, label="cosine (< 0: conflict)")
    if not many:
        for name, values in pairs.items():
            right.plot(epochs, values, marker="o", ms=_ms(epochs), label=name)
        right.set_title("gradient cosine per pair of tasks")
    else:  # hundreds of pairs: their spread per epoch, and the most conflicting pair
        table = np.array(list(pairs.values()), dtype=np.float64)
        low, q10, median, q90, high = np.nanpercentile(table, [0, 10, 50, 90, 100], axis=0)
        right.fill_between(epochs, low, high, color="tab:blue", alpha=0.15, label="min to max")
        right.fill_between(epochs, q10, q90, color="tab:blue", alpha=0.3, label="10 % to 90 %")
        right.plot(epochs, median, marker="o", ms=_ms(epochs), color="tab:blue", label="median")
        last = table[:, -1]
        if np.isfinite(last).any():
            worst = list(pairs)[int(np.nanargmin(last))]
            right.plot(
                epochs,
                pairs[worst],
                marker="s",
                ms=_ms(epochs),
                color="tab:red",
                label=f"lowest at the end: {worst}",
            )
        right.set_title(f"gradient cosine over the {len(pairs)} pairs of tasks")
    right.axhline(0.0, color="grey", lw=0.8)
    right.set_ylim(-1.05, 1.05)
    right.set_ylabel("mean cosine over the epoch's steps")
    _epoch_axis(right, epochs)
    _legend(right, 4 if many else len(pairs))
    fig.tight_layout()
    return Plot(fig, {"epochs": epochs, "tasks": tasks, "matrix": matrix, "pairs": pairs})


def cross_stitch_sorted_figure(alphas: Mapping[str, Array], tasks: Sequence[str]) -> Plot:
    """The cross-stitch paper's view of the learned units: per unit, every ``alpha_S``
    (``alpha[t, t, c]``: what a column keeps of itself) and every ``alpha_D``
    (``alpha[t, s, c]``, ``s != t``: what it takes from another column), sorted.

    ``alphas`` maps a unit's name to its ``alpha`` (K x K or K x K x C).
    """
    units = list(alphas)
    fig, axes = _grid(len(units), 5, (3.0, 2.7))
    data: dict[str, Any] = {"units": units, "alpha_S": {}, "alpha_D": {}}
    for ax, unit in zip(axes, units, strict=True):
        alpha = np.asarray(alphas[unit], dtype=np.float64)
        k = alpha.shape[0]
        per = alpha.reshape(k, k, -1)
        eye = np.eye(k, dtype=bool)
        same = np.sort(per[eye].ravel())
        other = np.sort(per[~eye].ravel())
        data["alpha_S"][unit], data["alpha_D"][unit] = same, other
        ax.plot(np.linspace(0, 1, same.size), same, marker=".", ms=3, label="α_S (self)")
        ax.plot(np.linspace(0, 1, other.size), other, marker=".", ms=3, label="α_D (other)")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_title(f"unit {unit}", fontsize=9)
        ax.set_xlabel("rank (fraction of values)", fontsize=8)
        ax.set_ylabel("α", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"cross-stitch units, learned α sorted ({' / '.join(tasks)}; "
        f"{'per channel' if np.asarray(alphas[units[0]]).ndim == 3 else 'per layer'})",
        fontsize=10,
    )
    fig.tight_layout()
    return Plot(fig, data)


#: the most target tasks side by side in the cross-stitch evolution figure
EVOLUTION_COLUMNS = 6


def cross_stitch_evolution_figure(records: Sequence[Mapping[str, Any]]) -> Plot | None:
    """``alpha_S`` and ``alpha_D`` of every unit and target task per epoch (means over
    channels, as the architecture's diagnostics log them); ``None`` without them."""
    logged = [
        r
        for r in records
        if isinstance(r.get("architecture"), Mapping) and "alpha_S" in r["architecture"]
    ]
    if not logged:
        return None
    plt = _plt()
    epochs = _epochs(logged)
    first = logged[0]["architecture"]
    units = list(first["alpha_S"])
    tasks = list(first["alpha_S"][units[0]])
    # at most EVOLUTION_COLUMNS tasks side by side; more wrap onto further pairs of rows
    cols = min(len(tasks), EVOLUTION_COLUMNS)
    bands = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(
        2 * bands, cols, figsize=(3.6 * cols + 1.4, 2.8 * 2 * bands), squeeze=False, sharex=True
    )
    for extra in range(len(tasks), bands * cols):
        for row in (0, 1):
            axes[2 * (extra // cols) + row][extra % cols].axis("off")
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(units)))
    data: dict[str, Any] = {"epochs": epochs, "alpha_S": {}, "alpha_D": {}}
    for row, key in enumerate(("alpha_S", "alpha_D")):
        for i, task in enumerate(tasks):
            ax = axes[2 * (i // cols) + row][i % cols]
            for color, unit in zip(colors, units, strict=True):
                values = [_nan(r["architecture"][key][unit][task]) for r in logged]
                data[key].setdefault(unit, {})[task] = values
                ax.plot(epochs, values, color=color, marker="o", ms=_ms(epochs) - 1, label=unit)
            what = "kept from its own column" if key == "alpha_S" else "taken from the others"
            ax.set_title(f"{task}: {key.replace('alpha', 'α')} ({what})", fontsize=9)
            ax.set_ylabel("mean over channels", fontsize=8)
            if row == 1:
                _epoch_axis(ax, epochs)
    axes[0][cols - 1].legend(fontsize=7, title="unit", bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return Plot(fig, data)


def sluice_figure(
    alphas: Mapping[str, Array],
    betas: Mapping[str, Array],
    beta_layers: Sequence[str],
    tasks: Sequence[str],
) -> Plot:
    """Sluice networks: every unit's ``(K S) x (K S)`` alpha as an annotated heat map (row:
    the receiving task subspace, column: the source) and every task's beta per layer."""
    plt = _plt()
    units = list(alphas)
    n = np.asarray(alphas[units[0]]).shape[0]
    s = n // len(tasks)
    labels = [f"{t}.{i}" for t in tasks for i in range(s)]
    cols = min(4, len(units) + 1)
    rows = (len(units) + 1 + cols - 1) // cols
    side = min(max(3.0, 0.42 * n + 1.2), 9.0)
    fig, axes = plt.subplots(
        rows, cols, figsize=(side * cols, side * rows), squeeze=False, layout="constrained"
    )
    flat = list(axes.flat)
    for ax in flat[len(units) + 1 :]:
        ax.axis("off")
    data: dict[str, Any] = {
        "units": units,
        "alpha": {},
        "beta": {},
        "beta_layers": list(beta_layers),
    }
    scale = max(float(np.abs(np.asarray(a)).max()) for a in alphas.values()) or 1.0
    image = None
    for ax, unit in zip(flat, units, strict=False):
        alpha = np.asarray(alphas[unit], dtype=np.float64)
        data["alpha"][unit] = alpha
        image = ax.imshow(alpha, cmap="RdBu_r", vmin=-scale, vmax=scale)
        if n <= 8:
            for i in range(n):
                for j in range(n):
                    ax.text(
                        j,
                        i,
                        f"{alpha[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if abs(alpha[i, j]) > 0.6 * scale else "black",
                    )
        ax.set_title(f"α at {unit}", fontsize=9)
        if n <= 32:
            ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(n), labels, fontsize=6)
        else:  # too many subspaces to name each: mark where each task's block starts
            ax.set_xticks(range(0, n, s), list(tasks), rotation=90, fontsize=5)
            ax.set_yticks(range(0, n, s), list(tasks), fontsize=5)
    if image is not None:
        fig.colorbar(image, ax=flat[: len(units)], shrink=0.5, label="α")
    ax = flat[len(units)]
    width = 0.8 / max(1, len(tasks))
    for i, (task, style) in enumerate(zip(tasks, _styles(len(tasks)), strict=True)):
        beta = np.asarray(betas[task], dtype=np.float64)
        data["beta"][task] = beta
        ax.bar(np.arange(beta.size) + i * width, beta, width, label=task, color=style["color"])
    ax.set_xticks(
        np.arange(len(beta_layers)) + width * (len(tasks) - 1) / 2,
        beta_layers,
        fontsize=7,
        rotation=30,
    )
    ax.set_title("β: what each head reads from each layer", fontsize=9)
    ax.set_ylabel("β")
    if len(tasks) <= LEGEND_INSIDE:
        ax.legend(fontsize=7)
    else:  # at the figure's right edge, which the constrained layout keeps free for it
        fig.legend(loc="outside right upper", fontsize=6, ncol=_legend_columns(len(tasks)))
    fig.suptitle(
        "sluice units: subspace mixing α (rows: receiving subspace, columns: source) and layer β",
        fontsize=10,
    )
    return Plot(fig, data)


def _display_image(image: Array) -> tuple[Array, str | None]:
    """An input sample ``(C, H, W)`` as something ``imshow`` shows: RGB scaled to [0, 1], or
    one channel with a grey colour map."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3 and image.shape[0] == 3:
        rgb = np.moveaxis(image, 0, -1)
        low, high = rgb.min(), rgb.max()
        return (rgb - low) / (high - low) if high > low else np.zeros_like(rgb), None
    grey = image.mean(axis=0) if image.ndim == 3 else image
    return grey, "gray"


def attention_figure(image: Array, masks: Mapping[str, Mapping[str, Array]], sample: int) -> Plot:
    """MTAN attention: the input, then for every task (rows) and stage (columns) the task's
    mask (mean over channels) laid over the input in grey, stretched to its size.

    Each panel's colours span that mask's own range, printed under it: after a short
    training the masks are close to uniform, and a common 0-1 scale would hide where they
    differ.
    """
    tasks = list(masks)
    stages = list(masks[tasks[0]])
    plt = _plt()
    fig, axes = plt.subplots(
        len(tasks),
        len(stages) + 1,
        figsize=(1.55 * (len(stages) + 1), 1.85 * len(tasks) + 0.7),
        squeeze=False,
    )
    shown, cmap = _display_image(image)
    grey = shown.mean(axis=-1) if shown.ndim == 3 else shown
    height, width = grey.shape[:2]
    data: dict[str, Any] = {"sample": sample, "masks": {}}
    for row, task in enumerate(tasks):
        axes[row][0].imshow(shown, cmap=cmap)
        axes[row][0].set_ylabel(task, fontsize=9)
        for col, stage in enumerate(stages, start=1):
            mask = np.asarray(masks[task][stage], dtype=np.float64)
            data["masks"].setdefault(task, {})[stage] = mask
            ax = axes[row][col]
            ax.imshow(grey, cmap="gray")
            low, high = float(mask.min()), float(mask.max())
            ax.imshow(
                mask,
                cmap="inferno",
                vmin=low,
                vmax=high if high > low else low + 1e-6,
                alpha=0.65,
                extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                interpolation="bilinear",
            )
            ax.set_xlabel(f"{low:.2f} to {high:.2f}", fontsize=7)
            if row == 0:
                ax.set_title(f"{stage}\n{mask.shape[0]}x{mask.shape[1]}", fontsize=7)
    axes[0][0].set_title("input", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"MTAN attention masks, validation sample {sample} (rows: tasks; columns: stages; "
        "mask mean over channels, dark = low, bright = high within the range under each panel)",
        fontsize=9,
    )
    fig.tight_layout()
    return Plot(fig, data)


def gate_figure(panels: Mapping[str, tuple[Mapping[str, Array], Sequence[str]]]) -> Plot:
    """Gate usage: per panel (a level of gates), the mean weight each task's gate gives
    each expert, as an annotated heat map.

    ``panels`` maps a title to ``({row name: per-sample weights (B, E)}, expert names)``.
    """
    most = max((len(gates) for gates, _ in panels.values()), default=1)
    fig, axes = _grid(len(panels), 2, (5.2, max(3.2, 0.24 * most + 1.2)))
    data: dict[str, Any] = {"mean": {}}
    for ax, (title, (gates, experts)) in zip(axes, panels.items(), strict=True):
        rows = list(gates)
        mean = np.array([np.asarray(gates[r], dtype=np.float64).mean(axis=0) for r in rows])
        data["mean"][title] = {r: mean[i] for i, r in enumerate(rows)}
        image = ax.imshow(mean, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for i in range(mean.shape[0]):
            for j in range(mean.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{mean[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if mean[i, j] > 0.6 else "black",
                )
        ax.set_xticks(range(len(experts)), experts, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlabel("expert")
        ax.set_ylabel("gate")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="mean gate weight")
    fig.tight_layout()
    return Plot(fig, data)


# -- grids --------------------------------------------------------------------------------


def delta_m_figure(
    cells: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float | None],
    *,
    higher_is_better: bool,
    unit: str,
    baseline: str,
    seeds: Mapping[str, Sequence[float]] | None = None,
) -> Plot:
    """Delta_m of every cell (mean over seeds, error bar: standard deviation; dots: the
    seeds), best first."""
    order = sorted(range(len(cells)), key=lambda i: mean[i] * (-1 if higher_is_better else 1))
    names = [cells[i] for i in order]
    values = np.array([mean[i] for i in order], dtype=np.float64)
    errors = np.array([_nan(std[i]) if std[i] is not None else 0.0 for i in order])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 0.42 * len(names) + 1.4))
    better = values > 0 if higher_is_better else values < 0
    colors = [
        "tab:grey" if abs(v) < 1e-12 else "tab:green" if b else "tab:red"
        for v, b in zip(values, better, strict=True)
    ]
    y = np.arange(len(names))
    ax.barh(y, values, xerr=np.nan_to_num(errors), color=colors, alpha=0.75, capsize=3)
    if seeds:
        for i, name in enumerate(names):
            points = list(seeds.get(name, []))
            ax.plot(points, [i] * len(points), "k.", ms=4)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel(
        f"Δm {unit} against {baseline} ({'higher' if higher_is_better else 'lower'} is better)"
    )
    ax.set_title("Δm per cell: mean ± std over seeds (green: better than the baseline)")
    fig.tight_layout()
    return Plot(fig, {"cells": names, "mean": values, "std": errors})


def pareto_front(points: Mapping[str, Sequence[float]]) -> list[str]:
    """The names whose points no other point dominates (higher is better in every
    coordinate; dominating means at least as good everywhere and better somewhere)."""
    front = []
    for name, p in points.items():
        dominated = any(
            all(a >= b for a, b in zip(q, p, strict=True))
            and any(a > b for a, b in zip(q, p, strict=True))
            for other, q in points.items()
            if other != name
        )
        if not dominated:
            front.append(name)
    return front


#: above this many cells the trade-off plot names only the Pareto front and the baseline
MAX_TRADEOFF_LABELS = 12


def _label_groups(
    xy_of: Mapping[str, tuple[float, float]], *, tolerance: float
) -> list[tuple[tuple[float, float], list[str]]]:
    """Group the names whose points lie within ``tolerance`` times the span of the points
    (origin included) of each other, in both coordinates; each group is labelled once, at
    its first point."""
    finite = {c: p for c, p in xy_of.items() if all(math.isfinite(v) for v in p)}
    if not finite:
        return []
    spans = []
    for i in (0, 1):
        values = [0.0, *(p[i] for p in finite.values())]
        spans.append(max(max(values) - min(values), 1e-12))
    groups: list[tuple[tuple[float, float], list[str]]] = []
    for name, (x, y) in finite.items():
        for anchor, names in groups:
            if (
                abs(x - anchor[0]) <= tolerance * spans[0]
                and abs(y - anchor[1]) <= tolerance * spans[1]
            ):
                names.append(name)
                break
        else:
            groups.append(((x, y), [name]))
    return groups


#: beyond this many tasks (more than 6 pairs) the trade-off figure is a heat map of each
#: cell's change on each task instead of a scatter panel per pair of tasks
MAX_TRADEOFF_TASKS = 4


def _tradeoff_heatmap(
    points: Mapping[str, Sequence[float]], tasks: Sequence[str], front: Sequence[str], baseline: str
) -> Plot:
    """The trade-off of many tasks: a cell per row, a task per column, the colour the change
    against the baseline (percent, symmetric around 0); the Pareto front's cells starred."""
    plt = _plt()
    cells = list(points)
    matrix = np.array([points[c] for c in cells], dtype=np.float64)
    finite = np.abs(matrix[np.isfinite(matrix)])
    scale = float(np.percentile(finite, 95)) if finite.size else 1.0
    fig, ax = plt.subplots(
        figsize=(min(0.32 * len(tasks) + 3.5, 18.0), 0.32 * len(cells) + 2.4), layout="constrained"
    )
    image = ax.imshow(matrix, cmap="RdYlGn", vmin=-(scale or 1.0), vmax=scale or 1.0, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(cells)), [f"★ {c}" if c in front else c for c in cells], fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"change vs {baseline} (%)")
    ax.set_title(
        f"per-task change against {baseline} ({len(tasks)} tasks; ★: Pareto front over all tasks)",
        fontsize=9,
    )
    return Plot(fig, {"tasks": list(tasks), "improvement": dict(points), "pareto": list(front)})


def tradeoff_figure(improvement: Mapping[str, Mapping[str, float]], baseline: str) -> Plot:
    """Each task's relative change against the baseline (percent, higher is better), one
    panel per pair of tasks; the cells on the Pareto front (over all tasks) are marked.
    Beyond :data:`MAX_TRADEOFF_TASKS` tasks, a heat map of cells by tasks instead."""
    cells = list(improvement)
    tasks = list(improvement[cells[0]])
    points = {c: [improvement[c][t] for t in tasks] for c in cells}
    finite = {c: p for c, p in points.items() if all(math.isfinite(v) for v in p)}
    front = pareto_front(finite)
    if len(tasks) > MAX_TRADEOFF_TASKS:
        return _tradeoff_heatmap(points, tasks, front, baseline)
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1 :]] or [(tasks[0], tasks[0])]
    fig, axes = _grid(len(pairs), 3, (6.4, 5.0) if len(pairs) == 1 else (4.8, 4.2))
    for ax, (a, b) in zip(axes, pairs, strict=True):
        ia, ib = tasks.index(a), tasks.index(b)
        xy_of = {c: (points[c][ia], points[c][ib]) for c in cells}
        for c in cells:
            on = c in front
            ax.scatter(
                *xy_of[c],
                s=90 if on else 30,
                marker="*" if on else "o",
                color="tab:orange" if on else "tab:blue",
                zorder=4 if on else 3,  # a front star is never hidden by a dot
            )
        # cells within 3 % of the axes' span of each other share one label (no overprinting);
        # beyond MAX_TRADEOFF_LABELS cells only the front and the baseline are named
        named = xy_of
        if len(cells) > MAX_TRADEOFF_LABELS:
            named = {c: xy for c, xy in xy_of.items() if c in front or c == baseline}
        for xy, names in _label_groups(named, tolerance=0.03):
            ax.annotate(", ".join(names), xy, fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.margins(0.18)
        if len(tasks) == 2 and front:
            line = sorted((points[c][ia], points[c][ib]) for c in front)
            ax.plot([p[0] for p in line], [p[1] for p in line], color="tab:orange", lw=1, ls="--")
        ax.axhline(0.0, color="grey", lw=0.7)
        ax.axvline(0.0, color="grey", lw=0.7)
        ax.set_xlabel(f"{a}: change vs {baseline} (%)")
        ax.set_ylabel(f"{b}: change vs {baseline} (%)")
    fig.suptitle(
        "per-task trade-off (up and right is better; orange stars: Pareto front over all tasks)"
        + (
            f"; {len(cells)} cells: only the front and {baseline} are labelled"
            if len(cells) > MAX_TRADEOFF_LABELS
            else ""
        ),
        fontsize=9,
    )
    fig.tight_layout()
    return Plot(fig, {"tasks": tasks, "improvement": points, "pareto": front})


def robustness_figure(
    groups: Mapping[str, Mapping[str, tuple[float, float | None]]],
    *,
    higher_is_better: bool,
    unit: str,
) -> Plot:
    """Delta_m of every architecture under each weighting scheme (mean ± std over seeds):
    the spread of an architecture's points is its sensitivity to the weighting."""
    archs = list(groups)
    balancers = sorted({b for g in groups.values() for b in g})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 * len(archs) + 3.0, 3.8))
    width = 0.7 / max(1, len(balancers))
    # one distinct colour per method: tab10 repeats beyond 10, tab20 beyond 20
    cmap = plt.get_cmap("tab10" if len(balancers) <= 10 else "tab20")
    colours = [cmap(i % cmap.N) for i in range(len(balancers))]
    data: dict[str, Any] = {"architectures": archs, "balancers": balancers, "delta_m": {}}
    for i, balancer in enumerate(balancers):
        xs, ys, es = [], [], []
        for j, arch in enumerate(archs):
            if balancer in groups[arch]:
                m, s = groups[arch][balancer]
                xs.append(j - 0.35 + width * (i + 0.5))
                ys.append(m)
                es.append(0.0 if s is None else s)
                data["delta_m"].setdefault(arch, {})[balancer] = (m, s)
        ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=balancer, color=colours[i])
    ax.set_xticks(range(len(archs)), archs)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_ylabel(f"Δm {unit} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title("robustness to the weighting scheme: Δm per architecture and balancer")
    ax.legend(fontsize=8, title="balancing", bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return Plot(fig, data)


def cost_figure(
    cells: Sequence[str],
    seconds: Sequence[float],
    std: Sequence[float | None],
    parameters: Sequence[int],
) -> Plot:
    """Training time of every cell (mean ± std over seeds), its parameter count beside."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 0.42 * len(cells) + 1.4))
    y = np.arange(len(cells))
    values = np.array(seconds, dtype=np.float64)
    errors = np.array([0.0 if s is None else s for s in std], dtype=np.float64)
    ax.barh(y, values, xerr=errors, color="tab:purple", alpha=0.7, capsize=3)
    for i, p in enumerate(parameters):
        ax.text(values[i] + errors[i], i, f"  {p:,} params", va="center", fontsize=7)
    ax.set_yticks(y, cells, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, float(np.nanmax(values + errors)) * 1.45 if len(values) else 1.0)
    ax.set_xlabel("training time per run (s), mean ± std over seeds")
    ax.set_title("training cost per cell")
    fig.tight_layout()
    return Plot(
        fig,
        {"cells": list(cells), "seconds": values, "std": errors, "parameters": list(parameters)},
    )
