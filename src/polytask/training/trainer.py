"""The training loop: balanced multi-task steps, exact resume, model selection on val.

One :class:`Trainer` drives one run directory. Everything that determines what happens
next (weights, optimizer, schedule, balancer state, random states, epoch, position in the
epoch and the epoch's running sums) is in the checkpoint, so a run killed at any point and
resumed from its last checkpoint continues exactly as if it had not stopped (bit for bit
on the CPU in deterministic mode).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from ..balancing.base import BackwardContext
from ..balancing.gradient import GradientBalancer
from ..config import Config
from ..data.checks import check_step
from ..data.loading import epoch_schedule, iterate_batches, to_device
from ..errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from ..evaluation import (
    EvalResult,
    autocast,
    chance_level,
    evaluate,
    forward_step,
    split_datasets,
)
from ..metrics.delta_m import delta_m, delta_m_higher_is_better
from ..models.base import AdaptContext, MultiTaskModel, capture_representation
from ..models.reversal import advance_reversals, reversal_schedules
from ..progress import Progress
from ..tasks import auxiliary_names, main_names
from .build import Components, check_selection, resolve_shared
from .checkpoint import (
    FORMAT,
    load_checkpoint,
    load_model_state,
    model_signature,
    save_atomic,
)
from .distributed import Distributed, JacobianSync, check_shards, shard_step
from .rundir import RunDirectory
from .seeding import capture_rng_state, restore_rng_state, seed_everything, set_deterministic
from .stopping import RunStopped, set_current_run, stop_requested
from .structure import rebuild_optimizer, sample_losses

__all__ = ["INSPECTION_SAMPLES", "StepEnd", "Trainer"]

MANY_TASKS = 5
"""From this many tasks, a gradient method at the parameter level warns of its cost per step."""
INSPECTION_SAMPLES = 8
"""Validation samples (the first ones) that the architecture's ``inspect`` hook sees at the end."""


@dataclass
class StepEnd:
    """What a step-end callback receives."""

    epoch: int
    step_in_epoch: int
    global_step: int
    losses: dict[str, Tensor]
    weights: dict[str, Tensor]


@dataclass
class _State:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    train_time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Train the components of one run into its run directory.

    Args:
        components: what :func:`~polytask.training.build.build_components` built.
        run: the run directory (created by the caller; see :mod:`.rundir`).
        step_callbacks: called after every optimizer step with a :class:`StepEnd`.
        console: also log to stderr.
        distributed: the process group of a data-parallel run (see :mod:`.distributed`);
            only its rank 0 writes the run directory.
    """

    def __init__(
        self,
        components: Components,
        run: RunDirectory,
        *,
        step_callbacks: Sequence[Callable[[StepEnd], None]] = (),
        console: bool = True,
        distributed: Distributed | None = None,
    ) -> None:
        self.c = components
        self.cfg: Config = components.config
        self.run = run
        self.step_callbacks = list(step_callbacks)
        self.dist = distributed if distributed is not None else Distributed()
        if self.dist.is_writer:
            self.log = run.logger(console=console)
        else:  # the other ranks write nothing, not even a log
            self.log = logging.getLogger(f"polytask.rank{self.dist.rank}")
            self.log.propagate = False
            if not self.log.handlers:
                self.log.addHandler(logging.NullHandler())
        if self.dist.active:
            components.balancer.loss_reducer = self.dist.mean_losses
            if (
                isinstance(components.balancer, GradientBalancer)
                and self.cfg.balancer.distributed == "global"
            ):  # local: each process combines its own rows (see docs/distributed.md)
                components.balancer.collective = JacobianSync(self.dist)
        self._factors: Tensor | None = None
        self._group_of: tuple[Any, dict[int, int]] | None = None
        self.state = _State()
        self.scaler = (
            torch.amp.GradScaler(components.device.type)
            if self.cfg.train.precision == "fp16"
            else None
        )
        check_selection(self.cfg, components.tasks)
        _check_batch_parts(components.balancer, self.cfg.balancer.name)
        self._tb: Any = None
        self._shared, self._others = resolve_shared(components.model, self.cfg.balancer.shared)
        self._reversals = reversal_schedules(components.model)
        self._reset_accumulators()
        # what every batch is checked against (see polytask.data.checks)
        self._input_shape = tuple(components.bundle.input_shape)
        self._integer_inputs = any(
            getattr(m, "integer_inputs", False) for m in components.model.modules()
        )

    # -- set-up --------------------------------------------------------------------------
    def _reset_accumulators(self) -> None:
        dev = self.c.device
        names = list(self.c.tasks)
        k = len(names)
        self._acc: dict[str, Tensor] = {
            "loss_sum": torch.zeros(k, dtype=torch.float64, device=dev),
            "loss_count": torch.zeros(k, dtype=torch.float64, device=dev),
            "weight_sum": torch.zeros(k, dtype=torch.float64, device=dev),
            "weight_count": torch.zeros(k, dtype=torch.float64, device=dev),
            # gradient diagnostics of gradient-level methods (steps where every task is present)
            "grad_norm_sum": torch.zeros(k, dtype=torch.float64, device=dev),
            "cosine_sum": torch.zeros(k, k, dtype=torch.float64, device=dev),
            "diag_count": torch.zeros((), dtype=torch.float64, device=dev),
        }

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "format": FORMAT,
            "model": self.c.model.state_dict(),
            "model_signature": model_signature(self.c.model),
            "optimizer": self.c.optimizer.state_dict(),
            "scheduler": self.c.scheduler.state_dict(),
            "balancer": self.c.balancer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_state(),
            "epoch": s.epoch,
            "step_in_epoch": s.step_in_epoch,
            "global_step": s.global_step,
            "best_score": s.best_score,
            "best_epoch": s.best_epoch,
            "train_time_s": s.train_time_s,
            "history": s.history,
            "accumulators": {k: v.cpu() for k, v in self._acc.items()},
        } | _structure(self.c.model)

    def save_checkpoint(self) -> None:
        """Write ``last.pt``, never with a NaN or infinite tensor: a diverged model or
        optimizer state raises :class:`TrainingDiverged` and the last good checkpoint stays.
        Only rank 0 writes (every rank holds the same state)."""
        if not self.dist.is_writer:
            return
        state = self.checkpoint_state()
        bad = _non_finite(state["model"], "model") or _non_finite(state["optimizer"], "optimizer")
        if bad is not None:
            raise TrainingDiverged(
                self._diverged(
                    f"{bad} holds NaN or infinite values",
                    f"after global step {self.state.global_step}",
                )
            )
        save_atomic(state, self.run.last_checkpoint)

    def _diverged(self, what: str, at: str | None = None) -> str:
        """The message of a divergence: where, what the run directory keeps, the remedy."""
        s = self.state
        lr = self.cfg.optim.lr
        kept = (
            f"{self.run.path} keeps its last good checkpoint, but resuming it repeats the "
            "divergence: resume continues with the same learning rate (restored with the "
            "optimizer's state; a changed optim.lr makes another run). "
            if self.run.last_checkpoint.exists()
            else "no checkpoint had been written yet. "
        )
        if at is None:
            at = (
                f"at epoch {s.epoch + 1}, step {s.step_in_epoch + 1} (global step "
                f"{s.global_step + 1})"
            )
        return (
            f"{what} {at}. Training stopped; {kept}Start a new run with a lower "
            f"optim.lr (this run: {lr:g}) or with optim.grad_clip, e.g. "
            f"`polytask train RECIPE optim.lr={lr / 10:g}`."
        )

    def load_checkpoint(self) -> None:
        """Restore everything from the run's ``last.pt``."""
        path = self.run.last_checkpoint
        data = load_checkpoint(path)
        try:
            load_model_state(self.c.model, data, path)  # its structure first, if it grew
            if data.get("structure") is not None:  # an optimizer over the grown model's
                self._structure_changed()
            self.c.optimizer.load_state_dict(data["optimizer"])
            self.c.scheduler.load_state_dict(data["scheduler"])
            self.c.balancer.load_state_dict(data["balancer"])
            if self.scaler is not None and data["scaler"] is not None:
                self.scaler.load_state_dict(data["scaler"])
            self.state = _State(
                epoch=int(data["epoch"]),
                step_in_epoch=int(data["step_in_epoch"]),
                global_step=int(data["global_step"]),
                best_score=data["best_score"],
                best_epoch=data["best_epoch"],
                train_time_s=float(data["train_time_s"]),
                history=list(data["history"]),
            )
            self._acc = {k: v.to(self.c.device) for k, v in data["accumulators"].items()}
            restore_rng_state(data["rng"])
        except CheckpointError:  # already says what does not match (the model's signature)
            raise
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {path} does not match this run ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]})."
            ) from None

    # -- training ------------------------------------------------------------------------
    def fit(self, *, resume: bool = False) -> dict[str, Any]:
        """Train to the configured number of epochs, then evaluate; returns the results."""
        cfg = self.cfg
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        set_deterministic(cfg.train.deterministic)
        seed_everything(cfg.seed)
        try:
            if resume:
                if self.dist.is_writer:
                    for stale in self.run.remove_stale_temporaries():
                        self.log.info(f"removed {stale}, the temporary file of a write cut short")
                self.load_checkpoint()
                if self.dist.is_writer:
                    for note in self.run.truncate_metrics(self.state.epoch):
                        self.log.warning(note)
                self.log.info(
                    f"resuming {self.run.path} at epoch {self.state.epoch + 1}, "
                    f"step {self.state.step_in_epoch}"
                )
            else:
                if self.c.bundle.info.get("val_is_test") and cfg.train.selection.protocol == "best":
                    self.log.warning(
                        f"data set {cfg.data.name!r} validates on its test split "
                        "(data.options.val_size is 0), and train.selection.protocol is best: "
                        "the epoch is chosen on the test split, so the test results are "
                        "optimistic. Hold out a validation split (data.options.val_size) or "
                        "use selection last or mean_last, as the papers' protocols do."
                    )
                groups = self.c.model.describe()
                self.log.info(
                    f"run {self.run.path}: {cfg.model.architecture} / {cfg.balancer.name} on "
                    f"{cfg.data.name} tasks {list(self.c.tasks)}; parameters {groups}; "
                    f"device {self.c.device}, precision {cfg.train.precision}"
                )
                self._log_cost()
            set_current_run(self.run.path, self.run.last_checkpoint)
            try:
                self._stop_if_requested()
                while self.state.epoch < cfg.train.epochs:
                    self._train_epoch()
                    self._stop_if_requested(saved=True)
                results = self.finish()
            except DataError as exc:
                raise DataError(f"{exc} {self._left_behind()}") from None
        finally:
            set_current_run(None)
            set_deterministic(was_deterministic)
            if self._tb is not None:
                self._tb.close()
            self.run.close_logger()
        return results

    def _left_behind(self) -> str:
        """What a run stopped by bad data leaves behind, in words."""
        if not self.run.last_checkpoint.exists():
            return (
                f"The run stopped before its first checkpoint: {self.run.path} cannot be "
                "resumed; fix the data and start it again with `polytask train`."
            )
        return (
            f"The run stopped; {self.run.path} keeps its last checkpoint: fix the data and "
            f"`polytask resume {self.run.path}` goes on from there."
        )

    def _stop_if_requested(self, *, saved: bool = False, steps: int | None = None) -> None:
        """At a safe point (between steps, between epochs): if a signal asked to stop (see
        :mod:`.stopping`), write a checkpoint where one is needed and raise
        :class:`~.stopping.RunStopped`.

        A checkpoint is written at the stop when ``train.checkpoint_every_steps`` is set, or
        when the run has none yet; otherwise the last checkpoint (the end of the last epoch)
        stands and the steps of the epoch in progress are trained again on resume. Either way
        the resumed run equals an uninterrupted one bit for bit: a checkpoint holds the
        position in the epoch, its running sums and every random state.
        """
        signum = self._stop_signal()
        if signum is None:
            return
        s, every = self.state, self.cfg.train.checkpoint_every_steps
        name = RunStopped(signum).signal_name
        at = f"epoch {s.epoch + 1}, step {s.step_in_epoch}" + (
            f" of {steps}" if steps is not None else ""
        )
        if not saved and (every or not self.run.last_checkpoint.exists()):
            self.save_checkpoint()
            saved = True
        if saved:
            detail = f"a checkpoint at {at}"
        else:
            detail = (
                f"its checkpoint at the end of epoch {s.epoch} (the {s.step_in_epoch} steps "
                f"of epoch {s.epoch + 1} are trained again; set train.checkpoint_every_steps "
                "to keep them)"
            )
        self.log.warning(f"stopped by {name} at {at}; resume goes on from {detail}")
        raise RunStopped(signum, run_path=self.run.path, detail=detail)

    def _stop_signal(self) -> int | None:
        """The signal that asked to stop, agreed by every process (one collective per call
        in a data-parallel run: all processes stop at the same step)."""
        signum = stop_requested()
        if not self.dist.active:
            return signum
        flag = torch.tensor([signum or 0], dtype=torch.int64)
        self.dist.all_reduce_max(flag)
        return int(flag) or None

    def _log_cost(self) -> None:
        """State what a step of a gradient method costs, before it is paid: a warning at the
        parameter level with :data:`MANY_TASKS` tasks or more, else a line of the log."""
        balancer = self.c.balancer
        if not isinstance(balancer, GradientBalancer):
            return
        text = balancer.cost(self.cfg.balancer.name)
        if balancer.level == "parameter" and len(balancer.task_names) >= MANY_TASKS:
            self.log.warning(text)
        else:
            self.log.info(text)

    def _train_epoch(self) -> None:
        cfg, c, s = self.cfg, self.c, self.state
        epoch = s.epoch
        if s.step_in_epoch == 0:
            self._reset_accumulators()
            c.balancer.on_epoch_start(epoch)
        datasets = split_datasets(c.bundle.train, c.tasks)
        sizes = {k: len(d) for k, d in datasets.items()}
        steps = epoch_schedule(
            sizes,
            batch_size=cfg.data.batch_size,
            seed=cfg.seed,
            epoch=epoch,
            drop_last=cfg.data.drop_last,
            strategy=cfg.data.sampling,
        )
        local_steps = steps
        if self.dist.active:
            check_shards(steps, self.dist.world, f"epoch {epoch + 1} of the train split")
            local_steps = [shard_step(st, self.dist.rank, self.dist.world) for st in steps]
        start = s.step_in_epoch
        c.model.train()
        started = time.perf_counter()
        bar = Progress(
            len(steps),
            f"epoch {epoch + 1}/{cfg.train.epochs}",
            enabled=cfg.train.progress,
            log=self.log.info,
            initial=start,
        )
        batches_iter = _step_parts(
            datasets,
            local_steps[start:],
            max(1, int(c.balancer.batch_parts)),
            num_workers=cfg.data.num_workers,
            seed=cfg.seed * 100_003 + epoch,
            pin_memory=c.device.type == "cuda",
        )
        every = cfg.train.checkpoint_every_steps
        for parts in batches_iter:
            for part_step, batches in parts:
                check_step(
                    batches,
                    part_step,
                    c.tasks,
                    split="train",
                    where=f"epoch {epoch + 1}, step {s.step_in_epoch + 1}",
                    input_shape=self._input_shape,
                    integer_inputs=self._integer_inputs,
                )
            self._train_step([batches for _, batches in parts])
            s.step_in_epoch += 1
            s.global_step += 1
            bar.update(1)
            if every and s.global_step % every == 0 and s.step_in_epoch < len(steps):
                s.train_time_s += time.perf_counter() - started
                started = time.perf_counter()
                self.save_checkpoint()
            if s.step_in_epoch < len(steps) and self._stop_signal() is not None:
                s.train_time_s += time.perf_counter() - started
                started = time.perf_counter()
                self._stop_if_requested(
                    saved=bool(every and s.global_step % every == 0), steps=len(steps)
                )
        bar.close()
        s.train_time_s += time.perf_counter() - started
        self._end_epoch(epoch)

    def _train_step(self, parts: Sequence[Mapping[str, Any]]) -> None:
        """One optimizer step on one batch, given as its parts (one part unless the balancer
        asks for more: :attr:`~polytask.balancing.base.Balancer.batch_parts`)."""
        c, s = self.c, self.state
        names = list(c.tasks)
        parts = [to_device(b, c.device) for b in parts]
        batches = parts[0]
        c.optimizer.zero_grad(set_to_none=True)
        with (
            capture_representation(c.model, c.balancer.needs_representation) as representation,
            autocast(c.device, self.cfg.train.precision),
        ):
            part_outputs = [list(forward_step(c.model, c.tasks, b)) for b in parts]
        part_losses: list[dict[str, Tensor]] = []
        part_counts: list[dict[str, Tensor]] = []
        masked = False
        for outputs in part_outputs:
            losses: dict[str, Tensor] = {}
            counts: dict[str, Tensor] = {}
            for name, pred, target, mask in outputs:
                losses[name] = c.tasks[name].compute_loss(pred.float(), target, mask)
                if mask is None:
                    counts[name] = torch.tensor(float(target.shape[0]), device=c.device)
                else:
                    masked = True
                    counts[name] = mask.sum().to(torch.float64)
            part_losses.append(losses)
            part_counts.append(counts)
        del outputs, part_outputs
        losses, counts = part_losses[0], part_counts[0]
        tasks_here = list(losses)
        stacked = torch.stack(
            [part[t].detach().float() for part in part_losses for t in tasks_here]
        )
        if not bool(torch.isfinite(stacked).all()):
            values = stacked.view(len(part_losses), len(tasks_here)).tolist()
            bad = [
                t for i, t in enumerate(tasks_here) if not all(math.isfinite(v[i]) for v in values)
            ]
            raise TrainingDiverged(
                self._diverged(
                    f"the loss of task(s) {', '.join(repr(b) for b in bad)} is "
                    f"{[v[tasks_here.index(b)] for v in values for b in bad]}"
                )
            )
        sums: dict[str, Tensor] | None = None
        k = len(tasks_here)
        if self.dist.active:
            # the step's global counts and loss sums of every part (one collective); each
            # process's loss is rescaled so that the mean over processes of any gradient is the
            # single-process one
            local_n = torch.stack([part[t].double() for part in part_counts for t in tasks_here])
            both = torch.cat([local_n, local_n * stacked.double()])
            self.dist.all_reduce_sum(both)
            n = local_n.numel()
            total_n = both[:n]
            factors = local_n * self.dist.world / total_n.clamp_min(1.0)
            self._factors = factors  # part p's tasks at [p * k, (p + 1) * k)
            # the value of each loss is the global one (what the balancer reads: a method whose
            # weights depend on the losses' values, such as FAMO's log, sees the single-process
            # values), its gradient this process's share of the global gradient
            means = both[n:] / total_n.clamp_min(1.0)
            for p, part in enumerate(part_losses):
                for i, t in enumerate(tasks_here):
                    j = p * k + i
                    scaled = part[t] * factors[j].to(part[t].dtype)
                    part[t] = scaled - scaled.detach() + means[j].to(scaled.dtype)
            global_sums = both[n:].view(len(part_losses), k).sum(dim=0)
            global_counts = total_n.view(len(part_losses), k)
            sums = {t: global_sums[i] for i, t in enumerate(tasks_here)}
            part_counts = [
                {t: global_counts[p, i] for i, t in enumerate(tasks_here)}
                for p in range(len(part_losses))
            ]
            losses, counts = part_losses[0], part_counts[0]
        if len(part_losses) > 1:  # the whole batch's loss: the parts' sample-weighted mean
            counts = {t: torch.stack([part[t] for part in part_counts]).sum() for t in tasks_here}
            losses = {
                t: torch.stack(
                    [
                        part[t] * (n_part[t] / counts[t].clamp_min(1.0)).to(part[t].dtype)
                        for part, n_part in zip(part_losses, part_counts, strict=True)
                    ]
                ).sum()
                for t in tasks_here
            }
        present = losses
        if masked:  # a task without any label in this batch contributes nothing to it
            labelled = torch.stack([counts[t] for t in losses]).tolist()
            present = {t: losses[t] for t, n in zip(losses, labelled, strict=True) if n > 0}
        weights: dict[str, Tensor] = {}
        if present:
            ctx = BackwardContext(
                shared_parameters=self._shared,
                other_parameters=self._others,
                grad_scaler=self.scaler,
                epoch=s.epoch,
                step=s.global_step,
                representation=representation,
                parts=[{t: part[t] for t in present} for part in part_losses]
                if len(part_losses) > 1
                else (),
                recompute=functools.partial(self._recompute, parts, present),
                learning_rate=self._learning_rate,
            )
            penalty = c.model.regularization()
            if penalty is not None:
                # keep the graph: a penalty on activations (sluice) shares it with the losses
                ctx.scale(penalty).backward(retain_graph=True)  # type: ignore[no-untyped-call]
            weights = c.balancer.backward(present, ctx)
            del representation, part_losses
            if self.dist.active:
                self.dist.average_gradients(self._averaged_parameters())
            gram = c.balancer.diagnostics().get("gramian")
            if gram is not None and len(present) == len(names):
                norms = gram.diagonal().clamp_min(0).sqrt().double()
                self._acc["grad_norm_sum"] += norms
                self._acc["cosine_sum"] += gram.double() / (
                    norms[:, None] * norms[None, :]
                ).clamp_min(1e-30)
                self._acc["diag_count"] += 1
            self._optimizer_step()
            advance_reversals(self._reversals, present)
            post: dict[str, Tensor] | None = None
            if c.balancer.needs_post_step_losses:
                post = self._losses_after_step(batches, present)
            c.balancer.after_optimizer_step(post)
        for t, loss in present.items():
            i = names.index(t)
            if sums is not None:
                self._acc["loss_sum"][i] += sums[t].to(self._acc["loss_sum"].device)
            else:
                self._acc["loss_sum"][i] += loss.detach().double() * counts[t]
            self._acc["loss_count"][i] += counts[t]
            if t in weights:
                self._acc["weight_sum"][i] += weights[t].double()
                self._acc["weight_count"][i] += 1
        if self.step_callbacks:
            info = StepEnd(s.epoch, s.step_in_epoch, s.global_step, dict(present), weights)
            for callback in self.step_callbacks:
                callback(info)

    @torch.no_grad()
    def _losses_after_step(
        self, batches: Mapping[str, Any], present: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The losses of the same batch with the updated parameters (for FAMO-like methods)."""
        return self._recompute([batches], present)

    def _learning_rate(self, param: Tensor) -> tuple[float, float]:
        """The current learning rate and weight decay of ``param``'s optimizer group."""
        groups = self.c.optimizer.param_groups
        index = self._group_of
        if (
            index is None
            or index[0] is not self.c.optimizer
            or len(index[1]) != sum(len(g["params"]) for g in groups)
        ):  # (re)built when the optimizer or its parameters change
            index = self._group_of = (
                self.c.optimizer,
                {id(p): i for i, g in enumerate(groups) for p in g["params"]},
            )
        i = index[1].get(id(param))
        if i is None:
            raise ValueError("the parameter is not trained by this run's optimizer")
        return float(groups[i]["lr"]), float(groups[i].get("weight_decay", 0.0))

    def _recompute(
        self,
        parts: Sequence[Mapping[str, Any]],
        present: Mapping[str, Tensor],
        *,
        evaluation: bool = False,
        part: int | None = None,
        values: Mapping[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """The ``present`` tasks' losses of one part of the step at the parameters' current
        values: a new forward pass (with a graph where gradients are enabled), under the run's
        autocast, rescaled like the step's losses when several processes train.

        The forward pass reads copies of the model's buffers, so BatchNorm statistics (and
        any other buffer) stay as they were, and nothing the step's own graph saved is
        written in place. ``evaluation``: in evaluation mode (no dropout, running
        statistics). ``part``: the index of the step's part (required when the step is in
        several parts). ``values``: ``{parameter: tensor}`` used instead of those parameters
        (``torch.func.functional_call``; the parameters themselves are not touched, so the
        step's graph stays valid)."""
        c = self.c
        if part is None and len(parts) != 1:
            raise ValueError(f"this step is in {len(parts)} parts: recompute(part=i)")
        index = 0 if part is None else part
        batches = parts[index]
        state: dict[str, Tensor] = {name: b.clone() for name, b in c.model.named_buffers()}
        if values:
            names = {id(p): name for name, p in c.model.named_parameters()}
            unknown = [v for v in values if id(v) not in names]
            if unknown:
                raise ValueError("recompute(values=...): a key is not a parameter of the model")
            state.update({names[id(p)]: v for p, v in values.items()})
        model = c.model

        def call(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(model, state, args, kwargs)

        was_training = model.training
        if evaluation:
            model.eval()
        try:
            with autocast(c.device, self.cfg.train.precision):
                outputs = list(forward_step(cast(MultiTaskModel, call), c.tasks, batches))
        finally:
            model.train(was_training)
        losses = {
            name: c.tasks[name].compute_loss(pred.float(), target, mask)
            for name, pred, target, mask in outputs
            if name in present
        }
        if self.dist.active and self._factors is not None:  # rescaled like the step's losses
            order = [n for n, *_ in outputs]
            offset = index * len(order)
            losses = {
                t: v * self._factors[offset + order.index(t)].to(v.dtype) for t, v in losses.items()
            }
        return losses

    def _averaged_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters whose gradients are averaged over processes after the backward
        pass: all of the model's and the balancer's, except the shared parameters of a
        gradient method at the parameter level that combined the global Jacobian (their
        combined gradient is already global; with ``balancer.distributed: local`` it is this
        process's own and is averaged like the others)."""
        balancer = self.c.balancer
        skip: set[int] = set()
        if (
            isinstance(balancer, GradientBalancer)
            and balancer.level == "parameter"
            and balancer.collective is not None
        ):
            skip = {id(p) for p in self._shared}
        params = [p for p in self.c.model.parameters() if p.requires_grad and id(p) not in skip]
        return params + [p for p in balancer.parameters() if p.requires_grad]

    def _optimizer_step(self) -> None:
        opt = self.c.optimizer
        clip = self.cfg.optim.grad_clip
        if self.scaler is not None:
            if clip is not None:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self.c.model.parameters(), clip)
            self.scaler.step(opt)
            self.scaler.update()
        else:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(self.c.model.parameters(), clip)
            opt.step()

    # -- epoch end and selection ---------------------------------------------------------
    def _progress(self, total: int, desc: str) -> Progress:
        return Progress(total, desc, enabled=self.cfg.train.progress, log=self.log.info)

    def _evaluate(self, split: str) -> EvalResult:
        cfg = self.cfg
        return evaluate(
            self.c.model,
            self.c.tasks,
            self.c.bundle.split(split),
            batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
            device=self.c.device,
            precision=cfg.train.precision,
            num_workers=cfg.data.num_workers,
            progress=lambda total, desc: self._progress(total, f"{split} {desc}"),
            split_name=split,
            input_shape=self._input_shape,
            integer_inputs=self._integer_inputs,
            shard=(self.dist.rank, self.dist.world) if self.dist.active else None,
        )

    def _score(self, result: EvalResult) -> tuple[float, bool]:
        """The selection score of a validation result and whether higher is better."""
        sel = self.cfg.train.selection
        if sel.metric == "loss":  # of the tasks that count: auxiliary tasks are left out
            return sum(result.losses[t] for t in main_names(self.c.tasks)), False
        if sel.metric == "delta_m":
            assert self.c.baseline is not None
            conv = self.cfg.eval.delta_m
            return delta_m(result.metrics, self.c.baseline, conv), delta_m_higher_is_better(conv)
        task, _, value = sel.metric.partition(".")
        return result.metrics[task][value], self.c.tasks[task].higher_is_better()[value]

    def _end_epoch(self, epoch: int) -> None:
        c, s, cfg = self.c, self.state, self.cfg
        names = list(c.tasks)
        acc = {k: v.cpu() for k, v in self._acc.items()}
        train_losses = {
            t: float(acc["loss_sum"][i] / acc["loss_count"][i])
            if acc["loss_count"][i]
            else math.nan
            for i, t in enumerate(names)
        }
        mean_weights = {
            t: float(acc["weight_sum"][i] / acc["weight_count"][i])
            if acc["weight_count"][i]
            else math.nan
            for i, t in enumerate(names)
        }
        c.balancer.on_epoch_end(epoch, train_losses)
        n_diag = float(acc["diag_count"])
        lr = float(c.optimizer.param_groups[0]["lr"])
        c.scheduler.step()
        self.dist.broadcast_buffers(c.model)  # rank 0's BatchNorm statistics everywhere
        if c.model.adapt(AdaptContext(epoch, self._sample_losses, self.log.info)):
            self._structure_changed()
        val = self._evaluate("val")
        score, higher = self._score(val)
        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            "train": {"loss": train_losses, "weight": mean_weights},
            "balancing": None
            if not n_diag
            else {
                "grad_norm": {
                    t: float(acc["grad_norm_sum"][i]) / n_diag for i, t in enumerate(names)
                },
                "cosine": {
                    t: {u: float(acc["cosine_sum"][i, j]) / n_diag for j, u in enumerate(names)}
                    for i, t in enumerate(names)
                },
            },
            "architecture": c.model.diagnostics() or None,
            "val": val.to_dict(),
            "score": score,
            "time_s": s.train_time_s,
        }
        sel = cfg.train.selection
        if sel.protocol == "mean_last" and epoch >= cfg.train.epochs - sel.last_n:
            # a data set that validates on its test split (val_is_test) is evaluated once
            same = c.bundle.val is c.bundle.test
            record["test"] = record["val"] if same else self._evaluate("test").to_dict()
        improved = s.best_score is None or (
            score > s.best_score if higher else score < s.best_score
        )
        chosen = improved and math.isfinite(score) and _non_finite(c.model.state_dict(), "") is None
        if chosen:
            s.best_score, s.best_epoch = score, epoch
        if chosen and self.dist.is_writer:
            save_atomic(
                {
                    "format": FORMAT,
                    "model": c.model.state_dict(),
                    "model_signature": model_signature(c.model),
                    "epoch": epoch,
                    "score": score,
                }
                | _structure(c.model),
                self.run.best_checkpoint,
            )
        if not math.isfinite(score) and sel.protocol == "best":
            self.log.warning(
                f"epoch {epoch + 1}: the selection score ({sel.metric}) on the val split is "
                f"{score}; this epoch cannot be chosen"
                + (
                    f" (the best is still epoch {s.best_epoch + 1})"
                    if s.best_epoch is not None
                    else " (no epoch has a finite score yet: without one, the results are "
                    "those of the last epoch)"
                )
            )
        s.history.append({"epoch": epoch, "score": score})
        if self.dist.is_writer:
            self.run.append_metrics(record)
        self._log_epoch(record)
        s.epoch += 1
        s.step_in_epoch = 0
        self.save_checkpoint()

    def _sample_losses(self, n: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Per-sample losses on the first ``n`` training samples (for ``model.adapt``)."""
        cfg = self.cfg
        return sample_losses(
            self.c.model,
            self.c.tasks,
            self.c.bundle.train,
            n,
            device=self.c.device,
            precision=cfg.train.precision,
            batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
        )

    def _structure_changed(self) -> None:
        """After the model's structure changed: a new optimizer and schedule over its
        parameters (see :func:`.structure.rebuild_optimizer`) and the shared parameters."""
        c = self.c
        c.optimizer, c.scheduler = rebuild_optimizer(
            self.cfg, c.model, c.balancer, c.optimizer, c.scheduler
        )
        self._shared, self._others = resolve_shared(c.model, self.cfg.balancer.shared)
        self._reversals = reversal_schedules(c.model)
        c.balancer.on_structure_changed()
        if not self._shared and isinstance(c.balancer, GradientBalancer):
            raise ConfigError(
                f"after its structure changed at the end of epoch {self.state.epoch + 1}, "
                f"architecture {self.cfg.model.architecture!r} shares no parameter between "
                f"tasks: the gradient method {self.cfg.balancer.name!r} has no shared "
                "gradient to combine. Use a loss-weighting method (equal, uncertainty, ...) "
                "or options that keep a shared part (fafs: a larger model.options.branch_cost)."
            )

    def _log_epoch(self, record: Mapping[str, Any]) -> None:
        from ..report.tables import epoch_log_lines

        epoch = record["epoch"]
        # few tasks: every value on one line; many: a summary of bounded width (all values
        # are in metrics.jsonl)
        for line in epoch_log_lines(record, self.cfg.train.epochs):
            self.log.info(line)
        val = record["val"]["metrics"]
        if self.cfg.train.tensorboard and self.dist.is_writer:
            writer = self._tensorboard()
            for t, v in record["train"]["loss"].items():
                writer.add_scalar(f"train_loss/{t}", v, epoch)
            for t, v in record["train"]["weight"].items():
                writer.add_scalar(f"weight/{t}", v, epoch)
            for t, vals in val.items():
                for k, v in vals.items():
                    writer.add_scalar(f"val/{t}/{k}", v, epoch)
            writer.add_scalar("lr", record["lr"], epoch)
            writer.flush()

    def _tensorboard(self) -> Any:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "train.tensorboard=true needs the tensorboard package: "
                    "pip install 'polytask[tensorboard]'."
                ) from None
            self._tb = SummaryWriter(log_dir=str(self.run.path / "tensorboard"))
        return self._tb

    # -- final results -------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Evaluate by the selection protocol, write ``results.json`` and the report."""
        cfg, c, s = self.cfg, self.c, self.state
        sel = cfg.train.selection
        self.dist.barrier()  # rank 0's metrics and checkpoints are written
        records = self.run.read_metrics()
        selection: dict[str, Any] = {"protocol": sel.protocol, "metric": sel.metric}
        if sel.protocol == "mean_last":
            last = [r for r in records if "test" in r]
            selection["epochs"] = [r["epoch"] for r in last]
            val = _mean_results([r["val"] for r in last])
            test = _mean_results([r["test"] for r in last])
        else:
            if sel.protocol == "best" and not self.run.best_checkpoint.exists() and records:
                # every validation score was NaN or infinite: no epoch could be chosen
                scores = [r.get("score") for r in records]
                note = (
                    f"no epoch had a finite selection score ({sel.metric} on val: {scores}); "
                    f"the results are those of the last epoch, {cfg.train.epochs}"
                )
                self.log.warning(note)
                selection["epoch"] = cfg.train.epochs - 1
                selection["note"] = note
            elif sel.protocol == "best":
                best = load_checkpoint(self.run.best_checkpoint)
                load_model_state(c.model, best, self.run.best_checkpoint)
                selection["epoch"] = int(best["epoch"])
            else:
                selection["epoch"] = cfg.train.epochs - 1
            val = self._evaluate("val").to_dict()
            test = val if c.bundle.val is c.bundle.test else self._evaluate("test").to_dict()
        results: dict[str, Any] = {
            "name": cfg.name,
            "tasks": list(c.tasks),
            "auxiliary": auxiliary_names(c.tasks),
            "selection": selection,
            "val": val,
            "test": test,
            "higher_is_better": {t: task.higher_is_better() for t, task in c.tasks.items()},
            "parameters": c.model.describe(),
            "train_time_s": s.train_time_s,
            "delta_m": None,
        }
        classes = _class_info(c.bundle.info, c.tasks)
        if classes:
            results["classes"] = classes
        if c.baseline is not None:
            conv = cfg.eval.delta_m
            results["delta_m"] = {
                "convention": conv,
                "higher_is_better": delta_m_higher_is_better(conv),
                "value": delta_m(test["metrics"], c.baseline, conv),
                "baseline_source": c.baseline.source,
            }
        if not self.dist.is_writer:  # the other ranks took part in the evaluations
            return results
        try:  # a warning threshold for reports, never a reason to lose the results
            chance, chance_from = chance_level(
                c.tasks,
                c.bundle.test,
                reference=c.bundle.train,
                batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
                num_workers=cfg.data.num_workers,
            )
        except Exception as exc:
            self.log.warning(f"chance level not computed ({type(exc).__name__}: {exc})")
            chance, chance_from = {}, {}
        if chance:
            results["chance"] = chance
            results["chance_from"] = chance_from
        self.run.write_results(results)
        weights = (
            f"epoch {selection['epoch'] + 1} ({'best.pt' if sel.protocol == 'best' else 'last.pt'})"
            if "epoch" in selection
            else f"the last epoch, {cfg.train.epochs} (last.pt)"
        )
        # the run has its results: what follows only describes it and must not fail it
        try:
            self._write_inspection(weights)
        except Exception as exc:
            self.log.warning(f"the inspection of the model failed ({type(exc).__name__}: {exc})")
        from ..report import write_run_report

        try:
            write_run_report(self.run)
        except Exception as exc:
            self.log.warning(f"the report could not be written ({type(exc).__name__}: {exc})")
        self.log.info(f"finished: results in {self.run.results_path}")
        return results

    @torch.no_grad()
    def _write_inspection(self, weights: str) -> None:
        """What the architecture's ``inspect`` hook returns on the first validation samples,
        with those samples, into ``inspection.npz`` (nothing when the hook returns nothing)."""
        c = self.c
        if type(c.model).inspect is MultiTaskModel.inspect:
            return  # the architecture shows nothing: no need to load samples
        split = c.bundle.val
        source = next(iter(split.values())) if isinstance(split, Mapping) else split
        n = min(INSPECTION_SAMPLES, len(cast(Sized, source)))
        samples = [source[i] for i in range(n)]
        collate = getattr(source, "collate", None)
        if collate is not None:  # graphs and other inputs that only their data set can batch
            inputs = collate(samples)["input"]
        else:
            inputs = torch.stack([sample["input"] for sample in samples])
        was_training = c.model.training
        c.model.eval()
        try:
            with autocast(c.device, self.cfg.train.precision):
                arrays = c.model.inspect(to_device(inputs, c.device))
        finally:
            c.model.train(was_training)
        if not arrays:
            return
        meta = {
            "architecture": self.cfg.model.architecture,
            "split": "val",
            "samples": list(range(n)),
            "weights": weights,
        }
        stored = {"input": inputs} if isinstance(inputs, Tensor) else {}
        self.run.write_inspection({**stored, **arrays}, meta)


def _check_batch_parts(balancer: Any, name: str) -> None:
    """A balancer that cuts batches into parts (MoDo, SDMGrad) can neither read one shared
    representation nor the post-step losses of the whole batch."""
    parts = balancer.batch_parts
    if not isinstance(parts, int) or parts < 1:
        raise ConfigError(f"balancing method {name!r}: batch_parts must be a positive integer.")
    if parts > 1 and (balancer.needs_representation or balancer.needs_post_step_losses):
        raise ConfigError(
            f"balancing method {name!r} cuts every batch into {parts} parts; it cannot also "
            "read the shared representation or the post-step losses of the whole batch."
        )


def _step_parts(
    datasets: Mapping[str, Any],
    steps: Sequence[Mapping[str, list[int]]],
    parts: int,
    **loader: Any,
) -> Iterator[list[tuple[Mapping[str, list[int]], dict[str, Any]]]]:
    """Every step's ``(indices, batches)``, cut into ``parts`` disjoint contiguous parts, each
    loaded as a batch of its own (fewer parts where a step has fewer samples than ``parts``
    for some key; one part, the step itself, when ``parts`` is 1)."""
    plan: list[list[dict[str, list[int]]]] = []
    for step in steps:
        n = max(1, min(parts, *(len(v) for v in step.values())))
        plan.append([dict(step)] if n == 1 else [shard_step(step, i, n) for i in range(n)])
    loaded = iterate_batches(datasets, [p for ps in plan for p in ps], **loader)
    for ps in plan:
        yield [(p, next(loaded)) for p in ps]


def _structure(model: MultiTaskModel) -> dict[str, Any]:
    """``{"structure": ...}`` for a checkpoint of a model whose structure changes, else ``{}``."""
    structure = model.structure()
    return {} if structure is None else {"structure": structure}


def _non_finite(state: Any, name: str) -> str | None:
    """The name of the first floating tensor in ``state`` (nested mappings and sequences)
    holding a NaN or an infinity, or None."""
    if isinstance(state, Tensor):
        if (state.is_floating_point() or state.is_complex()) and not bool(
            torch.isfinite(state).all()
        ):
            return name
        return None
    if isinstance(state, Mapping):
        items: Any = state.items()
    elif isinstance(state, list | tuple):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = _non_finite(value, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


def _class_info(info: Mapping[str, Any], tasks: Mapping[str, Any]) -> dict[str, Any]:
    """Class names (segmentation and classification tasks) and training pixels (segmentation)
    from the data set's ``info`` (``class_names``, ``class_pixels``: one list, or
    ``{task: list}``); the label names of a multi-label task with several labels (its
    ``extra["labels"]``, as :func:`polytask.tasks.label_tasks` declares them)."""
    result: dict[str, Any] = {}
    for name, task in tasks.items():
        labels = task.extra.get("labels") if task.kind == "multilabel" else None
        if isinstance(labels, Sequence) and len(labels) == task.output_dim > 1:
            result[name] = {"names": [str(label) for label in labels]}
            continue
        if task.kind not in ("segmentation", "classification"):
            continue
        entry: dict[str, Any] = {}
        for key, out in (("class_names", "names"), ("class_pixels", "train_pixels")):
            value = info.get(key)
            if isinstance(value, Mapping):
                value = value.get(name)
            if isinstance(value, Sequence) and len(value) == task.output_dim:
                entry[out] = list(value)
        if entry:
            result[name] = entry
    return result


def _mean_results(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Average ``{"metrics": {t: {k: v}}, "losses": {t: v}, "details": {t: {k: [v]}}}``
    records (details item by item, over the records where the item is defined)."""
    metrics: dict[str, dict[str, float]] = {}
    losses: dict[str, float] = {}
    n = len(items)
    for item in items:
        for t, vals in item["metrics"].items():
            for k, v in vals.items():
                metrics.setdefault(t, {}).setdefault(k, 0.0)
                metrics[t][k] += v / n
        for t, v in item["losses"].items():
            losses[t] = losses.get(t, 0.0) + v / n
    result: dict[str, Any] = {"metrics": metrics, "losses": losses}
    details: dict[str, dict[str, list[float | None]]] = {}
    for t, lists in (items[0].get("details") or {}).items():
        for k in lists:
            columns = zip(*(item["details"][t][k] for item in items), strict=True)
            defined = ([v for v in column if v is not None] for column in columns)
            details.setdefault(t, {})[k] = [sum(v) / len(v) if v else None for v in defined]
    if details:
        result["details"] = details
    return result
