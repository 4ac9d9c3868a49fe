"""The HTML report of one run directory (``report.html``).

It reads only the run directory: ``config.yaml``, ``results.json``, ``metrics.jsonl``
(losses, metrics, task weights, gradient diagnostics and the architecture's per-epoch
diagnostics) and ``inspection.npz`` (what the architecture showed on a few validation
samples at the end). The figure for an architecture is chosen by what it logged, so an
architecture of one's own that logs under the same names gets the same figures:

- ``alpha/<unit>`` (and per-epoch ``alpha_S`` / ``alpha_D``): cross-stitch units;
- ``alpha/<unit>`` with ``beta/<task>``: sluice units and layer betas;
- ``mask/<task>/<stage>``: attention masks laid over the input samples (MTAN);
- ``gate/<task>`` or ``gate/<level>/<task>`` (and ``shared_gate/<level>``): expert gates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..training.rundir import RunDirectory
from .figures import (
    Array,
    attention_figure,
    cosine_figure,
    cross_stitch_evolution_figure,
    cross_stitch_sorted_figure,
    curves_figure,
    gate_figure,
    grad_norm_figure,
    sluice_figure,
    weights_figure,
)
from .html import Section, draw, esc, page, table_html, write_page
from .run_report import class_rows, run_title
from .tables import format_value, results_columns

__all__ = ["ATTENTION_SAMPLES", "architecture_sections", "write_run_html"]

ATTENTION_SAMPLES = 2
"""Validation samples whose attention masks the report shows."""


def _results_html(results: Mapping[str, Any]) -> str:
    hib = results["higher_is_better"]
    auxiliary = results.get("auxiliary") or []
    columns = results_columns(hib, auxiliary)
    headers = ["split"] + [h for _, _, h in columns]
    rows: list[list[str]] = []
    dm = results.get("delta_m")
    if isinstance(dm, Mapping):
        arrow = "↑" if dm["higher_is_better"] else "↓"
        unit = " %" if dm["convention"] == "metric_mean" else ""
        headers.append(f"Δm{unit} ({dm['convention']}) {arrow}")
    for split in ("test", "val"):
        metrics = results[split]["metrics"]
        row = [split] + [format_value(metrics[t][k]) for t, k, _ in columns]
        if isinstance(dm, Mapping):
            row.append(
                format_value(dm["value"], decimals=2 if dm["convention"] == "metric_mean" else 4)
                if split == "test"
                else "-"
            )
        rows.append(row)
    sel = results["selection"]
    chosen = (
        f"epoch {sel['epoch'] + 1}"
        if "epoch" in sel
        else f"the mean over epochs {', '.join(str(e + 1) for e in sel['epochs'])}"
    )
    text = (
        f"<p>Model selection: {esc(sel['protocol'])} by validation {esc(sel['metric'])}; "
        f"reported: {esc(chosen)}. Training time {results['train_time_s']:.1f} s. "
        "↑: higher is better, ↓: lower is better.</p>"
    )
    if auxiliary:
        text += (
            "<p>Auxiliary tasks (aux: trained and shown, left out of model selection and "
            f"Δm): {esc(', '.join(auxiliary))}.</p>"
        )
    if isinstance(dm, Mapping):
        text += f'<p class="note">Δm baseline: {esc(dm["baseline_source"])}</p>'
    params = table_html(
        ["parameter group", "parameters"],
        [[k, f"{v:,}"] for k, v in results.get("parameters", {}).items()],
    )
    return text + table_html(headers, rows) + "<h3>Parameters</h3>" + params


def _split_keys(arrays: Mapping[str, Array], prefix: str) -> dict[str, Array]:
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def architecture_sections(
    arrays: Mapping[str, Array],
    meta: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    tasks: Sequence[str],
    *,
    strict: bool,
) -> list[str]:
    """The HTML blocks of the architecture's figures (empty when it logged nothing)."""
    blocks: list[str | None] = []
    where = (
        f"the {meta.get('split', 'val')} split's first {len(meta.get('samples', []))} samples, "
        f"weights of {meta.get('weights', 'the reported model')}"
    )
    alphas = _split_keys(arrays, "alpha/")
    betas = _split_keys(arrays, "beta/")
    if alphas and betas:
        layers: list[str] = []
        for r in reversed(records):
            found = (r.get("architecture") or {}).get("beta_layers")
            if found:
                layers = list(found)
                break
        if not layers:
            layers = [f"layer {i}" for i in range(len(next(iter(betas.values()))))]
        blocks.append(
            draw(
                lambda: sluice_figure(alphas, betas, layers, tasks),
                "Sluice units: each heat map is a unit's α (row: the receiving task subspace "
                "task.s, column: the source subspace; the diagonal is what a subspace keeps). "
                "Bars: β, how much each task's head reads from each layer. Weights of "
                f"{meta.get('weights', 'the reported model')}.",
                strict=strict,
            )
        )
    elif alphas:
        blocks.append(
            draw(
                lambda: cross_stitch_sorted_figure(alphas, tasks),
                "Cross-stitch units (Misra et al. 2016, Fig. 5): per unit, every learned "
                "α_S (what a task's column keeps of itself, initialised to α_S of `init`) and "
                "every α_D (what it takes from another column), sorted. α_D near 0 means the "
                "columns stay apart at that unit; α_D as large as α_S means they share. "
                f"Weights of {meta.get('weights', 'the reported model')}.",
                strict=strict,
            )
        )
        blocks.append(
            draw(
                lambda: cross_stitch_evolution_figure(records),
                "Cross-stitch units over training: per target task, α_S and α_D of every unit "
                "(mean over channels) at the end of each epoch, early units dark, late units "
                "light.",
                strict=strict,
            )
        )
    masks = _split_keys(arrays, "mask/")
    if masks and "input" in arrays:
        by_task: dict[str, dict[str, Array]] = {}
        for key, value in masks.items():
            task, _, stage = key.partition("/")
            by_task.setdefault(task, {})[stage] = value
        samples = min(ATTENTION_SAMPLES, arrays["input"].shape[0])
        for i in range(samples):
            blocks.append(
                draw(
                    lambda i=i: attention_figure(  # type: ignore[misc]
                        arrays["input"][i],
                        {t: {s: m[i] for s, m in st.items()} for t, st in by_task.items()},
                        int(meta.get("samples", list(range(samples)))[i]),
                    ),
                    "MTAN attention: each task's soft mask (mean over the mask's channels; "
                    "1 keeps the shared feature, 0 suppresses it) at every stage, stretched "
                    "over the input. Colours span each mask's own range (printed under it): "
                    "bright regions are those the task keeps most of; a narrow range means "
                    f"a nearly uniform mask. Sample {i} of {where}.",
                    strict=strict,
                )
            )
    gates = _split_keys(arrays, "gate/")
    if gates:
        blocks.append(
            draw(
                lambda: gate_figure(
                    _gate_panels(
                        gates, _split_keys(arrays, "shared_gate/"), arrays.get("gate_layout")
                    )
                ),
                "Expert gates: the mean weight each task's gate gives each expert (each row "
                "sums to 1). A task concentrating on its own expert(s) shares little; rows that "
                f"look alike mean the tasks use the experts alike. Over {where}.",
                strict=strict,
            )
        )
    return [b for b in blocks if b is not None]


def branching_blocks(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The branches and the widening decisions of an architecture that logs ``branches``
    and ``decisions`` in its diagnostics (FAFS), from the last epoch that has them."""
    logged = [r["architecture"] for r in records if isinstance(r.get("architecture"), Mapping)]
    last = next((a for a in reversed(logged) if "branches" in a and "decisions" in a), None)
    if last is None:
        return []
    layers = last["branches"]
    rows = [
        [f"layer {i}", len(groups), " ".join("{" + ", ".join(g) + "}" for g in groups)]
        for i, groups in reversed(list(enumerate(layers)))
    ]
    text = table_html(["layer (0: the bottom)", "branches", "tasks of each branch"], rows)
    decisions = []
    for d in last["decisions"]:
        children = " ".join("{" + ", ".join(c) + "}" for c in d["children"])
        groups = " ".join("{" + ", ".join(g) + "}" for g in d["groups"])
        criterion = ", ".join(f"{k}: {v:.4f}" for k, v in d["criterion"].items())
        decisions.append(
            f"<li>end of epoch {int(d['epoch']) + 1}, layer {d['layer']} "
            f"({d['samples']} samples): children {esc(children)} &rarr; {esc(groups)}; "
            f"criterion by number of branches {esc(criterion)}</li>"
        )
    return [
        "<p>Branches found by widening (the structure at the last epoch), and each "
        "round's decision: the children of the layer's branch, the groups they were split "
        "into, and the lowest criterion found for every number of branches.</p>"
        + text
        + "<ul>"
        + "".join(decisions)
        + "</ul>"
    ]


def _gate_panels(
    gates: Mapping[str, Array], shared: Mapping[str, Array], layout: Array | None
) -> dict[str, tuple[dict[str, Array], list[str]]]:
    """``gate/<task>`` (MMoE) or ``gate/<level>/<task>`` with ``shared_gate/<level>`` and
    ``gate_layout`` = ``(task experts, shared experts)`` (PLE), as heat-map panels."""
    panels: dict[str, tuple[dict[str, Array], list[str]]] = {}
    if not any("/" in k for k in gates):
        n = next(iter(gates.values())).shape[1]
        return {"task gates": (dict(gates), [f"expert {e}" for e in range(n)])}
    levels: dict[str, dict[str, Array]] = {}
    for key, value in gates.items():
        level, _, task = key.partition("/")
        levels.setdefault(level, {})[task] = value
    for level in sorted(levels, key=int):
        rows = levels[level]
        width = next(iter(rows.values())).shape[1]
        n_own = int(layout[0]) if layout is not None else width
        n_shared = width - n_own
        experts = [f"own {e}" for e in range(n_own)] + [f"shared {e}" for e in range(n_shared)]
        panels[f"level {level}: task gates"] = (dict(rows), experts)
        if level in shared:
            names = [f"{t} {e}" for t in rows for e in range(n_own)]
            names += [f"shared {e}" for e in range(n_shared)]
            panels[f"level {level}: shared gate"] = ({"shared": shared[level]}, names)
    return panels


def write_run_html(run: RunDirectory, *, strict: bool = False) -> Path:
    """Write ``report.html`` from what the run directory holds; returns its path.

    With ``strict`` a figure that cannot be drawn raises its error instead of being
    replaced by it.
    """
    results = run.read_results()
    records = run.read_metrics()
    config = run.read_config()
    inspection = run.read_inspection()
    model = config.get("model") or {}
    tasks = (
        list(results["tasks"])
        if results
        else list((records or [{}])[0].get("train", {}).get("loss", {}))
    )
    hib = results["higher_is_better"] if results else {}
    balancer = (config.get("balancer") or {}).get("name", "?")
    subtitle = (
        f"<p>Architecture <b>{esc(model.get('architecture', '?'))}</b> on backbone "
        f"{esc(model.get('backbone', '?'))}, balancing <b>{esc(balancer)}</b>, data "
        f"{esc((config.get('data') or {}).get('name', '?'))}; tasks {esc(', '.join(tasks))}; "
        f"seed {esc(config.get('seed', '?'))}; {len(records)} epoch(s) logged.</p>"
    )
    optim, train, data = (config.get(k) or {} for k in ("optim", "train", "data"))
    subtitle += (
        f"<p>Optimizer {esc(optim.get('name', '?'))}, learning rate {esc(optim.get('lr', '?'))}, "
        f"{esc(train.get('epochs', '?'))} epochs, batch size {esc(data.get('batch_size', '?'))}, "
        f"precision {esc(train.get('precision', '?'))}; the whole configuration is "
        '<a href="#configuration">below</a>.</p>'
    )
    sections: list[Section] = []
    if results is None:
        sections.append(
            Section("results", "Results", "<p>Training has not finished: no results yet.</p>")
        )
    else:
        sections.append(Section("results", "Results", _results_html(results)))
        per_class = class_rows(results)
        if per_class:
            body = "".join(
                f"<h3>Task {esc(task)}</h3>"
                + table_html(headers, rows)
                + f'<p class="note">{esc(note)}.</p>'
                for task, (headers, rows, note) in per_class.items()
            )
            sections.append(Section("per-class", "Per class", body))
    curves = draw(
        lambda: curves_figure(records, hib),
        "Per task: the mean unweighted training loss of each epoch and the validation loss "
        "after it; per metric: its validation value per epoch (and the test value in the "
        "epochs whose test results are averaged).",
        strict=strict,
    )
    sections.append(
        Section("curves", "Training curves", curves or "<p>No epoch has been logged yet.</p>")
    )
    weights = draw(
        lambda: weights_figure(records),
        "The mean weight the balancing method gave each task in each epoch.",
        strict=strict,
    )
    sections.append(
        Section(
            "task-weights",
            "Task weights",
            weights
            or f"<p>The balancing method ({esc(balancer)}) kept every task weight the same "
            "throughout training: nothing to draw.</p>",
        )
    )
    gradient_blocks = [
        draw(
            lambda: grad_norm_figure(records),
            "The norm of each task's gradient with respect to the shared parameters, averaged "
            "over the steps of each epoch. A task whose gradient is much larger dominates an "
            "unweighted sum.",
            strict=strict,
        ),
        draw(
            lambda: cosine_figure(records),
            "Task conflict: the cosine between two tasks' gradients, averaged over the steps "
            "of an epoch. Negative values mean the tasks pull the shared parameters in "
            "opposite directions (what gradient methods such as PCGrad or MGDA address).",
            strict=strict,
        ),
    ]
    present = [b for b in gradient_blocks if b is not None]
    sections.append(
        Section(
            "gradients",
            "Gradients and task conflict",
            "".join(present)
            or f"<p>The balancing method ({esc(balancer)}) does not compute per-task gradients, "
            "so no gradient norms or cosines were logged (gradient methods log them).</p>",
        )
    )
    blocks = (
        architecture_sections(inspection[0], inspection[1], records, tasks, strict=strict)
        if inspection is not None
        else []
    )
    blocks += branching_blocks(records)
    if not blocks:
        blocks.append(
            f"<p>Architecture {esc(model.get('architecture', '?'))} has no figures of its "
            "own (cross-stitch, sluice, MTAN, MMoE and PLE have).</p>"
        )
    sections.append(Section("architecture", "Architecture", "".join(blocks)))
    sections.append(
        Section(
            "configuration",
            "Configuration",
            f"<pre>{esc(yaml.safe_dump(config, sort_keys=False))}</pre>"
            f'<p class="note">Files: <a href="report.md">report.md</a>, '
            f'<a href="metrics.jsonl">metrics.jsonl</a>, <a href="config.yaml">config.yaml</a>'
            + (', <a href="results.json">results.json</a>' if results else "")
            + ".</p>",
        )
    )
    text = page(f"Run {run_title(run, config)}", subtitle, sections)
    return write_page(run.path / "report.html", text)
