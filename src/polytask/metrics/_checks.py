"""Eager validation of metric constructor arguments, with messages in the user's terms."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError

__all__ = ["check_bool", "check_choice", "check_int", "check_positive_int"]


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an integer (not a bool) greater than 0, else a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"Expected argument `{name}` to be a positive integer but got {value!r}.")
    return value


def check_int(name: str, value: object) -> int:
    """``value`` if it is an integer (not a bool), else a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"Expected argument `{name}` to be an integer but got {value!r}.")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool, else a :class:`ConfigError`."""
    if not isinstance(value, bool):
        raise ConfigError(f"Expected argument `{name}` to be a bool but got {value!r}.")
    return value


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``, else a :class:`ConfigError` listing them."""
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"Expected argument `{name}` to be one of {choices} but got {value!r}.")
    return value
