"""Name -> factory registries, so that new components plug in without a central switch.

Adding an architecture, balancing method, data set or metric is one new module with one
decorator::

    @ARCHITECTURES.register("my_arch")
    def build_my_arch(...): ...

Built-in components are registered when their package is imported; third-party code
registers its own the same way before building from a config. A registration may declare
limits of the options beside it (see :mod:`polytask.options`)::

    @BACKBONES.register("my_cnn", limits={"channels": Limit(ge=1, le=4096)})
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from .errors import ConfigError, did_you_mean
from .options import Budget, Limit, OptionSchema, check_options, option_schema

__all__ = ["Registry", "call_with_options"]

T = TypeVar("T")
F = TypeVar("F")


class Registry(Generic[T]):
    """A named collection of factories of one kind (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        # name -> (the registered object, its limits, its budgets)
        self._limits: dict[str, tuple[object, dict[str, Limit], tuple[Budget, ...]]] = {}

    def register(
        self,
        name: str,
        *,
        limits: Mapping[str, Limit] | None = None,
        budgets: Sequence[Budget] = (),
    ) -> Callable[[F], F]:
        """Decorator registering ``obj`` under ``name``; a name can be registered only once.

        ``limits`` bound options beyond what their annotations say (``{"channels":
        Limit(ge=1, le=4096)}``) and ``budgets`` bound estimates computed from all options;
        see :mod:`polytask.options`. The decorated object is returned unchanged.
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
            self._limits[name] = (obj, dict(limits or {}), tuple(budgets))
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a KeyError if it is not registered)."""
        del self._items[name]
        self._limits.pop(name, None)

    def schema(self, name: str, provided: Sequence[str] = ()) -> OptionSchema:
        """The options ``name`` takes from a config (all but ``provided``), with their types,
        limits and budgets."""
        factory: Any = self.get(name)
        owner, limits, budgets = self._limits.get(name, (None, {}, ()))
        if owner is not factory:  # replaced without register(): nothing declared
            limits, budgets = {}, ()
        return option_schema(factory, provided, limits, budgets)

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
    schema: OptionSchema | None = None,
) -> Any:
    """Call ``factory(**provided, **options)``, checking ``options`` against its signature.

    ``options`` come from the user (a config's ``options`` mapping); ``provided`` are
    arguments that polytask passes itself (tasks, input shape, ...). An option the factory
    does not accept, one that collides with a provided argument, or one whose value does
    not fit the parameter's annotation (and the registration's limits, given by ``schema``,
    see :meth:`Registry.schema`) is a :class:`ConfigError` naming ``where`` (the config key).
    """
    provided = dict(provided or {})
    if schema is None:
        schema = option_schema(factory, provided)
    checked = check_options(schema, options, where=where, provided=provided)
    try:
        return factory(**provided, **checked)
    except TypeError as exc:
        params = inspect.signature(factory).parameters
        missing = [
            n
            for n, o in schema.options.items()
            if params[n].default is inspect.Parameter.empty and n not in checked
        ]
        if missing:
            raise ConfigError(f"{where} needs the option(s): {', '.join(missing)}.") from exc
        raise
