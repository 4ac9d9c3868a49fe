"""The batch schedule: deterministic from (seed, epoch), complete, and per strategy."""

from __future__ import annotations

import math

import pytest

from polytask.data.loading import JOINT, epoch_schedule, steps_per_epoch


def _flatten(steps: list[dict[str, list[int]]], key: str) -> list[int]:
    return [i for step in steps if key in step for i in step[key]]


def test_single_input_epoch_is_a_permutation_that_depends_on_seed_and_epoch() -> None:
    kw = {"batch_size": 7, "shuffle": True}
    a = epoch_schedule({JOINT: 50}, seed=1, epoch=0, **kw)
    assert sorted(_flatten(a, JOINT)) == list(range(50))
    assert len(a) == math.ceil(50 / 7)
    assert a == epoch_schedule({JOINT: 50}, seed=1, epoch=0, **kw)
    assert a != epoch_schedule({JOINT: 50}, seed=1, epoch=1, **kw)
    assert a != epoch_schedule({JOINT: 50}, seed=2, epoch=0, **kw)


def test_drop_last_and_no_shuffle() -> None:
    steps = epoch_schedule(
        {JOINT: 10}, batch_size=4, seed=0, epoch=0, shuffle=False, drop_last=True
    )
    assert steps == [{JOINT: [0, 1, 2, 3]}, {JOINT: [4, 5, 6, 7]}]


def test_all_strategy_draws_every_task_every_step_and_cycles_small_tasks() -> None:
    sizes = {"a": 40, "b": 10}
    steps = epoch_schedule(sizes, batch_size=5, seed=0, epoch=3, strategy="all")
    assert len(steps) == 8 == steps_per_epoch(sizes, 5, False, "all")
    assert all(set(step) == {"a", "b"} for step in steps)
    assert sorted(_flatten(steps, "a")) == list(range(40))
    b = _flatten(steps, "b")
    assert len(b) == 40 and all(b.count(i) == 4 for i in range(10))  # cycled four times


@pytest.mark.parametrize("strategy", ["round_robin", "proportional"])
def test_one_task_per_step_strategies_see_every_sample_once(strategy: str) -> None:
    sizes = {"a": 23, "b": 9, "c": 15}
    steps = epoch_schedule(sizes, batch_size=4, seed=5, epoch=0, strategy=strategy)
    assert all(len(step) == 1 for step in steps)
    assert len(steps) == steps_per_epoch(sizes, 4, False, strategy)
    for key, n in sizes.items():
        assert sorted(_flatten(steps, key)) == list(range(n))


def test_round_robin_cycles_through_tasks_in_order() -> None:
    steps = epoch_schedule({"a": 8, "b": 4}, batch_size=4, seed=0, epoch=0, strategy="round_robin")
    assert [next(iter(s)) for s in steps] == ["a", "b", "a"]


def test_proportional_draws_large_tasks_more_often_early() -> None:
    steps = epoch_schedule(
        {"a": 900, "b": 100}, batch_size=10, seed=0, epoch=0, strategy="proportional"
    )
    first_half = [next(iter(s)) for s in steps[:50]]
    assert 35 <= first_half.count("a") <= 50  # about 90 % of the draws


def test_unknown_strategy_is_rejected() -> None:
    with pytest.raises(ValueError, match="sampling strategy"):
        epoch_schedule({"a": 3, "b": 3}, batch_size=2, seed=0, epoch=0, strategy="random")
