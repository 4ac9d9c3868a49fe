"""A plugin data set for the robustness tests (copied beside a recipe, named under `plugins:`).

``faulty_table``: 6 random features, three tasks (``label``: 3 classes; ``value``: a float of
shape (1,); ``tags``: 2 binary labels), and one injected fault:

    fault: {split: train, field: label, index: 5, value: 10}   # a value at one sample
    fault: {split: val, field: input, dtype: int64}             # a whole field's dtype
    fault: {split: test, field: value, shape: [2]}              # a whole field's shape

``field`` is ``input`` or a task. Test hooks, read from the environment of the process (so
that a resumed run, started without them, trains normally):

- ``FAULTY_TABLE_SIGNALS="80:SIGTERM,81:SIGTERM"``: send these signals to the process when
  the training split has served that many samples (counted in this process);
- ``FAULTY_TABLE_SLOW=0.002``: sleep that long for every training sample served.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch

from polytask import Task
from polytask.data import DATASETS, DataBundle, TensorMTLDataset
from polytask.losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from polytask.metrics import Accuracy, MultiLabelMetric, RegressionMetric


class CountingDataset(TensorMTLDataset):
    served = 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        CountingDataset.served += 1
        plan = os.environ.get("FAULTY_TABLE_SIGNALS", "")
        for item in filter(None, plan.split(",")):
            count, name = item.split(":")
            if int(count) == CountingDataset.served:
                os.kill(os.getpid(), getattr(signal, name))
        slow = float(os.environ.get("FAULTY_TABLE_SLOW", "0") or 0)
        if slow:
            time.sleep(slow)
        return super().__getitem__(index)


def _split(n: int, g: torch.Generator, fault: dict[str, Any] | None, counting: bool) -> Any:
    x = torch.randn(n, 6, generator=g)
    targets: dict[str, torch.Tensor] = {
        "label": (x[:, 0] > -0.43).long() + (x[:, 0] > 0.43).long(),
        "value": (x[:, 1] + 0.5 * x[:, 2]).unsqueeze(1),
        "tags": torch.stack([x[:, 3] > 0, x[:, 4] > 0], dim=1).float(),
    }
    if fault:
        field = fault["field"]
        data = x if field == "input" else targets[field]
        if "index" in fault:
            value = fault["value"]
            data[fault["index"]] = float(value) if isinstance(value, str) else value
        if "dtype" in fault:
            data = data.to(getattr(torch, fault["dtype"]))
        if "shape" in fault:
            data = data.reshape(n, -1)[:, :1].expand(n, *fault["shape"]).contiguous()
        if field == "input":
            x = data
        else:
            targets[field] = data
    cls = CountingDataset if counting else TensorMTLDataset
    return cls(x, targets)


@DATASETS.register("faulty_table")
def faulty_table(
    *,
    n_train: int = 96,
    n_val: int = 32,
    n_test: int = 32,
    seed: int = 0,
    fault: dict[str, Any] | None = None,
) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    tasks = {
        "label": Task(
            name="label",
            loss=CrossEntropyLoss(),
            metrics={"accuracy": Accuracy},
            output_dim=3,
            kind="classification",
        ),
        "value": Task(
            name="value",
            loss=MSELoss(),
            metrics={"regression": RegressionMetric},
            output_dim=1,
            kind="regression",
        ),
        "tags": Task(
            name="tags",
            loss=BCEWithLogitsLoss(),
            metrics={"multilabel": MultiLabelMetric},
            output_dim=2,
            kind="multilabel",
        ),
    }
    splits = {
        name: _split(
            n, g, fault if fault and fault["split"] == name else None, counting=name == "train"
        )
        for name, n in (("train", n_train), ("val", n_val), ("test", n_test))
    }
    return DataBundle(tasks=tasks, input_shape=(6,), info={"seed": seed}, **splits)
