"""Progress of long loops: a bar on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import pytest

from polytask import progress as progress_module
from polytask.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    return clock


def test_without_a_terminal_a_line_is_logged_every_interval(clock: Clock) -> None:
    lines: list[str] = []
    bar = Progress(100, "epoch 2/5", log=lines.append, interval=30.0, terminal=False)
    for step in range(100):
        clock.now += 1.0  # one step per second
        bar.update()
        if step == 28:
            assert lines == []  # 29 s: nothing yet
    bar.close()
    assert len(lines) == 3  # at 30, 60 and 90 s
    assert lines[0] == "epoch 2/5: step 30/100 (30 %), 30 s, 1 steps/s, about 70 s left"
    assert lines[2].startswith("epoch 2/5: step 90/100 (90 %), 90 s")


def test_a_resumed_epoch_estimates_from_the_steps_done_since(clock: Clock) -> None:
    lines: list[str] = []
    bar = Progress(100, "epoch 1/1", log=lines.append, initial=50, interval=10.0, terminal=False)
    clock.now += 10.0
    bar.update(10)  # 10 steps in 10 s, 40 left
    assert lines == ["epoch 1/1: step 60/100 (60 %), 10 s, 1 steps/s, about 40 s left"]


def test_slow_steps_are_given_in_seconds_per_step(clock: Clock) -> None:
    lines: list[str] = []
    bar = Progress(10, "epoch 1/3", log=lines.append, interval=30.0, terminal=False)
    clock.now += 40.0
    bar.update()  # one step in 40 s, 9 left
    assert lines == ["epoch 1/3: step 1/10 (10 %), 40 s, 40 s/step, about 360 s left"]


def test_disabled_or_on_a_terminal_nothing_is_logged(clock: Clock) -> None:
    lines: list[str] = []
    quiet = Progress(10, "x", enabled=False, log=lines.append, interval=0.0, terminal=False)
    on_terminal = Progress(10, "x", log=lines.append, interval=0.0, terminal=True)
    for _ in range(10):
        clock.now += 1.0
        quiet.update()
        on_terminal.update()
    quiet.close()
    on_terminal.close()
    assert lines == []
    assert on_terminal.done == 10
