"""Auxiliary tasks: gradient reversal, added tasks, and what auxiliary tasks are left out of."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from helpers import tiny_config_dict
from polytask.auxiliary import (
    HINT_FEATURES,
    WithTargets,
    add_targets,
    hint,
    reconstruction,
)
from polytask.config import load_config
from polytask.data.tensor import TensorMTLDataset
from polytask.errors import ConfigError
from polytask.evaluation import EvalResult
from polytask.metrics.delta_m import Baseline
from polytask.models import GradientReversal, ReversedHead, reverse_gradient
from polytask.models.reversal import ganin_factor
from polytask.training.build import build_components
from polytask.training.checkpoint import load_checkpoint
from polytask.training.rundir import RunDirectory
from polytask.training.trainer import Trainer

# -- gradient reversal -----------------------------------------------------------------------


def _grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_reversal_flips_exactly_the_shared_gradient(lam: float) -> None:
    """Against autograd without the layer: the shared layer's gradient of the auxiliary
    loss is -lambda times the plain one, the head's is unchanged, and a main task's gradient
    adds to it as it is."""
    torch.manual_seed(0)
    shared, aux_head, main_head = nn.Linear(5, 4), nn.Linear(4, 3), nn.Linear(4, 2)
    model = nn.ModuleDict({"shared": shared, "aux": aux_head, "main": main_head})
    x, y_aux, y_main = torch.randn(7, 5), torch.randn(7, 3), torch.randn(7, 2)

    def losses(reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tanh(shared(x))
        aux_in = reverse_gradient(z, lam) if reverse else z
        return (aux_head(aux_in) - y_aux).square().mean(), (main_head(z) - y_main).square().mean()

    plain_aux = _grads(model, losses(False)[0])
    reversed_aux = _grads(model, losses(True)[0])
    for name in ("shared.weight", "shared.bias"):
        torch.testing.assert_close(reversed_aux[name], -lam * plain_aux[name], rtol=0, atol=1e-7)
    for name in ("aux.weight", "aux.bias"):
        assert torch.equal(reversed_aux[name], plain_aux[name])
    plain_main = _grads(model, losses(False)[1])
    both = _grads(model, sum(losses(True)))
    for name in ("shared.weight", "shared.bias"):
        expected = plain_main[name] - lam * plain_aux[name]
        torch.testing.assert_close(both[name], expected, rtol=1e-6, atol=1e-7)
    # forward: the identity
    z = torch.randn(3, 4)
    assert torch.equal(reverse_gradient(z, lam), z)


def test_ganin_schedule_counts_training_steps() -> None:
    """lambda_p = lambda (2 / (1 + exp(-10 p)) - 1), p = steps / total; advance() counts a
    step, forward passes (however many per step) do not; the count is in the state dict."""
    layer = GradientReversal(2.0, schedule="ganin", total_steps=4)
    assert layer.factor() == 0.0
    x = torch.ones(2, requires_grad=True)
    for k in range(1, 7):
        layer(x)
        layer(x)  # a second forward pass in the same step (batch parts, look-aheads)
        layer.advance()
        p = min(k / 4, 1.0)
        assert layer.factor() == pytest.approx(2.0 * (2 / (1 + math.exp(-10 * p)) - 1), abs=1e-12)
    assert int(layer.steps) == 6
    # the gradient uses the factor of the forward pass that produced it
    fresh = GradientReversal(1.0, schedule="ganin", total_steps=10)
    assert fresh.factor() == 0.0  # read before loading: the load must not leave it stale
    fresh.load_state_dict({"steps": torch.tensor(5)})  # a resumed run goes on from step 5
    out = fresh(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(grad, torch.full_like(grad, -ganin_factor(0.5)))
    assert ganin_factor(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)


def test_reversal_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="lam"):
        GradientReversal(-1.0)
    with pytest.raises(ValueError, match="total_steps"):
        GradientReversal(1.0, schedule="ganin")


def _components(tmp_path: Path, **overrides: Any) -> Any:
    return build_components(load_config(tiny_config_dict(tmp_path, **overrides)))


def test_reversal_from_the_config_flips_the_task_gradient_on_the_shared_parameters(
    tmp_path: Path,
) -> None:
    """The same architecture built with and without ``reversal`` (same seed, so the same
    weights): the auxiliary task's gradient on the shared parameters is -lambda times the
    plain one, on its head it is the same."""
    plain = _components(tmp_path)
    reversed_ = _components(tmp_path, **{"task_settings": {"right": {"reversal": 0.7}}})
    head = reversed_.model.heads["right"]
    assert isinstance(head, ReversedHead) and head.reversal.lam == 0.7
    assert not isinstance(plain.model.heads["right"], ReversedHead)
    batch = next(iter(torch.utils.data.DataLoader(plain.bundle.train, batch_size=16)))

    def grads(c: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        c.model.train()
        pred = c.model(batch["input"])["right"]
        loss = c.tasks["right"].compute_loss(pred, batch["targets"]["right"])
        c.model.zero_grad()
        loss.backward()
        shared = [p.grad.clone() for p in c.model.shared_parameters()]
        own = [p.grad.clone() for p in c.model.task_parameters("right")]
        return shared, own

    plain_shared, plain_head = grads(plain)
    rev_shared, rev_head = grads(reversed_)
    assert len(plain_shared) == len(rev_shared) > 0
    scale = max(float(g.abs().max()) for g in plain_shared)
    assert scale > 1e-3
    # a convolution bias before BatchNorm has a gradient of zero up to float32 rounding
    # (~1e-6 of the largest entry), of either sign: an absolute floor
    for a, b in zip(plain_shared, rev_shared, strict=True):
        torch.testing.assert_close(b, -0.7 * a, rtol=1e-5, atol=1e-4 * scale)
    for a, b in zip(plain_head, rev_head, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("balancer", ["equal", "auto_lambda"])
def test_ganin_schedule_ramps_over_the_runs_training_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, balancer: str
) -> None:
    """total_steps is the run's optimizer steps, and training advances the schedule once per
    step: p ends at exactly 1, also under auto_lambda, whose step runs the model forward on
    two parts of the batch and again for its look-ahead and finite difference."""
    c = _components(
        tmp_path,
        **{
            "task_settings": {"right": {"reversal": 1.0, "reversal_schedule": "ganin"}},
            "train.epochs": 3,
            "balancer.name": balancer,
        },
    )
    # 256 training samples in batches of 32: 8 steps per epoch, 3 epochs
    reversal = c.model.heads["right"].reversal
    assert reversal.total_steps == 24
    import polytask.report

    monkeypatch.setattr(polytask.report, "write_run_report", lambda run: None)  # not tested here
    run = RunDirectory.create(tmp_path / "run", {"name": "t"})
    Trainer(c, run, console=False).fit()
    # the last checkpoint (the model in memory is the selected epoch's at the end)
    last = load_checkpoint(run.last_checkpoint)["model"]
    assert int(last["heads.right.reversal.steps"]) == 24
    reversal.load_state_dict({"steps": last["heads.right.reversal.steps"]})
    assert reversal.factor() == pytest.approx(ganin_factor(1.0), abs=1e-12)


# -- added tasks -----------------------------------------------------------------------------


def test_reconstruction_targets_are_the_inputs() -> None:
    added = reconstruction(name="recon", input_shape=(1, 4, 4))
    assert added.task.auxiliary and added.task.head == "decoder"
    assert added.task.output_dim == 16 and added.task.extra["target_shape"] == [1, 4, 4]
    inputs = torch.rand(5, 1, 4, 4)
    assert torch.equal(added.targets(inputs), inputs)
    assert added.targets(torch.ones(2, 3, dtype=torch.uint8)).dtype == torch.float32


def test_pooled_hint_against_a_naive_mean_over_blocks() -> None:
    torch.manual_seed(0)
    inputs = torch.rand(3, 2, 6, 6)
    added = hint(name="h", input_shape=(2, 6, 6), feature="pooled", size=3)
    assert added.task.output_dim == 2 * 3 * 3
    got = added.targets(inputs).view(3, 2, 3, 3)
    for n in range(3):
        for c in range(2):
            for i in range(3):
                for j in range(3):
                    block = inputs[n, c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
                    assert got[n, c, i, j].item() == pytest.approx(block.mean().item(), abs=1e-6)
    mean = hint(name="m", input_shape=(2, 6, 6), feature="mean")
    torch.testing.assert_close(mean.targets(inputs)[:, 0], inputs.mean(dim=(1, 2, 3)))
    cols = hint(name="c", input_shape=(5,), feature="columns", columns=[4, 1])
    flat = torch.randn(3, 5)
    assert torch.equal(cols.targets(flat), flat[:, [4, 1]])
    assert set(HINT_FEATURES) >= {"mean", "pooled", "columns"}


def test_hint_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="image inputs"):
        hint(name="h", input_shape=(10,), feature="pooled")
    with pytest.raises(ConfigError, match="columns"):
        hint(name="h", input_shape=(4,), feature="columns", columns=[4])
    with pytest.raises(ConfigError, match="unknown feature"):
        hint(name="h", input_shape=(4,), feature="median")


class _Plain(Dataset[dict[str, Any]]):
    """A data set that is not a TensorMTLDataset, with a mask."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "input": self.inputs[i],
            "targets": {"a": torch.tensor(i)},
            "mask": {"a": torch.tensor(i % 2 == 0)},
        }


def test_added_targets_per_sample_equal_the_vectorised_ones() -> None:
    inputs = torch.rand(6, 1, 4, 4)
    fn = hint(name="h", input_shape=(1, 4, 4), size=2).targets
    whole = add_targets(TensorMTLDataset(inputs, {"a": torch.arange(6)}), {"h": fn})
    assert isinstance(whole, TensorMTLDataset) and set(whole.targets) == {"a", "h"}
    each = add_targets(_Plain(inputs), {"h": fn})
    assert isinstance(each, WithTargets) and len(each) == 6
    for i in range(6):
        assert torch.allclose(each[i]["targets"]["h"], whole[i]["targets"]["h"])
        assert each[i]["mask"]["h"].item() is True
        assert each[i]["mask"]["a"].item() == (i % 2 == 0)


def test_added_tasks_join_the_run(tmp_path: Path) -> None:
    c = _components(
        tmp_path,
        **{"task_settings": {"recon": {"add": "reconstruction"}, "blur": {"add": "hint"}}},
    )
    assert list(c.tasks) == ["left", "right", "recon", "blur"]
    assert [t for t, task in c.tasks.items() if task.auxiliary] == ["recon", "blur"]
    sample = c.bundle.train[0]
    assert torch.equal(sample["targets"]["recon"], sample["input"])
    pred = c.model(sample["input"].unsqueeze(0))
    assert pred["recon"].shape == (1, *c.bundle.input_shape)
    assert c.bundle.val is not c.bundle.train


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"lefty": {"auxiliary": True}}, "no task 'lefty'"),
        ({"left": {"add": "reconstruction"}}, "already has a task"),
        ({"left": {"auxiliary": True}, "right": {"auxiliary": True}}, "every task is auxiliary"),
        ({"x": {"add": "autoencoder"}}, "unknown auxiliary task"),
        ({"x": {"add": "hint", "options": {"sizes": 2}}}, "task_settings.x.options"),
        ({"left": {"options": {"loss": "l1"}}}, "options are for added tasks"),
        ({"left": {"head": "nohead"}}, "unknown head"),
        (
            {"left": {"head": "mlp", "head_options": {"hiden": 8}}},
            "task_settings.left.head_options",
        ),
        ({"recon": {"add": "reconstruction", "head_options": {"hidden": 0}}}, "hidden"),
        ({"left": {"reversal": -1.0}}, "task_settings.left.reversal"),
    ],
)
def test_task_settings_errors(tmp_path: Path, settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _components(tmp_path, task_settings=settings)


def test_selection_on_an_auxiliary_task_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auxiliary"):
        _components(
            tmp_path,
            **{
                "task_settings": {"right": {"auxiliary": True}},
                "train.selection": {"metric": "right.accuracy"},
            },
        )


# -- left out of model selection and Delta_m -------------------------------------------------

#: validation losses per epoch: counting `right` would choose epoch 3 (sum 1.0), `left` alone
#: chooses epoch 2 (0.8)
VAL_LOSSES = [{"left": 1.0, "right": 1.0}, {"left": 0.8, "right": 3.0}, {"left": 0.9, "right": 0.1}]
#: test accuracies against a baseline of 50 / 50: Delta_m (metric_mean) is -20 % over left
#: alone and +20 % with right counted
TEST_METRICS = {"left": {"accuracy": 60.0}, "right": {"accuracy": 20.0}}


@pytest.mark.parametrize("auxiliary", [True, False])
def test_auxiliary_task_changes_neither_selection_nor_delta_m(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auxiliary: bool
) -> None:
    baseline = Baseline(
        values={"left": {"accuracy": 50.0}, "right": {"accuracy": 50.0}},
        higher_is_better={"left": {"accuracy": True}, "right": {"accuracy": True}},
        source="test numbers",
    )
    baseline.save(tmp_path / "baseline.json")
    settings = {"right": {"auxiliary": True}} if auxiliary else {}
    config = load_config(
        tiny_config_dict(
            tmp_path / "runs",
            **{
                "task_settings": settings,
                "train.epochs": 3,
                "data.options.n_train": 64,
                "eval.baseline": str(tmp_path / "baseline.json"),
            },
        )
    )

    def evaluate(self: Trainer, split: str) -> EvalResult:
        """Crafted validation results per epoch; the test split's once training is done."""
        epoch = self.state.epoch
        if split == "val" and epoch < len(VAL_LOSSES):
            losses = VAL_LOSSES[epoch]
            return EvalResult(metrics={t: {"accuracy": 50.0} for t in losses}, losses=losses)
        return EvalResult(metrics=TEST_METRICS, losses={"left": 1.0, "right": 1.0})

    monkeypatch.setattr(Trainer, "_evaluate", evaluate)
    import polytask.report

    monkeypatch.setattr(polytask.report, "write_run_report", lambda run: None)  # not tested here
    components = build_components(config)
    run = RunDirectory.create(tmp_path / "run", {"name": "t"})
    results = Trainer(components, run, console=False).fit()
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["auxiliary"] == (["right"] if auxiliary else [])
    if auxiliary:
        assert results["selection"]["epoch"] == 1
        assert results["delta_m"]["value"] == pytest.approx(-20.0)
    else:  # the same run with right counted: the test would fail if auxiliary were ignored
        assert results["selection"]["epoch"] == 2
        assert results["delta_m"]["value"] == pytest.approx(20.0)


def test_baseline_only_keeps_the_tasks_that_count() -> None:
    baseline = Baseline(
        values={"a": {"x": 1.0}, "b": {"x": 2.0}},
        higher_is_better={"a": {"x": True}, "b": {"x": False}},
        source="s",
    )
    assert baseline.only(["a", "b"]) is baseline
    assert baseline.only(["a"]).values == {"a": {"x": 1.0}}
    with pytest.raises(ConfigError, match="none of the tasks that count"):
        baseline.only(["c"])


def test_decoder_heads_predict_the_targets_shape() -> None:
    from polytask.models import conv_decoder_head, decoder_head

    task = reconstruction(name="recon", input_shape=(3, 8, 6)).task
    flat = decoder_head(task, 10, hidden=4)
    assert flat(torch.randn(2, 10)).shape == (2, 3, 8, 6)
    maps = conv_decoder_head(task, 5, hidden=4)
    assert maps(torch.randn(2, 5, 4, 3)).shape == (2, 3, 8, 6)  # resized to 8 x 6
    with pytest.raises(ConfigError, match="image target"):
        conv_decoder_head(reconstruction(name="r", input_shape=(7,)).task, 5)


def test_grid_tasks_are_every_runs_and_auxiliary_if_any_run_says_so() -> None:
    from polytask.compare import grid_tasks

    hib = {"left": {"accuracy": True}, "right": {"accuracy": True}}
    runs = {
        "a": [{"higher_is_better": hib, "auxiliary": []}],
        "b": [{"higher_is_better": {**hib, "recon": {"mae": False}}, "auxiliary": ["recon"]}],
        "c": [{"higher_is_better": hib, "auxiliary": ["right"]}],
        "old": [{"higher_is_better": hib}],  # written before results named auxiliary tasks
    }
    tasks, auxiliary = grid_tasks(runs)
    assert list(tasks) == ["left", "right", "recon"]
    assert auxiliary == ["recon", "right"]
