"""The multi-label recipe from the command line: Yeast's 14 labels as 14 binary tasks (or one
14-output task), trained, evaluated and reported; a gradient method's cost stated up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sklearn.metrics import f1_score, roc_auc_score

import polytask.report
from helpers import cli
from polytask.data.yeast import LABELS

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "tabular" / "yeast.yaml"
FAST = ["train.epochs=2", "data.batch_size=512"]


def _run_dir(out: str) -> Path:
    line = next(line for line in out.splitlines() if line.startswith("run directory:"))
    return Path(line.split(":", 1)[1].strip())


def test_yeast_recipe_trains_every_label_and_evaluates_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(polytask.report, "write_run_report", lambda run: None)
    code, out, err = cli(capsys, "train", RECIPE, f"output_dir={tmp_path}", *FAST)
    assert code == 0, err
    run = _run_dir(out)
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    test = results["test"]["metrics"]
    assert list(test) == list(LABELS)
    for values in test.values():
        assert set(values) == {"f1", "roc_auc"}
        assert 0.0 <= values["f1"] <= 100.0 and 0.0 <= values["roc_auc"] <= 100.0
    # the run evaluates again from its directory to the same numbers
    code, out, err = cli(capsys, "eval", run, "--split", "test")
    assert code == 0, err


def test_one_multilabel_task_matches_scikit_learn_on_its_predictions(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``label_groups: all``, the task's macro F1 and ROC-AUC over the 14 labels are
    scikit-learn's on the same predictions."""
    import torch

    from polytask.config import load_config, to_dict
    from polytask.training import RunDirectory, Trainer
    from polytask.training.build import build_components

    monkeypatch.setattr(polytask.report, "write_run_report", lambda run: None)
    config = load_config(RECIPE, [*FAST, "data.options.label_groups=all", f"output_dir={tmp_path}"])
    components = build_components(config)
    run = RunDirectory.create(tmp_path / "run", to_dict(config))
    results = Trainer(components, run, console=False).fit()
    model = components.model.eval()
    test = components.bundle.test
    inputs = torch.stack([test[i]["input"] for i in range(len(test))])
    target = torch.stack([test[i]["targets"]["labels"] for i in range(len(test))])
    with torch.no_grad():
        logits = model(inputs)["labels"]
    f1 = 100 * f1_score(target.numpy(), (logits > 0).numpy(), average="macro", zero_division=0)
    auc = 100 * roc_auc_score(target.numpy(), logits.numpy(), average="macro")
    values = results["test"]["metrics"]["labels"]
    assert values["f1"] == pytest.approx(f1, rel=1e-6)
    assert values["roc_auc"] == pytest.approx(auc, rel=1e-6)


@pytest.mark.parametrize(
    ("level", "stated"),
    [("parameter", "14 backward passes"), ("feature", "from one backward pass, then one")],
)
def test_a_gradient_method_states_its_cost_before_training(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    level: str,
    stated: str,
) -> None:
    monkeypatch.setattr(polytask.report, "write_run_report", lambda run: None)
    code, out, err = cli(
        capsys,
        "train",
        RECIPE,
        f"output_dir={tmp_path}",
        "train.epochs=1",
        "data.batch_size=1024",
        "balancer.name=pcgrad",
        f"balancer.options.level={level}",
    )
    assert code == 0, err
    log = (_run_dir(out) / "train.log").read_text(encoding="utf-8").splitlines()
    first_epoch = next(i for i, line in enumerate(log) if "epoch 1/1" in line)
    cost = [i for i, line in enumerate(log) if stated in line]
    assert cost and cost[0] < first_epoch, log
    if level == "parameter":
        assert "balancer.options.level: feature" in log[cost[0]]
