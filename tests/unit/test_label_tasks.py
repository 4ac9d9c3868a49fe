"""Binary and multi-label tasks declared once: label_tasks, label_targets and the BCE loss
with positive weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytask.errors import ConfigError, DataError
from polytask.losses import BCEWithLogitsLoss
from polytask.metrics import MultiLabelMetric
from polytask.tasks import label_targets, label_tasks

LABELS = ("a", "b", "c", "d")


def targets() -> torch.Tensor:
    # per label: a 2 of 6 positive, b 3, c 1, d 5
    return torch.tensor(
        [[1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    )


def test_bce_pos_weight_is_torchs_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(5, 3, generator=gen)
    target = (torch.rand(5, 3, generator=gen) > 0.5).float()
    weight = [0.5, 2.0, 7.0]
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(weight))(pred, target)
    assert torch.allclose(BCEWithLogitsLoss(weight)(pred, target), expected, rtol=1e-6)
    # the formula written out: -(w y log s(x) + (1 - y) log(1 - s(x)))
    s = torch.sigmoid(pred)
    naive = -(torch.tensor(weight) * target * s.log() + (1 - target) * (1 - s).log()).mean()
    assert torch.allclose(BCEWithLogitsLoss(weight)(pred, target), naive, rtol=1e-5)
    # a per-sample mask averages over the labelled samples only
    mask = torch.tensor([True, False, True, True, False])
    masked = BCEWithLogitsLoss(weight)(pred, target, mask)
    assert torch.allclose(
        masked,
        F.binary_cross_entropy_with_logits(
            pred[mask], target[mask], pos_weight=torch.tensor(weight)
        ),
        rtol=1e-6,
    )


@pytest.mark.parametrize("weight", [[], [1.0, 0.0], [float("nan")], [float("inf")], [-1.0]])
def test_bce_refuses_bad_weights(weight: list[float]) -> None:
    with pytest.raises(ValueError, match="pos_weight"):
        BCEWithLogitsLoss(weight)


def test_bce_weights_must_match_the_labels() -> None:
    with pytest.raises(ValueError, match="2 labels"):
        BCEWithLogitsLoss([1.0, 2.0])(torch.zeros(4, 3), torch.zeros(4, 3))


def test_each_label_its_own_binary_task_with_balanced_weights() -> None:
    y = targets()
    tasks = label_tasks(LABELS, "each", train_targets=y[:, :], pos_weight="balanced")
    assert list(tasks) == list(LABELS)
    expected = {"a": 4 / 2, "b": 3 / 3, "c": 5 / 1, "d": 1 / 5}
    for name, task in tasks.items():
        assert task.kind == "multilabel" and task.output_dim == 1
        assert isinstance(task.loss, BCEWithLogitsLoss)
        assert task.loss.pos_weight == pytest.approx((expected[name],))
        assert task.extra["pos_weight"] == pytest.approx([expected[name]])
        assert isinstance(task.make_metrics()["multilabel"], MultiLabelMetric)
    assert tasks["c"].extra["positive_rate"] == pytest.approx([1 / 6])
    cut = label_targets(y, tasks)
    assert all(cut[name].shape == (6, 1) and cut[name].dtype == torch.float32 for name in cut)
    assert cut["b"][:, 0].tolist() == [1, 0, 1, 1, 0, 0]


def test_all_labels_one_task_and_groups() -> None:
    y = targets()
    (task,) = label_tasks(LABELS, "all", name="genes", values=("f1_micro",)).values()
    assert task.name == "genes" and task.output_dim == 4
    assert task.extra["labels"] == list(LABELS)
    assert task.loss.pos_weight is None  # type: ignore[attr-defined]
    assert list(task.make_metrics()["multilabel"].higher_is_better) == ["f1_micro"]
    assert torch.equal(label_targets(y, {"genes": task})["genes"], y.float())
    groups = label_tasks(LABELS, {"pair": ["d", "a"], "single": ["c"]})
    assert [t.output_dim for t in groups.values()] == [2, 1]
    assert torch.equal(label_targets(y, groups)["pair"], y[:, [3, 0]].float())


def test_a_task_trains_with_its_metric() -> None:
    """One declaration drives loss and metric of a 2-label task end to end."""
    y = targets()
    (task,) = label_tasks(LABELS[:2], "all", train_targets=y[:, :2], pos_weight="balanced").values()
    logits = torch.tensor(
        [[3.0, 2.0], [1.0, -1.0], [-2.0, 1.0], [-1.0, 4.0], [-3.0, -2.0], [-1.0, -1.0]]
    )
    loss = task.compute_loss(logits, y[:, :2].float())
    assert loss.item() > 0
    metric = task.make_metrics()["multilabel"]
    metric.update(task.prepare(logits), y[:, :2])
    assert metric.compute() == {"f1": 100.0, "roc_auc": 100.0}


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"groups": "some"}, ConfigError, "'each'"),
        ({"groups": {}}, ConfigError, "'each'"),
        ({"groups": {"g": "a"}}, ConfigError, "non-empty list"),
        ({"groups": {"g": ["z"]}}, ConfigError, "unknown label 'z'"),
        ({"groups": {"g": ["a"], "h": ["a"]}}, ConfigError, "two label groups"),
        ({"pos_weight": "balanced"}, ConfigError, "needs the training targets"),
        ({"pos_weight": "auto"}, ConfigError, "`pos_weight`"),
    ],
)
def test_bad_declarations(kwargs: dict[str, object], error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        label_tasks(LABELS, **kwargs)  # type: ignore[arg-type]


def test_balanced_weights_need_both_kinds_of_sample() -> None:
    y = targets()
    y[:, 2] = 0
    with pytest.raises(DataError, match="label 'c' has 0 positive"):
        label_tasks(LABELS, train_targets=y, pos_weight="balanced")
    with pytest.raises(DataError, match=r"shape \(N, 4\)"):
        label_tasks(LABELS, train_targets=y[:, :3], pos_weight="balanced")
    with pytest.raises(ConfigError, match="distinct label names"):
        label_tasks(["a", "a"])
