"""The per-label table of a multi-label task in the run report, from results.json alone."""

from __future__ import annotations

import math
from typing import Any

import torch

from polytask.metrics import MultiLabelMetric
from polytask.report.run_report import class_rows, class_table
from polytask.tasks import label_tasks
from polytask.training.trainer import _class_info


def _results() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    metric = MultiLabelMetric(values=("f1", "roc_auc"))
    target = (torch.rand(40, 3, generator=gen) < torch.tensor([0.5, 0.2, 0.0])).long()
    metric.update(torch.randn(40, 3, generator=gen), target)
    tasks = label_tasks(["cat", "dog", "bird"], "all", name="animals")
    return {
        "tasks": ["animals"],
        "classes": _class_info({}, tasks),
        "test": {
            "metrics": {"animals": metric.compute()},
            "details": {"animals": metric.details()},
        },
        "val": {"metrics": {}, "details": {}},
    }


def test_a_multilabel_task_gets_one_row_per_label_with_its_name() -> None:
    results = _results()
    assert results["classes"] == {"animals": {"names": ["cat", "dog", "bird"]}}
    headers, rows, note = class_rows(results)["animals"]
    assert headers == [
        "label",
        "test positives",
        "test F1 ↑",
        "test precision ↑",
        "test recall ↑",
        "test ROC-AUC ↑",
        "test AP ↑",
    ]
    details = results["test"]["details"]["animals"]
    assert [row[0] for row in rows] == ["cat", "dog", "bird"]
    assert [int(row[1]) for row in rows] == [int(p) for p in details["positives"]]
    for row, f1 in zip(rows, details["f1"], strict=True):
        assert math.isclose(float(row[2]), f1, rel_tol=1e-3)
    # 'bird' has no positive test sample: its ROC-AUC is undefined, shown as '-'
    assert rows[2][5] == "-" and details["roc_auc"][2] is None
    assert "Task `animals`" in (class_table(results) or "")
    assert "unweighted means" in note


def test_single_label_tasks_get_no_table() -> None:
    results = _results()
    tasks = label_tasks(["cat", "dog"], "each")
    assert _class_info({}, tasks) == {}
    details = results["test"]["details"]["animals"]
    one = {k: v[:1] for k, v in details.items()}
    results["test"]["details"] = {"animals": one}
    assert class_rows(results) == {}
