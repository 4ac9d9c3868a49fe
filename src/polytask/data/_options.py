"""Checks of data set options, with the messages every built-in data set gives."""

from __future__ import annotations

import numbers

from ..errors import ConfigError

__all__ = ["check_bool", "check_int"]


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int, or a ConfigError naming option ``name`` (bools are not integers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(
            f"Expected option `{name}` to be an integer >= {minimum}, found {value!r}."
        )
    return int(value)


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool, else a ConfigError naming option ``name``."""
    if not isinstance(value, bool):
        raise ConfigError(f"Expected option `{name}` to be true or false, found {value!r}.")
    return value
