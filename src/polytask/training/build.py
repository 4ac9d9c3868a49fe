"""Turn a validated :class:`~polytask.config.Config` into the objects a run needs."""

from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.metadata
import inspect
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..balancing.base import BALANCERS, Balancer
from ..balancing.gradient import GradientBalancer
from ..config import Config, OptimConfig, SchedulerConfig
from ..data.base import DATASETS, DataBundle
from ..errors import ConfigError, DataError
from ..metrics.delta_m import Baseline
from ..models.base import ARCHITECTURES, BACKBONES, HEADS, MultiTaskModel
from ..models.regularizers import REGULARIZERS, RegularizerSpec, attach_regularizers
from ..options import check_options
from ..registry import call_with_options
from ..tasks import Task, check_task_names, main_names

__all__ = [
    "Components",
    "build_components",
    "build_data",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "check_component_options",
    "check_selection",
    "resolve_baseline",
    "resolve_device",
    "resolve_shared",
]


#: the entry-point group of installed plugin packages (imported by every command)
PLUGIN_GROUP = "polytask.plugins"


@functools.cache
def _load_entry_points() -> None:
    """Import every installed ``polytask.plugins`` entry point, once per process."""
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()
        except Exception as exc:
            raise ConfigError(
                f"the installed plugin {entry.name!r} ({entry.value}) failed to load "
                f"({type(exc).__name__}: {exc})."
            ) from None


def _load_plugins(modules: Sequence[str] = (), paths: Sequence[str] = ()) -> None:
    """Import the built-in components, the installed packages' ``polytask.plugins`` entry
    points and the user's ``plugins`` modules (which register theirs), the latter searched
    first in ``paths`` (``plugin_paths``)."""
    from .. import balancing, data, models  # noqa: F401

    _load_entry_points()
    for folder in reversed(paths):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            where = f" or in {', '.join(paths)}" if paths else ""
            raise ConfigError(
                f"plugins: cannot import {name!r} ({exc}); the module must be installed, "
                f"on PYTHONPATH{where} (plugin_paths; a recipe's own folder is searched)."
            ) from None


@dataclass
class Components:
    """Everything one run is made of."""

    config: Config
    bundle: DataBundle
    tasks: dict[str, Task]
    model: MultiTaskModel
    balancer: Balancer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    baseline: Baseline | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device: expected auto, cpu, cuda or cuda:N, found {name!r}."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available; use cpu or auto.")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, found {name!r}.")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "train.precision=fp16 (with loss scaling) needs a CUDA device; on the CPU use bf16 or fp32."
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16 is not supported by this GPU; use fp16 or fp32.")


def build_data(config: Config) -> tuple[DataBundle, dict[str, Task]]:
    """The data bundle and the selected tasks (in the order the config names them)."""
    _load_plugins()
    builder = DATASETS.get(config.data.name)
    bundle = call_with_options(
        builder, config.data.options, where="data.options", schema=DATASETS.schema(config.data.name)
    )
    if not isinstance(bundle, DataBundle):
        raise TypeError(f"data set builder {config.data.name!r} returned {type(bundle).__name__}")
    names = check_task_names(bundle.tasks, config.tasks)
    for split in ("train", "val", "test"):
        data = bundle.split(split)
        if bundle.multi_input != isinstance(data, Mapping):
            raise DataError(
                f"data set {config.data.name!r}: its {split} split must be "
                + (
                    "a mapping {task: Dataset} (multi-input)"
                    if bundle.multi_input
                    else "one Dataset"
                )
                + f", found {type(data).__name__}."
            )
        if isinstance(data, Mapping):
            missing = [n for n in names if n not in data]
            if missing:
                raise DataError(
                    f"data set {config.data.name!r}: its {split} split has no data for task(s) {missing}."
                )
    from ..auxiliary import apply_task_settings

    return apply_task_settings(config.task_settings, bundle, {n: bundle.tasks[n] for n in names})


def build_model(
    config: Config,
    tasks: Mapping[str, Task],
    input_shape: tuple[int, ...],
    steps: Mapping[str, int] | None = None,
) -> MultiTaskModel:
    """The architecture over the backbone, each task's head built by
    :func:`~polytask.auxiliary.task_head_factory` (``steps``: each task's training
    steps, for gradient reversal's schedule)."""
    from ..auxiliary import task_head_factory

    _load_plugins()
    backbone_cls = BACKBONES.get(config.model.backbone)
    schema = BACKBONES.schema(config.model.backbone, BACKBONE_PROVIDED)
    options = check_options(schema, config.model.backbone_options, where="model.backbone_options")
    # Build once now so that bad options fail before training starts.
    call_with_options(
        backbone_cls,
        options,
        where="model.backbone_options",
        provided={"input_shape": input_shape},
        schema=schema,
    )

    def backbone() -> nn.Module:
        module: nn.Module = backbone_cls(input_shape=input_shape, **options)
        return module

    HEADS.get(config.model.head)
    head = task_head_factory(config.model.head, config.task_settings, steps)
    factory = ARCHITECTURES.get(config.model.architecture)
    provided: dict[str, Any] = {"tasks": dict(tasks), "backbone": backbone, "head": head}
    if "input_shape" in inspect.signature(factory).parameters:
        provided["input_shape"] = input_shape  # for architectures that read the raw input
    model = call_with_options(
        factory,
        config.model.options,
        where="model.options",
        provided=provided,
        schema=ARCHITECTURES.schema(config.model.architecture, list(provided)),
    )
    if not isinstance(model, MultiTaskModel):
        raise TypeError(
            f"architecture {config.model.architecture!r} returned {type(model).__name__}"
        )
    return attach_regularizers(
        model,
        [
            RegularizerSpec(r.name, r.weight, r.options, r.parameters, r.layers)
            for r in config.model.regularizers
        ],
        where="model.regularizers",
    )


def build_balancer(config: Config, tasks: Mapping[str, Task]) -> Balancer:
    _load_plugins()
    factory = BALANCERS.get(config.balancer.name)
    balancer = call_with_options(
        factory,
        config.balancer.options,
        where="balancer.options",
        provided={"tasks": list(tasks)},
        schema=BALANCERS.schema(config.balancer.name, BALANCER_PROVIDED),
    )
    if not isinstance(balancer, Balancer):
        raise TypeError(
            f"balancing method {config.balancer.name!r} returned {type(balancer).__name__}"
        )
    if isinstance(balancer, GradientBalancer):
        balancer.gramian_precision = config.balancer.gramian_precision
    return balancer


def build_optimizer(
    cfg: OptimConfig, model: MultiTaskModel, balancer: Balancer, balancer_lr: float | None
) -> torch.optim.Optimizer:
    """One parameter group for the model (architectures may split it), one for the balancer."""
    groups: list[dict[str, Any]] = model.optimizer_param_groups(cfg.lr)
    own = [p for p in balancer.parameters() if p.requires_grad]
    if own:
        lr = balancer_lr if balancer_lr is not None else (balancer.lr or cfg.lr)
        groups.append({"params": own, "lr": lr, "weight_decay": 0.0, "name": "balancer"})
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(cfg: SchedulerConfig, epochs: int, base_lr: float, epoch: int) -> float:
    """The learning-rate multiplier in ``epoch`` (0-based): warm-up, then the schedule."""
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    e = epoch - cfg.warmup_epochs
    if cfg.name == "step":
        return float(cfg.gamma ** (e // cfg.step_size))
    if cfg.name == "multistep":
        return float(cfg.gamma ** sum(1 for m in cfg.milestones if e >= m))
    if cfg.name == "cosine":
        span = max(1, epochs - cfg.warmup_epochs)
        floor = cfg.min_lr / base_lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(e, span) / span))
    return 1.0


def build_scheduler(
    cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, epochs: int, base_lr: float
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.name == "multistep" and sorted(cfg.milestones) != cfg.milestones:
        raise ConfigError(f"optim.scheduler.milestones must be increasing, found {cfg.milestones}.")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg, epochs, base_lr))


def resolve_baseline(spec: str | None, tasks: Mapping[str, Task]) -> Baseline | None:
    """A baseline from a JSON path, or the name of one shipped in ``polytask/data/baselines``."""
    if spec is None:
        return None
    path = Path(spec)
    if not path.suffix and not path.exists():
        shipped = resources.files("polytask.data") / "baselines" / f"{spec}.json"
        if not shipped.is_file():
            raise ConfigError(
                f"eval.baseline: no file {spec!r} and no baseline named {spec!r} ships with polytask."
            )
        path = Path(str(shipped))
    baseline = Baseline.load(path)
    missing = [t for t in baseline.values if t not in tasks]
    if missing:
        raise ConfigError(
            f"eval.baseline {path} has results for task(s) {missing} that this run does not learn."
        )
    # auxiliary tasks are left out of Delta_m: the baseline keeps the tasks that count
    return baseline.only(main_names(tasks))


def resolve_shared(
    model: MultiTaskModel, patterns: list[str] | None
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The parameters a gradient method manipulates, and every other trainable parameter."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if patterns is None:
        ids = {id(p) for p in model.shared_parameters()}
    else:
        ids = set()
        for pattern in patterns:
            matched = [p for n, p in trainable if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                names = ", ".join(n for n, _ in trainable[:6])
                raise ConfigError(
                    f"balancer.shared: pattern {pattern!r} matches no parameter; parameter "
                    f"names look like {names}, ..."
                )
            ids.update(id(p) for p in matched)
    shared = [p for _, p in trainable if id(p) in ids]
    others = [p for _, p in trainable if id(p) not in ids]
    return shared, others


def check_selection(config: Config, tasks: Mapping[str, Task]) -> None:
    """Validate ``train.selection`` against the configuration and the tasks."""
    sel = config.train.selection
    if sel.protocol == "mean_last" and sel.last_n > config.train.epochs:
        raise ConfigError(
            f"train.selection.last_n ({sel.last_n}) exceeds train.epochs ({config.train.epochs})."
        )
    if sel.metric == "delta_m" and config.eval.baseline is None:
        raise ConfigError("train.selection.metric=delta_m needs eval.baseline.")
    if sel.metric in ("loss", "delta_m"):
        return
    task, _, value = sel.metric.partition(".")
    if task in tasks and tasks[task].auxiliary:
        raise ConfigError(
            f"train.selection.metric {sel.metric!r}: task {task!r} is auxiliary, and auxiliary "
            f"tasks are left out of model selection; choose a value of "
            f"{', '.join(main_names(tasks))}, loss or delta_m."
        )
    if task not in tasks:
        raise ConfigError(
            f"train.selection.metric {sel.metric!r}: unknown task {task!r}; expected loss, "
            f"delta_m or TASK.VALUE with a task among {', '.join(tasks)}."
        )
    values = tasks[task].higher_is_better()
    if value not in values:
        raise ConfigError(
            f"train.selection.metric {sel.metric!r}: task {task!r} has the values "
            f"{', '.join(values)}."
        )


#: the arguments polytask passes to builders itself (never options of a config)
DATA_PROVIDED: tuple[str, ...] = ()
BACKBONE_PROVIDED = ("input_shape",)
ARCHITECTURE_PROVIDED = ("tasks", "backbone", "head", "input_shape")
REGULARIZER_PROVIDED = ("tasks", "shapes")
BALANCER_PROVIDED = ("tasks",)


def check_component_options(config: Config) -> None:
    """Check every component's options (data set, backbone, architecture, balancing method)
    against its builder's annotations and declared limits, before anything is built; a
    :class:`ConfigError` names the dotted key (see :mod:`polytask.options`)."""
    _load_plugins(config.plugins, config.plugin_paths)
    checks: list[tuple[Any, str, str, Any, Sequence[str]]] = [
        (DATASETS, config.data.name, "data.options", config.data.options, DATA_PROVIDED),
        (
            BACKBONES,
            config.model.backbone,
            "model.backbone_options",
            config.model.backbone_options,
            BACKBONE_PROVIDED,
        ),
        (
            ARCHITECTURES,
            config.model.architecture,
            "model.options",
            config.model.options,
            _architecture_provided(config.model.architecture),
        ),
        (
            BALANCERS,
            config.balancer.name,
            "balancer.options",
            config.balancer.options,
            BALANCER_PROVIDED,
        ),
    ]
    HEADS.get(config.model.head)  # an unknown head name, before anything is built
    from ..auxiliary import check_task_settings

    check_task_settings(config.task_settings)
    for registry, name, where, options, provided in checks:
        check_options(registry.schema(name, provided), options, where=where, provided=provided)
    for i, reg in enumerate(config.model.regularizers):
        where = f"model.regularizers[{i}]"
        if not reg.name:
            raise ConfigError(
                f"{where}.name: expected the name of a regularizer "
                f"({', '.join(REGULARIZERS.names())}), found {reg.name!r}."
            )
        REGULARIZERS.get(reg.name)
        schema = REGULARIZERS.schema(reg.name, REGULARIZER_PROVIDED)
        check_options(schema, reg.options, where=f"{where}.options", provided=REGULARIZER_PROVIDED)


def _architecture_provided(name: str) -> tuple[str, ...]:
    """What polytask passes to architecture ``name`` (``input_shape`` if it reads it)."""
    params = inspect.signature(ARCHITECTURES.get(name)).parameters
    return tuple(n for n in ARCHITECTURE_PROVIDED if n != "input_shape" or n in params)


def build_components(config: Config) -> Components:
    """Build data, model, balancer, optimizer and scheduler from a configuration."""
    _load_plugins(config.plugins, config.plugin_paths)
    check_component_options(config)
    device = resolve_device(config.train.device)
    check_precision(config.train.precision, device)
    bundle, tasks = build_data(config)
    check_selection(config, tasks)
    baseline = resolve_baseline(config.eval.baseline, tasks)
    torch.manual_seed(config.seed)  # the initial weights depend only on the seed
    steps = None
    if any(s.reversal_schedule == "ganin" for s in config.task_settings.values()):
        from ..auxiliary import task_training_steps

        steps = task_training_steps(
            bundle,
            tasks,
            batch_size=config.data.batch_size,
            drop_last=config.data.drop_last,
            sampling=config.data.sampling,
            epochs=config.train.epochs,
        )
    model = build_model(config, tasks, bundle.input_shape, steps).to(device)
    balancer = build_balancer(config, tasks).to(device)
    if balancer.needs_representation and bundle.multi_input:
        raise ConfigError(
            "feature-level balancing needs single-input data (every batch labelled for every "
            "task); with multi-input data use balancer.options.level=parameter."
        )
    resolve_shared(model, config.balancer.shared)  # fails early on a bad pattern
    if config.balancer.lr is not None and not any(p.requires_grad for p in balancer.parameters()):
        raise ConfigError(
            f"balancer.lr is set but {config.balancer.name!r} has no learnable parameters "
            "for the optimizer; use the method's own options (see balancer.options), or "
            "remove balancer.lr."
        )
    optimizer = build_optimizer(config.optim, model, balancer, config.balancer.lr)
    scheduler = build_scheduler(
        config.optim.scheduler, optimizer, config.train.epochs, config.optim.lr
    )
    return Components(
        config=config,
        bundle=bundle,
        tasks=tasks,
        model=model,
        balancer=balancer,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        baseline=baseline,
    )
