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
    ax.set_xlabel("epoch")
    if len(epochs) <= 12:
        ax.set_xticks(list(epochs))


# -- runs ---------------------------------------------------------------------------------


def curves_figure(
    records: Sequence[Mapping[str, Any]], higher_is_better: Mapping[str, Mapping[str, bool]]
) -> Plot | None:
    """Per task, the training and validation loss per epoch; per metric value, the
    validation (and, where recorded, test) value per epoch, its direction in the title."""
    if not records:
        return None
    epochs = _epochs(records)
    tasks = list(records[0]["train"]["loss"])
    values = [(t, k) for t in tasks for k in records[0]["val"]["metrics"].get(t, {})]
    fig, axes = _grid(len(tasks) + len(values), 3, (4.2, 3.1))
    data: dict[str, Any] = {"epochs": epochs, "train_loss": {}, "val_loss": {}, "val": {}}
    data["test"] = {}
    for ax, t in zip(axes, tasks, strict=False):
        train = [_nan(r["train"]["loss"][t]) for r in records]
        val = [_nan(r["val"]["losses"].get(t)) for r in records]
        data["train_loss"][t], data["val_loss"][t] = train, val
        ax.plot(epochs, train, marker="o", ms=3, label="train")
        ax.plot(epochs, val, marker="s", ms=3, ls="--", label="val")
        ax.set_title(f"{t}: loss (lower is better)")
        ax.set_ylabel("mean unweighted loss")
        _epoch_axis(ax, epochs)
        ax.legend(fontsize=8)
    for ax, (t, k) in zip(axes[len(tasks) :], values, strict=True):
        val = [_nan(r["val"]["metrics"][t][k]) for r in records]
        data["val"][f"{t}.{k}"] = val
        ax.plot(epochs, val, marker="o", ms=3, label="val")
        tested = [r for r in records if "test" in r]
        if tested:
            test = [_nan(r["test"]["metrics"][t][k]) for r in tested]
            data["test"][f"{t}.{k}"] = test
            ax.plot(_epochs(tested), test, marker="s", ms=3, ls="--", label="test")
        hib = higher_is_better.get(t, {}).get(k)
        direction = "" if hib is None else " (higher is better)" if hib else " (lower is better)"
        ax.set_title(f"{t}: {k}{direction}")
        ax.set_ylabel(k)
        _epoch_axis(ax, epochs)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return Plot(fig, data)


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
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for t in tasks:
        ax.plot(epochs, weights[t], marker="o", ms=3, label=t)
    ax.set_title("task weight chosen by the balancing method")
    ax.set_ylabel("mean weight over the epoch's steps")
    _epoch_axis(ax, epochs)
    ax.legend(fontsize=8)
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
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for t in tasks:
        ax.plot(epochs, norms[t], marker="o", ms=3, label=t)
    if all(v > 0 for vs in norms.values() for v in vs if math.isfinite(v)):
        ax.set_yscale("log")
    ax.set_title("per-task gradient norm (shared part)")
    ax.set_ylabel("mean ||g_k|| over the epoch's steps")
    _epoch_axis(ax, epochs)
    ax.legend(fontsize=8)
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 3.9))
    image = left.imshow(matrix, cmap="RdBu", vmin=-1, vmax=1)
    left.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    left.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
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
    for name, values in pairs.items():
        right.plot(epochs, values, marker="o", ms=3, label=name)
    right.axhline(0.0, color="grey", lw=0.8)
    right.set_ylim(-1.05, 1.05)
    right.set_title("gradient cosine per pair of tasks")
    right.set_ylabel("mean cosine over the epoch's steps")
    _epoch_axis(right, epochs)
    right.legend(fontsize=8)
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
    fig, axes = plt.subplots(
        2, len(tasks), figsize=(3.6 * len(tasks) + 1.4, 5.6), squeeze=False, sharex=True
    )
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(units)))
    data: dict[str, Any] = {"epochs": epochs, "alpha_S": {}, "alpha_D": {}}
    for row, key in enumerate(("alpha_S", "alpha_D")):
        for col, task in enumerate(tasks):
            ax = axes[row][col]
            for color, unit in zip(colors, units, strict=True):
                values = [_nan(r["architecture"][key][unit][task]) for r in logged]
                data[key].setdefault(unit, {})[task] = values
                ax.plot(epochs, values, color=color, marker="o", ms=2, label=unit)
            what = "kept from its own column" if key == "alpha_S" else "taken from the others"
            ax.set_title(f"{task}: {key.replace('alpha', 'α')} ({what})", fontsize=9)
            ax.set_ylabel("mean over channels", fontsize=8)
            if row == 1:
                _epoch_axis(ax, epochs)
    axes[0][-1].legend(fontsize=7, title="unit", bbox_to_anchor=(1.02, 1), loc="upper left")
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
    side = max(3.0, 0.42 * n + 1.2)
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
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
    if image is not None:
        fig.colorbar(image, ax=flat[: len(units)], shrink=0.5, label="α")
    ax = flat[len(units)]
    width = 0.8 / max(1, len(tasks))
    for i, task in enumerate(tasks):
        beta = np.asarray(betas[task], dtype=np.float64)
        data["beta"][task] = beta
        ax.bar(np.arange(beta.size) + i * width, beta, width, label=task)
    ax.set_xticks(
        np.arange(len(beta_layers)) + width * (len(tasks) - 1) / 2,
        beta_layers,
        fontsize=7,
        rotation=30,
    )
    ax.set_title("β: what each head reads from each layer", fontsize=9)
    ax.set_ylabel("β")
    ax.legend(fontsize=7)
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
    fig, axes = _grid(len(panels), 2, (5.2, 3.2))
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


def tradeoff_figure(improvement: Mapping[str, Mapping[str, float]], baseline: str) -> Plot:
    """Each task's relative change against the baseline (percent, higher is better), one
    panel per pair of tasks; the cells on the Pareto front (over all tasks) are marked."""
    cells = list(improvement)
    tasks = list(improvement[cells[0]])
    points = {c: [improvement[c][t] for t in tasks] for c in cells}
    finite = {c: p for c, p in points.items() if all(math.isfinite(v) for v in p)}
    front = pareto_front(finite)
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
