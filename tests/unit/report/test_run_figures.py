"""Every figure of the run report, on tiny runs: what a figure draws is what the run logged.

Each architecture's figure is checked against the model itself: the weights of the
checkpoint the report names are loaded into a freshly built model, and the model's own
numbers (alphas, betas, attention masks, gate weights) must equal what the figure plotted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import polytask
from polytask.config import load_config
from polytask.report import figures
from polytask.report.run_html import architecture_sections, write_run_html
from polytask.training.build import build_components
from polytask.training.checkpoint import load_checkpoint
from polytask.training.rundir import RunDirectory
from polytask.training.trainer import INSPECTION_SAMPLES

ROOT = Path(__file__).resolve().parents[3]
MULTIDIGITS = ROOT / "configs" / "multidigits.yaml"
SCENES = ROOT / "configs" / "scenes" / "mtan-paper-cpu.yaml"

DIGITS = [
    "train.epochs=2",
    "train.progress=false",
    "data.options.n_train=64",
    "data.options.n_val=32",
    "data.options.n_test=32",
    "data.batch_size=16",
    "model.backbone_options.channels=[8,8]",
    "model.backbone_options.out_features=16",
]
#: SegNet at 1/16 width on 32 x 32 rendered rooms: a staged backbone in a second or two
ROOMS = [
    "train.epochs=2",
    "data.options.n_train=8",
    "data.options.n_val=4",
    "data.options.n_test=4",
    "data.options.height=32",
    "data.options.width=32",
    "data.batch_size=4",
    "model.backbone_options.width=0.0625",
    "train.selection={protocol: best, metric: loss}",
]
RUNS: dict[str, tuple[Path, list[str]]] = {
    "hps_pcgrad": (MULTIDIGITS, [*DIGITS, "balancer.name=pcgrad"]),
    "hps_equal": (MULTIDIGITS, DIGITS),
    "mmoe_uw": (MULTIDIGITS, [*DIGITS, "model.architecture=mmoe", "balancer.name=uncertainty"]),
    "ple": (MULTIDIGITS, [*DIGITS, "model.architecture=ple", "model.options.num_levels=2"]),
    "cross_stitch": (SCENES, [*ROOMS, "model.architecture=cross_stitch"]),
    "sluice": (SCENES, [*ROOMS, "model.architecture=sluice"]),
    "mtan": (SCENES, [*ROOMS, "model.architecture=mtan"]),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunDirectory]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (recipe, overrides) in RUNS.items():
        run, _ = polytask.train(recipe, overrides, run_dir=root / name, console=False)
        out[name] = run
    return out


def reported_model(run: RunDirectory) -> Any:
    """The run's model with the weights its results report (selection best: best.pt)."""
    components = build_components(load_config(run.config_path))
    model = components.model
    model.load_state_dict(load_checkpoint(run.best_checkpoint)["model"])
    model.eval()
    return model


def inspection(run: RunDirectory) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
    found = run.read_inspection()
    assert found is not None, f"{run.path} has no inspection.npz"
    return found


def close_all(plot: figures.Plot | None) -> None:
    import matplotlib.pyplot as plt

    if plot is not None:
        plt.close(plot.figure)


# -- curves, weights, gradients ---------------------------------------------------------------


def test_curves_plot_the_logged_losses_and_metrics(runs: dict[str, RunDirectory]) -> None:
    run = runs["hps_equal"]
    records = run.read_metrics()
    results = run.read_results()
    assert results is not None
    plot = figures.curves_figure(records, results["higher_is_better"])
    assert plot is not None
    close_all(plot)
    assert plot.data["epochs"] == [1, 2]
    for task in ("left", "right"):
        assert plot.data["train_loss"][task] == [r["train"]["loss"][task] for r in records]
        assert plot.data["val_loss"][task] == [r["val"]["losses"][task] for r in records]
        assert plot.data["val"][f"{task}.accuracy"] == [
            r["val"]["metrics"][task]["accuracy"] for r in records
        ]


def test_equal_weighting_draws_no_weight_panel_and_no_gradients(
    runs: dict[str, RunDirectory],
) -> None:
    records = runs["hps_equal"].read_metrics()
    assert all(r["train"]["weight"] == {"left": 1.0, "right": 1.0} for r in records)
    assert figures.weights_figure(records) is None
    assert figures.grad_norm_figure(records) is None
    assert figures.cosine_figure(records) is None
    page = write_run_html(runs["hps_equal"], strict=True).read_text(encoding="utf-8")
    assert "kept every task weight the same" in page
    assert "does not compute per-task gradients" in page


def test_changing_weights_are_drawn_as_logged(runs: dict[str, RunDirectory]) -> None:
    records = runs["mmoe_uw"].read_metrics()
    plot = figures.weights_figure(records)
    assert plot is not None
    close_all(plot)
    for task in ("left", "right"):
        assert plot.data["weight"][task] == [r["train"]["weight"][task] for r in records]


def test_gradient_norms_and_cosines_are_drawn_as_logged(runs: dict[str, RunDirectory]) -> None:
    records = runs["hps_pcgrad"].read_metrics()
    assert all(r["balancing"] is not None for r in records)
    norms = figures.grad_norm_figure(records)
    cosine = figures.cosine_figure(records)
    assert norms is not None and cosine is not None
    close_all(norms)
    close_all(cosine)
    for task in ("left", "right"):
        assert norms.data["grad_norm"][task] == [r["balancing"]["grad_norm"][task] for r in records]
    last = records[-1]["balancing"]["cosine"]
    np.testing.assert_array_equal(
        cosine.data["matrix"], [[last[a][b] for b in ("left", "right")] for a in ("left", "right")]
    )
    assert cosine.data["pairs"]["left / right"] == [
        r["balancing"]["cosine"]["left"]["right"] for r in records
    ]
    assert all(-1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in cosine.data["pairs"]["left / right"])


# -- architectures ------------------------------------------------------------------------------


def test_cross_stitch_sorted_alphas_are_the_checkpoint_alphas(
    runs: dict[str, RunDirectory],
) -> None:
    run = runs["cross_stitch"]
    arrays, meta = inspection(run)
    assert meta["weights"].endswith("(best.pt)")
    model = reported_model(run)
    alphas = {k[len("alpha/") :]: v for k, v in arrays.items() if k.startswith("alpha/")}
    assert list(alphas) == list(model.unit_names)
    plot = figures.cross_stitch_sorted_figure(alphas, model.task_names)
    close_all(plot)
    for unit, alpha in model.alphas().items():
        alpha = alpha.double().numpy()  # K x K x C
        k = alpha.shape[0]
        same = np.sort(np.concatenate([alpha[t, t] for t in range(k)]))
        other = np.sort(np.concatenate([alpha[t, s] for t in range(k) for s in range(k) if s != t]))
        np.testing.assert_allclose(plot.data["alpha_S"][unit], same, rtol=0, atol=1e-7)
        np.testing.assert_allclose(plot.data["alpha_D"][unit], other, rtol=0, atol=1e-7)
    assert not np.allclose(plot.data["alpha_S"]["encoder.0"], 0.9)  # the units did learn


def test_cross_stitch_evolution_ends_at_the_last_checkpoint(runs: dict[str, RunDirectory]) -> None:
    run = runs["cross_stitch"]
    records = run.read_metrics()
    plot = figures.cross_stitch_evolution_figure(records)
    assert plot is not None
    close_all(plot)
    units = load_checkpoint(run.last_checkpoint)["model"]
    model = reported_model(run)
    for i, unit in enumerate(model.unit_names):
        alpha = units[f"units.{i}.alpha"].double()
        per_pair = alpha.mean(-1)
        for t, task in enumerate(model.task_names):
            same = float(per_pair[t, t])
            other = float(per_pair[t].sum() - per_pair[t, t])
            assert plot.data["alpha_S"][unit][task][-1] == pytest.approx(same, abs=1e-9)
            assert plot.data["alpha_D"][unit][task][-1] == pytest.approx(other, abs=1e-9)
            assert len(plot.data["alpha_S"][unit][task]) == len(records)


def test_sluice_alphas_and_betas_are_the_checkpoint_ones(runs: dict[str, RunDirectory]) -> None:
    run = runs["sluice"]
    arrays, meta = inspection(run)
    model = reported_model(run)
    sections = architecture_sections(
        arrays, meta, run.read_metrics(), model.task_names, strict=True
    )
    assert len(sections) == 1 and "Sluice units" in sections[0]
    alphas = {k[len("alpha/") :]: v for k, v in arrays.items() if k.startswith("alpha/")}
    betas = {k[len("beta/") :]: v for k, v in arrays.items() if k.startswith("beta/")}
    plot = figures.sluice_figure(alphas, betas, model.beta_names, model.task_names)
    close_all(plot)
    for unit, alpha in model.alphas().items():
        np.testing.assert_allclose(plot.data["alpha"][unit], alpha.double().numpy(), atol=1e-7)
    for task, beta in model.betas().items():
        np.testing.assert_allclose(plot.data["beta"][task], beta.double().numpy(), atol=1e-7)
    last = run.read_metrics()[-1]["architecture"]
    assert last["beta_layers"] == list(model.beta_names)


def test_mtan_masks_are_the_models_masks_on_the_stored_samples(
    runs: dict[str, RunDirectory],
) -> None:
    run = runs["mtan"]
    arrays, meta = inspection(run)
    assert meta["samples"] == list(range(4))  # the validation split has 4 samples
    components = build_components(load_config(run.config_path))
    model = components.model
    model.load_state_dict(load_checkpoint(run.best_checkpoint)["model"])
    model.eval()
    inputs = torch.stack([components.bundle.val[i]["input"] for i in meta["samples"]])
    np.testing.assert_array_equal(arrays["input"], inputs.numpy())
    expected = model.inspect(inputs)
    stages = list(model.stage_names)
    plot = figures.attention_figure(
        arrays["input"][1],
        {t: {s: arrays[f"mask/{t}/{s}"][1] for s in stages} for t in model.task_names},
        sample=1,
    )
    close_all(plot)
    assert list(plot.data["masks"]) == list(model.task_names)
    for task in model.task_names:
        assert list(plot.data["masks"][task]) == stages
        for stage in stages:
            mask = expected[f"mask/{task}/{stage}"][1].double().numpy()
            np.testing.assert_allclose(plot.data["masks"][task][stage], mask, atol=1e-6)
            assert ((mask > 0) & (mask < 1)).all()
    assert plot.data["masks"]["semantic"]["encoder.0"].shape == (32, 32)
    assert plot.data["masks"]["semantic"]["encoder.4"].shape == (2, 2)


def test_mmoe_gate_usage_is_the_models_mean_gate_weight(runs: dict[str, RunDirectory]) -> None:
    run = runs["mmoe_uw"]
    arrays, meta = inspection(run)
    assert len(meta["samples"]) == INSPECTION_SAMPLES
    model = reported_model(run)
    inputs = torch.from_numpy(arrays["input"])
    gates = {t: arrays[f"gate/{t}"] for t in model.task_names}
    plot = figures.gate_figure({"task gates": (gates, ["a", "b", "c", "d"])})
    close_all(plot)
    for task in model.task_names:
        expected = model.gate_weights(inputs, task).mean(0).double().detach().numpy()
        np.testing.assert_allclose(plot.data["mean"]["task gates"][task], expected, atol=1e-6)
        assert math.isclose(float(plot.data["mean"]["task gates"][task].sum()), 1.0, rel_tol=1e-5)


def test_ple_gates_are_drawn_per_level_with_named_experts(runs: dict[str, RunDirectory]) -> None:
    run = runs["ple"]
    arrays, meta = inspection(run)
    np.testing.assert_array_equal(arrays["gate_layout"], [1, 2])  # PLE's defaults
    sections = architecture_sections(arrays, meta, [], ["left", "right"], strict=True)
    assert len(sections) == 1 and "Expert gates" in sections[0]
    from polytask.report.run_html import _gate_panels

    panels = _gate_panels(
        {k[5:]: v for k, v in arrays.items() if k.startswith("gate/")},
        {k[12:]: v for k, v in arrays.items() if k.startswith("shared_gate/")},
        arrays["gate_layout"],
    )
    assert list(panels) == ["level 0: task gates", "level 0: shared gate", "level 1: task gates"]
    assert panels["level 1: task gates"][1] == ["own 0", "shared 0", "shared 1"]
    assert panels["level 0: shared gate"][1] == ["left 0", "right 0", "shared 0", "shared 1"]


def test_architectures_without_hooks_have_no_inspection(runs: dict[str, RunDirectory]) -> None:
    assert runs["hps_equal"].read_inspection() is None
    assert all(r["architecture"] is None for r in runs["hps_equal"].read_metrics())
    page = write_run_html(runs["hps_equal"], strict=True).read_text(encoding="utf-8")
    assert "has no figures of its own" in page


# -- robustness of the report ---------------------------------------------------------------------


def test_a_figure_that_fails_is_reported_in_its_place(
    runs: dict[str, RunDirectory], monkeypatch: pytest.MonkeyPatch
) -> None:
    import polytask.report.run_html as run_html

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("no <curves> today")

    monkeypatch.setattr(run_html, "curves_figure", broken)
    page = write_run_html(runs["hps_equal"]).read_text(encoding="utf-8")
    assert '<div class="figure-error">' in page
    assert "ValueError: no &lt;curves&gt; today" in page
    with pytest.raises(ValueError, match="no <curves> today"):
        write_run_html(runs["hps_equal"], strict=True)


def test_every_run_report_renders_strictly(runs: dict[str, RunDirectory]) -> None:
    for name, run in runs.items():
        page = write_run_html(run, strict=True).read_text(encoding="utf-8")
        assert 'class="figure-error"' not in page, name
        assert page.count("<img ") >= 1, name
