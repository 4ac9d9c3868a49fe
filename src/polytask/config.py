"""Configuration: YAML recipes plus ``key=value`` overrides, validated into typed objects.

A recipe is a YAML mapping whose keys mirror :class:`Config`. Validation is strict: an
unknown key, a value of the wrong type or out of range is a :class:`~polytask.errors.ConfigError`
naming the dotted key, what was expected and what was found. Component options
(``data.options``, ``model.options``, ``balancer.options``, ...) are checked against the
component's own signature when it is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from .errors import ConfigError, did_you_mean
from .yamlio import MAX_DEPTH, load_text, read_mapping, short

__all__ = [
    "BalancerConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "RegularizerConfig",
    "SchedulerConfig",
    "SelectionConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "parse_overrides",
    "to_dict",
]


#: the largest float32: a learning rate above it is infinite in the optimizer's float32 math
FLOAT32_MAX = 3.4028234663852886e38


def _range(*, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    return {"ge": ge, "gt": gt, "le": le}


@dataclass
class DataConfig:
    """Which data set, its options, and how batches are drawn."""

    name: str = "multidigits"
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = field(default=64, metadata=_range(ge=1))
    eval_batch_size: int | None = field(default=None, metadata=_range(ge=1))
    num_workers: int = field(default=0, metadata=_range(ge=0))
    drop_last: bool = False
    #: multi-input mode only: how each step's batches are drawn from the tasks' data sets
    sampling: Literal["all", "round_robin", "proportional"] = "all"


@dataclass
class RegularizerConfig:
    """A penalty over the task-specific layers of any architecture (``model.regularizers``)."""

    #: a regulariser registered in ``polytask.models.regularizers.REGULARIZERS``
    name: str = ""
    weight: float = field(default=1e-3, metadata=_range(ge=0))
    options: dict[str, Any] = field(default_factory=dict)
    #: a shell pattern of the task parameters read, ``{task}`` standing for the task's name
    #: (e.g. ``heads.{task}.*``); None: all of the task's parameters
    parameters: str | None = None
    #: which of the task's selected weights (two or more dimensions, in order) are read
    layers: list[int] = field(default_factory=lambda: [0])


@dataclass
class ModelConfig:
    """The architecture (how tasks share), the backbone it wraps, and the heads."""

    architecture: str = "hps"
    options: dict[str, Any] = field(default_factory=dict)
    backbone: str = "small_cnn"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    #: the prediction head of every task: linear, mlp, segnet (dense), or a registered name
    head: str = "linear"
    #: penalties over the tasks' own layers, added to the architecture's (group lasso, a
    #: learned task covariance, ...)
    regularizers: list[RegularizerConfig] = field(default_factory=list)


@dataclass
class BalancerConfig:
    """The balancing method and its options."""

    name: str = "equal"
    options: dict[str, Any] = field(default_factory=dict)
    #: gradient methods: names (shell-style patterns) of the parameters whose per-task
    #: gradients the method combines, replacing the architecture's shared parameters
    #: (e.g. ``["encoder.*"]``); None: the architecture's declaration
    shared: list[str] | None = None
    #: gradient methods: precision of the Gramian J J^T of the per-task gradients: float64
    #: (exact for the given gradients) or float32 (about 3x cheaper on a CPU; float32
    #: rounding in its entries)
    gramian_precision: Literal["float64", "float32"] = "float64"
    #: gradient methods on several processes: ``global`` combines the global per-task
    #: gradients (the single-process method); ``local`` combines each process's own and
    #: averages the results (cheaper, another method; see docs/distributed.md)
    distributed: Literal["global", "local"] = "global"
    #: learning rate of the method's own learnable parameters (None: the method's default,
    #: else the model's)
    lr: float | None = field(default=None, metadata=_range(gt=0, le=FLOAT32_MAX))


@dataclass
class SchedulerConfig:
    """Learning-rate schedule, stepped once per epoch.

    ``warmup_epochs`` ramp the rate up linearly; the schedule's epochs (``step_size``,
    ``milestones``, the cosine period) count from the end of the warm-up.
    """

    name: Literal["none", "step", "multistep", "cosine"] = "none"
    step_size: int = field(default=100, metadata=_range(ge=1))
    milestones: list[int] = field(default_factory=list)
    gamma: float = field(default=0.5, metadata=_range(gt=0))
    min_lr: float = field(default=0.0, metadata=_range(ge=0))
    warmup_epochs: int = field(default=0, metadata=_range(ge=0))


@dataclass
class OptimConfig:
    """Optimizer, gradient clipping and schedule."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = field(default=1e-3, metadata=_range(gt=0, le=FLOAT32_MAX))
    weight_decay: float = field(default=0.0, metadata=_range(ge=0))
    momentum: float = field(default=0.9, metadata=_range(ge=0, le=1))
    grad_clip: float | None = field(default=None, metadata=_range(gt=0))
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class SelectionConfig:
    """How the reported model is chosen, always on the validation split.

    - ``best``: the epoch with the best validation ``metric``; test is evaluated on it;
    - ``last``: the last epoch;
    - ``mean_last``: the papers' protocol: test metrics averaged over the last ``last_n``
      epochs (test is evaluated in each of them, but never used to choose anything).

    ``metric`` is ``loss`` (sum of the unweighted validation losses), ``delta_m`` (needs
    ``eval.baseline``) or ``TASK.VALUE`` such as ``left.accuracy``.
    """

    protocol: Literal["best", "last", "mean_last"] = "best"
    metric: str = "loss"
    last_n: int = field(default=10, metadata=_range(ge=1))


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = field(default=10, metadata=_range(ge=1))
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    deterministic: bool = False
    #: also checkpoint every N optimizer steps inside an epoch (None: at epoch ends only)
    checkpoint_every_steps: int | None = field(default=None, metadata=_range(ge=1))
    progress: bool = True
    tensorboard: bool = False
    selection: SelectionConfig = field(default_factory=SelectionConfig)


@dataclass
class EvalConfig:
    """Evaluation and Delta_m."""

    #: a baseline JSON file (see polytask.metrics.Baseline), or the name of a baseline
    #: shipped with polytask; None: no Delta_m
    baseline: str | None = None
    delta_m: Literal["metric_mean", "task_mean"] = "metric_mean"


@dataclass
class TaskConfig:
    """Settings of one task, ``task_settings.NAME``: a task of the data set, or one added.

    See docs/configuration.md ("Task settings") and docs/concepts.md ("Auxiliary tasks").
    """

    #: add a task the data set lacks, built by a builder registered in
    #: ``polytask.auxiliary.AUXILIARY_TASKS`` (``reconstruction``: the input itself;
    #: ``hint``: a feature of the input); None: a task of the data set
    add: str | None = None
    #: keyword arguments of that builder
    options: dict[str, Any] = field(default_factory=dict)
    #: trained and reported, but left out of model selection, Delta_m and grid comparisons;
    #: None: true for an added task, the data set's declaration otherwise
    auxiliary: bool | None = None
    #: this task's head (a name in ``polytask.models.HEADS``); None: the task's own, else
    #: ``model.head``
    head: str | None = None
    #: keyword arguments of that head
    head_options: dict[str, Any] = field(default_factory=dict)
    #: gradient reversal (Ganin and Lempitsky 2015) between the shared layers and this task's
    #: head: the head learns the task, the shared layers receive its gradient times -lambda;
    #: this is lambda (None: no reversal)
    reversal: float | None = field(default=None, metadata=_range(ge=0))
    #: ``constant`` lambda, or ``ganin``: lambda * (2 / (1 + exp(-10 p)) - 1), p the
    #: training progress in [0, 1]
    reversal_schedule: Literal["constant", "ganin"] = "constant"


@dataclass
class Config:
    """A whole training recipe."""

    name: str = "run"
    #: seeds every random generator: 0 to 2**32-1 (it is combined with epoch and worker
    #: numbers into the 64-bit seeds of the batch order and the loader workers)
    seed: int = field(default=0, metadata=_range(ge=0, le=2**32 - 1))
    #: Python modules to import before building (they register your own architectures,
    #: backbones, balancing methods or data sets), e.g. ``[my_project.mtl]``
    plugins: list[str] = field(default_factory=list)
    #: folders searched first for the ``plugins`` modules. A recipe file that names plugins
    #: adds its own folder, and relative entries are taken from the recipe's folder; the run's
    #: config.yaml records absolute paths, so resume and eval find the plugins again from any
    #: working directory, without PYTHONPATH
    plugin_paths: list[str] = field(default_factory=list)
    #: the tasks to learn (None: every task of the data set)
    tasks: list[str] | None = None
    #: per task, by name: auxiliary, its own head, gradient reversal, or a task to add
    task_settings: dict[str, TaskConfig] = field(default_factory=dict)
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# -- validation ---------------------------------------------------------------------------

C = TypeVar("C")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:
            return _convert(value, non_null[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, found {value!r}.")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = did_you_mean(str(value), [str(a) for a in allowed])
            raise ConfigError(
                f"{key}: expected one of {', '.join(map(str, allowed))}, found {value!r}.{hint}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, found {value!r}.")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, found {value!r}.")
        item_type = typing.get_args(tp)[-1] if typing.get_args(tp) else Any
        if dataclasses.is_dataclass(item_type):  # a mapping of named sections
            return {str(k): from_dict(item_type, v, f"{key}.{k}") for k, v in value.items()}  # type: ignore[arg-type]
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, found {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, found {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads ``1e-4`` (no dot) as a string; accept any float literal.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, found {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, found {value!r}.")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond every float
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, found {value!r}.")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, found {value!r}.")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in the schema


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None or not isinstance(value, int | float):
        return
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if ge is not None and value < ge:
        raise ConfigError(f"{key}: expected a value >= {ge}, found {value!r}.")
    if gt is not None and value <= gt:
        raise ConfigError(f"{key}: expected a value > {gt}, found {value!r}.")
    if le is not None and value > le:
        raise ConfigError(f"{key}: expected a value <= {le}, found {value!r}.")


def from_dict(cls: type[C], data: Any, prefix: str = "") -> C:
    """Build the dataclass ``cls`` from a mapping, validating every key and value."""
    where = prefix or "the configuration"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, found {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            allowed = ", ".join(fields)
            raise ConfigError(
                f"unknown key {dotted!r}.{did_you_mean(str(key), fields)} "
                f"Allowed keys{' in ' + prefix if prefix else ''}: {allowed}."
            )
        converted = _convert(value, hints[key], dotted)
        _check_range(converted, fields[key].metadata, dotted)
        kwargs[key] = converted
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain mapping (YAML-serialisable) of a config dataclass."""
    result: dict[str, Any] = dataclasses.asdict(config)
    return result


#: the longest dotted key an override may have
MAX_KEY_LENGTH = 200


def _check_key(dotted: Any, where: str) -> list[str]:
    """The parts of a dotted override key, or a :class:`ConfigError` saying what is wrong."""
    if not isinstance(dotted, str):
        raise ConfigError(
            f"{where}: the key {short(dotted)} is not a dotted name; write it as a string, "
            "e.g. optim.lr."
        )
    if len(dotted) > MAX_KEY_LENGTH:
        raise ConfigError(f"{where}: the key is longer than {MAX_KEY_LENGTH} characters.")
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(
            f"{where}: the key {short(dotted)} has an empty part (a leading, trailing or "
            "doubled dot); keys are dotted names, e.g. optim.lr."
        )
    if len(parts) > MAX_DEPTH:
        raise ConfigError(f"{where}: the key nests deeper than {MAX_DEPTH} levels.")
    if not all(p.isprintable() and not any(c.isspace() for c in p) for p in parts):
        raise ConfigError(
            f"{where}: the key {short(dotted)} contains a space or a character that is not "
            "printable text; keys are dotted names, e.g. optim.lr."
        )
    return parts


def _quote_hint(key: str, raw: str) -> str:
    if len(raw) <= 80 and raw.isprintable():
        quoted = raw.replace("'", "''")
        return (
            f" To pass it as a string, quote it for YAML inside the shell's quotes: "
            f"\"{key}='{quoted}'\"."
        )
    return " To pass it as a string, quote it for YAML inside the shell's quotes: \"KEY='...'\"."


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}`` with values parsed as YAML (under the
    limits of :mod:`polytask.yamlio`); every malformed override is a :class:`ConfigError`."""
    if isinstance(overrides, str | bytes):
        raise ConfigError(
            f"overrides {short(overrides)}: expected a list of KEY=VALUE strings, not one string."
        )
    parsed: dict[str, Any] = {}
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {short(item)}: expected a KEY=VALUE string.")
        where = f"override {short(item)}"
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{where}: expected KEY=VALUE, e.g. optim.lr=0.001.")
        _check_key(key, where)
        if not raw.strip():
            parsed[key] = None
            continue
        parsed[key] = load_text(raw, f"{where}: its value", syntax_hint=_quote_hint(key, raw))
    return parsed


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested mapping (a copy is returned; validation happens later)."""
    import copy

    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of settings, found {short(data)}.")
    if not isinstance(overrides, Mapping):
        raise ConfigError(
            f"overrides: expected a mapping of dotted keys, found {short(overrides)}."
        )
    try:
        result = copy.deepcopy(dict(data))
    except RecursionError:
        raise ConfigError(f"the settings nest deeper than {MAX_DEPTH} levels.") from None
    for dotted, value in overrides.items():
        parts = _check_key(dotted, f"override {short(dotted)}")
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"override {short(dotted)}: {prefix!r} is not a mapping (it holds "
                    f"{short(child, 60)}), so it has no key {parts[i + 1]!r}."
                )
            node = child
        node[parts[-1]] = value
    return result


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file (see :mod:`polytask.yamlio` for the
    rules and limits)."""
    return read_mapping(path)


def load_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> Config:
    """A validated :class:`Config` from a YAML path or a mapping, plus overrides."""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = read_yaml(source)
    parsed = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    data = apply_overrides(data, parsed)
    if source is not None and not isinstance(source, Mapping):
        data = anchor_plugin_paths(data, Path(source).parent)
    return from_dict(Config, data)


def anchor_plugin_paths(data: Mapping[str, Any], folder: str | Path) -> dict[str, Any]:
    """``data`` with its ``plugin_paths`` made absolute against ``folder`` (a recipe file's
    folder), and ``folder`` itself added when ``plugins`` are named; unchanged otherwise
    (values of the wrong type are left for validation to report)."""
    plugins, paths = data.get("plugins"), data.get("plugin_paths")
    if not plugins and not paths:
        return dict(data)
    if paths is not None and not isinstance(paths, list):
        return dict(data)
    base = Path(folder).resolve()
    resolved = [str(base / p) if isinstance(p, str) else p for p in paths or []]
    resolved = [os.path.normpath(p) if isinstance(p, str) else p for p in resolved]
    if plugins and str(base) not in resolved:
        resolved.append(str(base))
    return {**data, "plugin_paths": resolved}
