"""Property-based fuzzing of the config loader and the override parser.

Every input, however malformed (arbitrary bytes in a recipe file, YAML-like text built from
the tokens that break parsers, overrides with odd keys and values), ends either in a value or
in a :class:`~polytask.errors.PolytaskError` whose message is one bounded line: never another
exception, never a hang. Inputs are small and the runs derandomized, so the file takes a few
seconds and fails the same way everywhere.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polytask.compare import load_grid
from polytask.config import apply_overrides, load_config, parse_overrides
from polytask.errors import PolytaskError
from polytask.yamlio import load_text

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

#: pieces of YAML that reach the scanner, parser, composer and constructors' corners
TOKENS = [
    *"ab:-[]{},&*!?|>'\"#\n %@`\\\t.=~<01",
    "  ",
    "\n  ",
    "train:",
    "epochs:",
    "model:",
    "data:",
    "options:",
    "seed: ",
    "name: ",
    " &a ",
    " *a",
    "<<: ",
    "!!int ",
    "!!float ",
    "!!bool ",
    "!!timestamp ",
    "!!binary ",
    "!!set ",
    "!!omap ",
    "!!python/object:os.system ",
    "!!python/name:os.system",
    "0x",
    "0b",
    "0o",
    "1_0",
    "._",
    "1e5",
    ".inf",
    "2001-13-40",
    "2001-12-14t21:59:43.10-05:00",
    "9" * 50,
    "1:2:3",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "? ",
    "null",
    "yes",
    "\x00",
    "\ufeff",
    "\x85",
    "\u2028",
    "é",
    "\U0001f600",
    "\ud800",
    "[[[[",
    "]]]]",
]

yamlish = st.lists(st.sampled_from(TOKENS), max_size=24).map("".join)

#: a recipe as bytes: anything, or YAML-like text in a few encodings
recipe_bytes = st.one_of(
    st.binary(max_size=64),
    yamlish.map(lambda s: s.encode("utf-8", "surrogatepass")),
    yamlish.map(
        lambda s: (
            s.encode("utf-8", "surrogateescape")
            if s.isascii()
            else b"\xff" + s.encode("utf-8", "replace")
        )
    ),
    yamlish.map(lambda s: s.encode("utf-16")),
)

key_part = st.one_of(
    st.sampled_from(["train", "epochs", "model", "options", "data", "seed", "optim", "lr"]),
    st.text(max_size=6),
    st.sampled_from(["", " ", "\udcff", "a b", "\n", "x" * 300]),
)
override_key = st.lists(key_part, min_size=1, max_size=4).map(".".join)
override_value = st.one_of(yamlish, st.text(max_size=12))
override = st.one_of(
    st.tuples(override_key, st.sampled_from(["=", "==", " = ", ""]), override_value).map("".join),
    st.text(max_size=20),
)


def ends_well(call: Callable[[], Any]) -> None:
    """``call()`` returns, or raises a PolytaskError with a one-line bounded message."""
    try:
        call()
    except PolytaskError as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message, message
        assert 0 < len(message) <= 2000, len(message)


@FUZZ
@given(recipe_bytes)
def test_any_bytes_as_a_recipe(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_bytes(data)
        ends_well(lambda: load_config(path))


@FUZZ
@given(yamlish)
def test_yaml_like_text(text: str) -> None:
    ends_well(lambda: load_text(text, "text"))


@FUZZ
@given(st.lists(override, max_size=4))
def test_overrides_on_the_command_line(overrides: list[str]) -> None:
    ends_well(lambda: load_config(None, overrides))
    ends_well(
        lambda: apply_overrides({"train": {"epochs": 1}, "seed": 0}, parse_overrides(overrides))
    )


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
yaml_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@FUZZ
@given(
    st.dictionaries(
        st.one_of(override_key, st.integers(), st.none(), st.booleans()), yaml_values, max_size=3
    ),
    st.dictionaries(st.text(max_size=8), yaml_values, max_size=3),
)
def test_overrides_from_a_mapping(overrides: dict[Any, Any], data: dict[str, Any]) -> None:
    """A grid file's ``config`` and cells give overrides as mappings: any keys, any values."""
    ends_well(lambda: apply_overrides(data, overrides))
    ends_well(lambda: load_config(data, overrides))


@FUZZ
@given(recipe_bytes, st.lists(override, max_size=2))
def test_any_bytes_as_a_grid_file(data: bytes, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "grid.yaml"
        path.write_bytes(b"name: g\nseeds: [0]\ncells: {a: {}}\nconfig:\n  " + data)
        ends_well(lambda: load_grid(path, overrides))
