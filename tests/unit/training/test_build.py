"""Building from configuration: learning-rate schedules, optimizer groups, devices."""

from __future__ import annotations

import itertools
import math

import pytest

from polytask.config import SchedulerConfig
from polytask.errors import ConfigError
from polytask.training.build import check_precision, lr_factor, resolve_device


def test_step_schedule_halves_every_step_size_epochs() -> None:
    cfg = SchedulerConfig(name="step", step_size=100, gamma=0.5)
    assert [lr_factor(cfg, 200, 1e-4, e) for e in (0, 99, 100, 199)] == [1, 1, 0.5, 0.5]


def test_multistep_and_warmup() -> None:
    cfg = SchedulerConfig(name="multistep", milestones=[3, 6], gamma=0.1)
    assert [lr_factor(cfg, 10, 1.0, e) for e in (2, 3, 6)] == pytest.approx([1, 0.1, 0.01])
    warm = SchedulerConfig(name="none", warmup_epochs=3)
    assert [lr_factor(warm, 10, 1.0, e) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_cosine_goes_from_one_to_the_floor() -> None:
    cfg = SchedulerConfig(name="cosine", min_lr=1e-4)
    base = 1e-2
    factors = [lr_factor(cfg, 10, base, e) for e in range(11)]
    assert factors[0] == 1.0
    assert factors[5] == pytest.approx(0.5 * (1 + 1e-2))
    assert factors[10] * base == pytest.approx(1e-4)
    assert all(a >= b for a, b in itertools.pairwise(factors))
    assert not any(math.isnan(f) for f in factors)


def test_devices_and_precisions() -> None:
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match=r"train\.device"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="fp16"):
        check_precision("fp16", resolve_device("cpu"))
    check_precision("bf16", resolve_device("cpu"))
