"""TensorMTLDataset: the sample contract, eager validation and batching."""

from __future__ import annotations

import doctest
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import polytask.data.tensor as tensor_module
from polytask.data import TensorMTLDataset
from polytask.errors import DataError

N = 5


def make(mask: Any = None, **targets: torch.Tensor) -> TensorMTLDataset:
    targets = targets or {
        "label": torch.arange(N),
        "score": torch.arange(N, dtype=torch.float32).reshape(N, 1) / 2,
    }
    return TensorMTLDataset(
        torch.arange(N * 6, dtype=torch.float32).reshape(N, 2, 3), targets, mask
    )


def test_samples_follow_the_contract_without_mask() -> None:
    data = make()
    assert len(data) == N
    assert data.tasks == ("label", "score")
    sample = data[3]
    assert set(sample) == {"input", "targets"}
    assert torch.equal(sample["input"], data.inputs[3])
    assert sample["targets"]["label"].item() == 3
    assert torch.equal(sample["targets"]["score"], torch.tensor([1.5]))
    assert torch.equal(data[-1]["input"], data.inputs[N - 1])


def test_samples_carry_the_mask_of_the_masked_tasks_only() -> None:
    label_mask = torch.tensor([True, False, True, False, True])
    data = make(mask={"label": label_mask})
    for i in range(N):
        sample = data[i]
        assert set(sample["mask"]) == {"label"}
        assert sample["mask"]["label"].dtype == torch.bool
        assert sample["mask"]["label"].shape == ()
        assert bool(sample["mask"]["label"]) == bool(label_mask[i])


def test_default_collate_gives_the_documented_batch() -> None:
    mask = {
        "label": torch.tensor([True, False, True, True, False]),
        "score": torch.ones(N, dtype=torch.bool),
    }
    batch = next(iter(DataLoader(make(mask=mask), batch_size=4)))
    assert batch["input"].shape == (4, 2, 3)
    assert batch["targets"]["label"].shape == (4,)
    assert batch["targets"]["label"].dtype == torch.int64
    assert batch["targets"]["score"].shape == (4, 1)
    assert set(batch["mask"]) == {"label", "score"}
    assert torch.equal(batch["mask"]["label"], torch.tensor([True, False, True, True]))
    assert batch["mask"]["score"].dtype == torch.bool

    unmasked = next(iter(DataLoader(make(), batch_size=N)))
    assert set(unmasked) == {"input", "targets"}


def test_empty_data_set_is_allowed() -> None:
    data = TensorMTLDataset(torch.zeros(0, 3), {"t": torch.zeros(0)})
    assert len(data) == 0


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"inputs": [[1.0]]}, "`inputs` to be a tensor, found list"),
        ({"inputs": torch.tensor(1.0)}, "found a scalar tensor"),
        ({"targets": {}}, "non-empty mapping"),
        ({"targets": [torch.zeros(N)]}, "non-empty mapping"),
        ({"targets": {"": torch.zeros(N)}}, "non-empty task names"),
        ({"targets": {"a": [0] * N}}, "task 'a' to be a tensor, found list"),
        (
            {"targets": {"a": torch.zeros(N), "b": torch.zeros(N + 1, 2)}},
            "task 'b' to have 5 samples (the first dimension of `inputs`, shape (5, 2, 3)), "
            "found shape (6, 2)",
        ),
        ({"targets": {"a": torch.tensor(0)}}, "task 'a' to have 5 samples"),
        ({"mask": [torch.ones(N, dtype=torch.bool)]}, "`mask` to be a mapping"),
        (
            {"mask": {"c": torch.ones(N, dtype=torch.bool)}},
            "`mask` names task 'c', which has no targets",
        ),
        ({"mask": {3: torch.ones(N, dtype=torch.bool)}}, "keys of `mask`"),
        ({"mask": {"a": [True] * N}}, "mask of task 'a' to be a tensor, found list"),
        ({"mask": {"a": torch.ones(N)}}, "found dtype torch.float32 and shape (5,)"),
        (
            {"mask": {"a": torch.ones(N, 1, dtype=torch.bool)}},
            "shape (5,), found dtype torch.bool and shape (5, 1)",
        ),
        (
            {"mask": {"a": torch.ones(N - 1, dtype=torch.bool)}},
            "found dtype torch.bool and shape (4,)",
        ),
    ],
)
def test_invalid_arguments_raise_data_error(kwargs: dict[str, Any], expected: str) -> None:
    arguments: dict[str, Any] = {
        "inputs": torch.zeros(N, 2, 3),
        "targets": {"a": torch.zeros(N), "b": torch.zeros(N, 4)},
    }
    arguments.update(kwargs)
    with pytest.raises(DataError) as info:
        TensorMTLDataset(**arguments)
    assert expected in str(info.value)


def test_docstring_example_runs() -> None:
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    tests = finder.find(tensor_module)
    assert any(test.examples for test in tests)
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
