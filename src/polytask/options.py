"""Component options checked against what their builder declares, before anything is built.

The expected type of an option comes from the builder's signature annotations
(:func:`typing.get_type_hints`): ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
``Sequence[X]`` / ``list[X]`` / ``tuple[X, ...]`` / ``tuple[X, Y]``, ``Mapping[K, V]`` and
unions such as ``X | None``. What an annotation cannot say (positive, in (0, 1), a maximum
size) a registration declares beside it::

    @BACKBONES.register("my_cnn", limits={"channels": Limit(ge=1, le=4096)})
    def my_cnn(*, input_shape, channels: Sequence[int] = (32, 64)) -> nn.Module: ...

A :class:`Limit` bounds every number of an option (a scalar, the items of a sequence, the
values of a mapping) and optionally a sequence's length; a :class:`Budget` bounds an
estimate computed from all options together (pixels a data set generates, parameters a
backbone allocates). Every float option refuses NaN and infinities, and an integer option
named ``seed`` is limited to 0..2**64-1 (what the random generators accept). A parameter
without annotation, or with a type not listed above, is not checked: plugins declare only
what they want checked.

A failed check is a :class:`~polytask.errors.ConfigError` naming the dotted key, e.g.
``model.backbone_options.channels: expected a list of integers >= 1 and <= 4096, found 27.``
"""

from __future__ import annotations

import inspect
import itertools
import math
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .errors import ConfigError, did_you_mean

__all__ = [
    "CHANNELS",
    "DEPTH",
    "MAX_CHANNELS",
    "MAX_DEPTH",
    "MAX_PARAMETERS",
    "MAX_SAMPLES",
    "MAX_VALUES",
    "MAX_WIDTH",
    "SAMPLES",
    "SEED_LIMIT",
    "WIDTH",
    "Budget",
    "Limit",
    "OptionSchema",
    "check_options",
    "dense_parameters",
    "option_schema",
    "parameters_budget",
    "values_budget",
]


@dataclass(frozen=True)
class Limit:
    """Bounds of an option's numbers (every item of a sequence, every value of a mapping),
    and of a sequence's length."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_length: int | None = None
    max_length: int | None = None

    def accepts(self, number: float) -> bool:
        return not (
            (self.ge is not None and number < self.ge)
            or (self.gt is not None and number <= self.gt)
            or (self.le is not None and number > self.le)
            or (self.lt is not None and number >= self.lt)
        )

    def describe(self) -> str:
        """`` >= 1 and <= 4096`` (with a leading space), or an empty string."""
        parts = [
            f"{op} {_number(bound)}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        return (" " + " and ".join(parts)) if parts else ""

    def describe_length(self) -> str:
        lo, hi = self.min_length, self.max_length
        if lo is None and hi is None:
            return ""
        if lo is not None and hi is not None:
            return f" ({lo} to {hi} items)" if lo != hi else f" ({lo} items)"
        return f" (at least {lo} items)" if lo is not None else f" (at most {hi} items)"


@dataclass(frozen=True)
class Budget:
    """A bound on ``estimate(options)``, computed from every option (defaults filled in).

    ``what`` names the quantity and how it is estimated, e.g. ``"pixels generated,
    (n_train + n_val + n_test) x canvas^2"``; ``options`` are the names to lower.
    """

    estimate: Callable[[Mapping[str, Any]], float]
    maximum: float
    what: str
    options: tuple[str, ...] = ()
    #: what the maximum amounts to, in words (``8 GiB of float32``)
    note: str = ""


#: the seeds every random generator accepts (``torch.Generator.manual_seed``)
SEED_LIMIT = Limit(ge=0, le=2**64 - 1)

# -- the limits of the built-in components (docs/troubleshooting.md, "Options of components")
#: samples of one generated split
MAX_SAMPLES = 10_000_000
#: units of a dense layer (out_features, hidden sizes, widths)
MAX_WIDTH = 16_384
#: channels of a convolution
MAX_CHANNELS = 4_096
#: layers (items of a channels or hidden list), blocks, message-passing steps
MAX_DEPTH = 64
#: values (pixels x channels) a generated data set holds, over its three splits: 2**31
#: float32 values are 8 GiB
MAX_VALUES = 2**31
#: parameters a backbone is estimated to allocate: 10**9 float32 parameters are 4 GB,
#: before gradients and optimizer state
MAX_PARAMETERS = 10**9

#: the number of samples of a generated split
SAMPLES = Limit(ge=1, le=MAX_SAMPLES)
#: a dense layer's size, or the sizes of a list of them
WIDTH = Limit(ge=1, le=MAX_WIDTH, max_length=MAX_DEPTH)
#: the channels of a list of convolutions
CHANNELS = Limit(ge=1, le=MAX_CHANNELS, min_length=1, max_length=MAX_DEPTH)
#: a count of layers, blocks or steps
DEPTH = Limit(ge=1, le=MAX_DEPTH)


def dense_parameters(widths: Sequence[int], inputs: int = 0) -> int:
    """Weights of a chain of dense layers ``inputs -> widths[0] -> widths[1] -> ...``."""
    sizes = [inputs, *widths] if inputs else list(widths)
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def values_budget(per_sample: Callable[[Mapping[str, Any]], float], *names: str) -> Budget:
    """A :class:`Budget` of :data:`MAX_VALUES` on ``(n_train + n_val + n_test) x
    per_sample(options)`` (``names``: the options to lower)."""

    def estimate(options: Mapping[str, Any]) -> float:
        total = sum(int(options[k]) for k in ("n_train", "n_val", "n_test"))
        return total * float(per_sample(options))

    return Budget(
        estimate,
        MAX_VALUES,
        "the values generated, (n_train + n_val + n_test) x the values of a sample,",
        ("n_train", "n_val", "n_test", *names),
        "8 GiB of float32",
    )


def parameters_budget(count: Callable[[Mapping[str, Any]], float], *names: str) -> Budget:
    """A :class:`Budget` of :data:`MAX_PARAMETERS` on ``count(options)``."""
    return Budget(
        count, MAX_PARAMETERS, "the estimated number of parameters", names, "4 GB of float32"
    )


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:g}"


@dataclass(frozen=True)
class _Option:
    name: str
    annotation: Any  # Any when the builder does not say
    default: Any
    limit: Limit | None


@dataclass(frozen=True)
class OptionSchema:
    """What a builder accepts as options: their types, defaults, limits and budgets."""

    options: Mapping[str, _Option]
    accepts_any: bool  # the builder takes **kwargs
    budgets: tuple[Budget, ...] = field(default=())

    def describe(self, name: str) -> str:
        """In words, what option ``name`` expects (``a list of integers >= 1``)."""
        option = self.options[name]
        return _describe(option.annotation, option.limit)


def _hints(factory: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotations of ``factory`` (a class: its ``__init__``); an annotation
    that cannot be resolved is left out (not checked)."""
    target: Any = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:
        pass
    module = sys.modules.get(getattr(factory, "__module__", ""), None)
    namespace = dict(vars(module)) if module is not None else {}
    hints: dict[str, Any] = {}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return hints
    for name, param in params.items():
        ann = param.annotation
        if ann is inspect.Parameter.empty:
            continue
        if isinstance(ann, str):
            try:
                ann = eval(ann, namespace)  # the builder's own module namespace
            except Exception:
                continue
        hints[name] = ann
    return hints


def option_schema(
    factory: Callable[..., Any],
    provided: Iterable[str] = (),
    limits: Mapping[str, Limit] | None = None,
    budgets: Sequence[Budget] = (),
) -> OptionSchema:
    """The options ``factory`` takes from the user (every keyword parameter except the
    ``provided`` ones that polytask passes itself), from its signature."""
    provided = set(provided)
    limits = dict(limits or {})
    params = inspect.signature(factory).parameters
    hints = _hints(factory)
    options: dict[str, _Option] = {}
    for name, param in params.items():
        if name in provided or param.kind not in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            continue
        annotation = hints.get(name, Any)
        limit = limits.get(name)
        if limit is None and name == "seed" and _plain(annotation) is int:
            limit = SEED_LIMIT
        options[name] = _Option(name, annotation, param.default, limit)
    unknown = sorted(set(limits) - set(options))
    if unknown:  # a bug in the registration, not in the user's input
        raise TypeError(f"limits name option(s) {unknown} that {factory!r} does not take")
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return OptionSchema(options, accepts_any, tuple(budgets))


def _plain(tp: Any) -> Any:
    """``X`` for ``X | None``; else ``tp``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def check_options(
    schema: OptionSchema,
    options: Mapping[str, Any],
    *,
    where: str,
    provided: Iterable[str] = (),
) -> dict[str, Any]:
    """``options`` checked against ``schema`` (numbers written as text, e.g. YAML's
    ``1e-4``, converted); a :class:`ConfigError` names ``where.KEY`` and what it expects."""
    provided = set(provided)
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}: expected a mapping, found {_show(options)}.")
    checked: dict[str, Any] = {}
    for key, value in options.items():
        dotted = f"{where}.{key}"
        if key in provided:
            raise ConfigError(f"{dotted} is set by polytask and cannot be given as an option.")
        option = schema.options.get(key)
        if option is None:
            if schema.accepts_any:
                checked[key] = value
                continue
            names = list(schema.options)
            raise ConfigError(
                f"unknown option {dotted}.{did_you_mean(str(key), names)} "
                f"Accepted options: {', '.join(names) or '(none)'}."
            )
        try:
            checked[key] = _check(value, option.annotation, option.limit)
        except _Mismatch:
            expected = _describe(option.annotation, option.limit)
            raise ConfigError(f"{dotted}: expected {expected}, found {_show(value)}.") from None
    if schema.budgets:
        merged = {
            n: o.default
            for n, o in schema.options.items()
            if o.default is not inspect.Parameter.empty
        }
        merged.update(checked)
        for budget in schema.budgets:
            try:
                estimate = float(budget.estimate(merged))
            except Exception:  # an option the estimate cannot read is checked by the builder
                continue
            if not estimate <= budget.maximum:
                lowered = ", ".join(f"{where}.{n}" for n in budget.options)
                lower = f"; lower {lowered}" if lowered else ""
                note = f" ({budget.note})" if budget.note else ""
                raise ConfigError(
                    f"{where}: {budget.what} would be {estimate:.3g}, above the limit of "
                    f"{budget.maximum:.3g}{note}{lower}."
                )
    return checked


class _Mismatch(Exception):
    pass


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "true or false values"}


def _describe(tp: Any, limit: Limit | None, plural: bool = False) -> str:
    origin = typing.get_origin(tp)
    rng = limit.describe() if limit is not None else ""
    if origin in (Union, types.UnionType):
        parts = [_describe(a, limit, plural) for a in typing.get_args(tp)]
        return " or ".join(dict.fromkeys(parts))
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if tp in _SCALARS:
        finite = "finite " if tp is float else ""
        if plural:
            return f"{finite}{_PLURALS[tp]}{rng if tp in (int, float) else ''}"
        article = "a " if tp is float else ""
        base = _SCALARS[tp] if tp is not float else "number"
        return f"{article}{finite}{base}{rng if tp in (int, float) else ''}"
    item = _item_type(tp)
    if item is not None:
        length = limit.describe_length() if limit is not None else ""
        fixed = _fixed_tuple(tp)
        if fixed is not None:
            length = f" ({len(fixed)} items)"
            item = fixed[0] if len(set(fixed)) == 1 else Any
        if item is Any:
            return f"lists{length}" if plural else f"a list{length}"
        inner = _describe(item, limit, plural=True)
        return f"lists of {inner}{length}" if plural else f"a list of {inner}{length}"
    if _is_mapping(tp):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is not Any:
            return f"a mapping to {_describe(args[1], limit, plural=True)}"
        return "mappings" if plural else "a mapping"
    return getattr(tp, "__name__", str(tp))


def _item_type(tp: Any) -> Any:
    """The item type of a sequence annotation (Any when unparameterised); None if ``tp``
    is not a sequence."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp in (list, tuple) or tp is Sequence or tp is typing.Sequence:
        return Any
    if origin in (list, tuple, Sequence):
        if not args:
            return Any
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return Any  # a fixed tuple: _fixed_tuple
        return args[0]
    return None


def _fixed_tuple(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if args and not (len(args) == 2 and args[1] is Ellipsis) and args != ((),):
            return args
    return None


def _is_mapping(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return tp in (dict, Mapping) or origin in (dict, Mapping)


def _check(value: Any, tp: Any, limit: Limit | None) -> Any:
    """``value`` as ``tp`` (within ``limit``), or :class:`_Mismatch`."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        # exact types first: ``int | float`` keeps an int, ``float | Mapping`` a float
        for arg in sorted(args, key=lambda a: 0 if _exact(value, a) else 1):
            if arg is type(None):
                continue
            try:
                return _check(value, arg, limit)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if value == allowed and type(value) is type(allowed):
                return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        number = _as_int(value)
        if limit is not None and not limit.accepts(number):
            raise _Mismatch
        return number
    if tp is float:
        real = _as_float(value)
        if limit is not None and not limit.accepts(real):
            raise _Mismatch
        return real
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    item = _item_type(tp)
    if item is not None:
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise _Mismatch
        fixed = _fixed_tuple(tp)
        if fixed is not None:
            if len(value) != len(fixed):
                raise _Mismatch
            items = [_check(v, t, limit) for v, t in zip(value, fixed, strict=True)]
        else:
            if limit is not None and (
                (limit.min_length is not None and len(value) < limit.min_length)
                or (limit.max_length is not None and len(value) > limit.max_length)
            ):
                raise _Mismatch
            items = [_check(v, item, limit) for v in value]
        return type(value)(items)
    if _is_mapping(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        args = typing.get_args(tp)
        key_tp, value_tp = args if len(args) == 2 else (Any, Any)
        return {_check(k, key_tp, None): _check(v, value_tp, limit) for k, v in value.items()}
    return value  # a type polytask does not check (a class, a callable, ...): the builder's


def _exact(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (bool, str):
        return isinstance(value, tp)
    return False


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, str):
        try:
            real = float(value)  # PyYAML reads 1e-4 (no dot) as a string
        except ValueError:
            raise _Mismatch from None
    elif isinstance(value, int | float):
        try:
            real = float(value)
        except OverflowError:
            raise _Mismatch from None
    else:
        raise _Mismatch
    if not math.isfinite(real):
        raise _Mismatch
    return real


def _as_int(value: Any) -> int:
    """An int, or a whole number written as a float (``1e6``, ``1.0e6``)."""
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, int):
        return value
    if isinstance(value, float | str):
        real = _as_float(value)
        if real.is_integer():
            return int(real)
    raise _Mismatch
