"""Name -> factory registries, so that new components plug in without a central switch.

Adding an architecture, balancing method, data set or metric is one new module with one
decorator::

    @ARCHITECTURES.register("my_arch")
    def build_my_arch(...): ...

Built-in components are registered when their package is imported; third-party code
registers its own the same way before building from a config.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from .errors import ConfigError, did_you_mean

__all__ = ["Registry", "call_with_options"]

T = TypeVar("T")
F = TypeVar("F")


class Registry(Generic[T]):
    """A named collection of factories of one kind (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``obj`` under ``name``; a name can be registered only once.

        The decorated object is returned unchanged (with its own type).
        """

        def decorator(obj: F) -> F:
            previous = self._items.get(name)
            if (
                previous is not None
                and previous is not obj
                and _qualified(previous) != _qualified(obj)
            ):
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by {_qualified(previous)}"
                )
            # the same definition again (a re-run notebook cell, a reloaded module) replaces it
            self._items[name] = obj  # type: ignore[assignment]
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a KeyError if it is not registered)."""
        del self._items[name]

    def get(self, name: str) -> T:
        """The factory registered as ``name``; a :class:`ConfigError` lists the known names."""
        try:
            return self._items[name]
        except KeyError:
            allowed = ", ".join(sorted(self._items)) or "(none registered)"
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, self._items)} "
                f"Known {self.kind}s: {allowed}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


def _qualified(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def call_with_options(
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    *,
    where: str,
    provided: Mapping[str, Any] | None = None,
) -> Any:
    """Call ``factory(**provided, **options)``, checking ``options`` against its signature.

    ``options`` come from the user (a config's ``options`` mapping); ``provided`` are
    arguments that polytask passes itself (tasks, input shape, ...). An option the factory
    does not accept, or one that collides with a provided argument, is a
    :class:`ConfigError` naming ``where`` (the config key) and the accepted options.
    """
    provided = dict(provided or {})
    signature = inspect.signature(factory)
    params = signature.parameters
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    user_options = [
        n
        for n, p in params.items()
        if n not in provided
        and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    for key in options:
        if key in provided:
            raise ConfigError(f"{where}.{key} is set by polytask and cannot be given as an option.")
        if key not in params and not accepts_kwargs:
            allowed = ", ".join(user_options) or "(none)"
            raise ConfigError(
                f"unknown option {where}.{key}.{did_you_mean(key, user_options)} "
                f"Accepted options: {allowed}."
            )
    try:
        return factory(**provided, **options)
    except TypeError as exc:
        missing = [
            n
            for n in user_options
            if params[n].default is inspect.Parameter.empty and n not in options
        ]
        if missing:
            raise ConfigError(f"{where} needs the option(s): {', '.join(missing)}.") from exc
        raise
