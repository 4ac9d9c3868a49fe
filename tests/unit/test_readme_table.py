"""README.md's table of everything polytask implements names every registered component."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from polytask import balancing, data, models  # noqa: F401  (registers the built-in components)
from polytask.auxiliary import AUXILIARY_TASKS
from polytask.balancing.base import BALANCERS
from polytask.data import DATASETS
from polytask.metrics import METRICS
from polytask.models import ARCHITECTURES, BACKBONES, HEADS
from polytask.models.regularizers import REGULARIZERS
from polytask.registry import Registry

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "## Everything implemented, with its paper"


def _rows() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    assert HEADING in text
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert lines[0].split("|")[1:5] == [" kind ", " name ", " what ", " paper "]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_every_row_has_a_paper_or_says_it_has_none() -> None:
    rows = _rows()
    assert len(rows) > 50
    for kind, name, what, paper in rows:
        assert kind and name and what and paper, (kind, name)


@pytest.mark.parametrize(
    ("kind", "registry"),
    [
        ("architecture", ARCHITECTURES),
        ("regulariser", REGULARIZERS),
        ("auxiliary task", AUXILIARY_TASKS),
        ("backbone", BACKBONES),
        ("head", HEADS),
        ("data set", DATASETS),
        ("metric", METRICS),
    ],
)
def test_every_registered_component_is_in_the_table(kind: str, registry: Registry[object]) -> None:
    named = {n for k, name, _, _ in _rows() if k == kind for n in re.findall(r"`([^`]+)`", name)}
    missing = sorted(set(registry.names()) - named)
    assert not missing, f"README.md's table lacks the {kind} row(s) of {missing}"


def test_every_balancing_method_is_in_the_table() -> None:
    named = {
        n
        for kind, name, _, _ in _rows()
        if kind in ("loss weighting", "gradient method")
        for n in re.findall(r"`([^`]+)`", name)
    }
    missing = sorted(set(BALANCERS.names()) - named)
    assert not missing, f"README.md's table lacks the balancing method(s) {missing}"
