"""What the trainer does for architectures whose structure changes during training.

An architecture that grows (:meth:`polytask.models.MultiTaskModel.adapt`) gets, at the end of
every epoch, a way to evaluate per-sample losses on fixed training samples
(:func:`sample_losses`), without seeing the data set; when it reports a change, the optimizer
and the learning-rate schedule are rebuilt over the new parameters
(:func:`rebuild_optimizer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from ..balancing.base import Balancer
from ..config import Config
from ..data.loading import to_device
from ..errors import ConfigError
from ..evaluation import autocast
from ..models.base import MultiTaskModel
from ..tasks import Task
from .build import build_optimizer, build_scheduler

__all__ = ["rebuild_optimizer", "sample_losses"]


@torch.no_grad()
def sample_losses(
    model: MultiTaskModel,
    tasks: Mapping[str, Task],
    split: Any,
    n: int,
    *,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{task: (losses, labelled)}`` of the model on the first ``n`` samples of ``split``.

    ``losses[i]`` is the task's loss of sample ``i`` alone (``Task.compute_loss`` on a batch
    of that one sample, 0 where it is unlabelled), ``labelled[i]`` its label mask. The model
    runs in evaluation mode (no dropout, BatchNorm statistics untouched) and is put back in
    the mode it was in; no random number is drawn.
    """
    if isinstance(split, Mapping):
        raise ConfigError(
            "an architecture that compares the tasks' per-sample losses needs single-input "
            "data (every sample labelled for every task it has); this data set gives every "
            "task its own samples."
        )
    n = min(n, len(split))
    collate = getattr(split, "collate", None) or default_collate
    losses: dict[str, list[Tensor]] = {t: [] for t in tasks}
    labelled: dict[str, list[Tensor]] = {t: [] for t in tasks}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            batch = collate([split[i] for i in range(start, min(n, start + batch_size))])
            batch = to_device(batch, device)
            with autocast(device, precision):
                preds = model(batch["input"])
            masks = batch.get("mask") or {}
            for name, task in tasks.items():
                pred, target, mask = preds[name].float(), batch["targets"][name], masks.get(name)
                size = target.shape[0]
                for i in range(size):
                    one = None if mask is None else mask[i : i + 1]
                    losses[name].append(task.compute_loss(pred[i : i + 1], target[i : i + 1], one))
                valid = torch.ones(size, dtype=torch.bool) if mask is None else mask.bool()
                labelled[name].append(valid.reshape(size).cpu())
    finally:
        model.train(was_training)
    return {
        t: (torch.stack(losses[t]).detach().float().cpu(), torch.cat(labelled[t])) for t in tasks
    }


def rebuild_optimizer(
    config: Config,
    model: MultiTaskModel,
    balancer: Balancer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A new optimizer over the model's current parameters, and its schedule.

    Parameters that were already there keep their optimizer state (Adam's moments and step
    count, SGD's momentum); new parameters start with none, as at the start of training;
    the state of parameters the model dropped is discarded. Every parameter group keeps its
    current learning rate, and the schedule continues from the same position.
    """
    new = build_optimizer(config.optim, model, balancer, config.balancer.lr)
    if len(new.param_groups) != len(optimizer.param_groups):
        raise RuntimeError(
            f"the model's optimizer parameter groups changed from {len(optimizer.param_groups)} "
            f"to {len(new.param_groups)} with its structure; an adaptive architecture must keep "
            "the same groups"
        )
    for group in new.param_groups:
        for p in group["params"]:
            if p in optimizer.state:
                new.state[p] = optimizer.state[p]
    schedule = build_scheduler(config.optim.scheduler, new, config.train.epochs, config.optim.lr)
    schedule.load_state_dict(scheduler.state_dict())
    for group, old in zip(new.param_groups, optimizer.param_groups, strict=True):
        group["lr"] = old["lr"]
        if "initial_lr" in old:
            group["initial_lr"] = old["initial_lr"]
    return new, schedule
