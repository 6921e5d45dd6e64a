"""The Trainer: a thin loop built from Kiln's parts, readable top to bottom.

``fit()`` in pseudocode, with the callback events it fires::

    setup: seed -> data -> model -> Engine.setup -> optimizer -> scheduler -> resume state
    on_fit_start
    for epoch in epochs:                       (resumes mid-epoch at the saved batch)
        on_epoch_start
        freeze/unfreeze for this epoch; SWA takes over the LR from its start epoch
        for i, (x, y) in loader:               (order fixed by seed and epoch)
            x, y = mixer(x, y)                  (mixup/cutmix: soft targets)
            for each micro-batch of (x, y):     (one, unless auto-microbatch split it)
                with engine.micro_step(i):      (no_sync unless this micro-step updates)
                    with engine.autocast(): out = model(x); loss = loss_fn(out, y)
                    engine.backward(loss)       (scaled by the group factor)
            if update:
                non-finite loss/grads?          (train.nonfinite: stop | skip | rollback)
                engine.optimizer_step()         (unscale -> clip -> step -> scaler -> zero_grad)
                ema.update(); scheduler.step()  (per-update schedules)
                on_update_end; every log_every: on_log; every N steps: save -> on_checkpoint
        swa.update; epoch schedulers; validate (EMA weights) -> on_validation_end;
        early stopping; save -> on_checkpoint; on_epoch_end
    best (EMA) weights or the SWA average -> model.safetensors; test metrics -> summary.json;
    on_fit_end
    on any exception: on_exception, then re-raise (SIGINT/SIGTERM save a checkpoint first)

Example:
    >>> from kiln.config import load_config
    >>> cfg = load_config(None, ["train.epochs=1", "log.tensorboard=false", "out_dir=/tmp/kr"])
    >>> result = Trainer(cfg, verbose=False).fit()      # doctest: +SKIP
    >>> result.test["acc"] > 0.9                         # doctest: +SKIP
    True
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.algorithms.early_stopping import EarlyStopping
from kiln.config import Config
from kiln.data.base import DataBundle
from kiln.data.loader import batch_sizes, start_epoch
from kiln.train import build, distributed, resume_policy, snapshots
from kiln.train.callbacks import Callbacks
from kiln.train.checkpoint import CheckpointManager
from kiln.train.evaluation import evaluate, monitor_mode
from kiln.train.finish import FitResult, finish
from kiln.train.guard import handle_nonfinite
from kiln.train.logging import MetricsLogger, Progress, epoch_line
from kiln.train.metrics import build_metrics
from kiln.train.microbatch import forward_backward_or_shrink
from kiln.train.optim import build_optimizer, build_scheduler
from kiln.train.reproducibility import seed_everything, set_deterministic
from kiln.train.resume import completed_message, completed_result, locate_run, resume_record
from kiln.train.signals import stop_on_signals
from kiln.train.techniques import Techniques, check_techniques


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM or a stop request; a checkpoint was saved first."""

    def __init__(self, reason: str, checkpoint: Path | None, run_dir: Path) -> None:
        self.reason, self.checkpoint, self.run_dir = reason, checkpoint, run_dir
        super().__init__(f"stopped by {reason}; checkpoint saved to {checkpoint}")


class Trainer:
    """Runs a Config end to end; each part is also usable alone (see the module docstring).

    Args:
        cfg: the validated job config.
        model: a user's own ``nn.Module`` (else built from ``cfg.model``).
        data: a user's own :class:`DataBundle` (else built from ``cfg.data``).
        callbacks: objects with ``on_<event>`` methods (see ``kiln.train.callbacks.EVENTS``).
        run_dir: write here instead of a new ``out_dir/name`` (resume reuses the old one).
        verbose: print one line per epoch and the final summary.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        model: nn.Module | None = None,
        data: DataBundle | None = None,
        callbacks: Sequence[object] = (),
        run_dir: str | Path | None = None,
        verbose: bool = True,
    ) -> None:
        self.cfg = cfg
        self.callbacks = Callbacks(callbacks)
        self.verbose = verbose
        self.epoch = 0  # current epoch (0-based)
        self.batch_in_epoch = 0  # micro-batches of this epoch already trained on
        self.step = 0  # optimizer updates so far
        self.best: dict[str, float] = {}
        self._stop_reason: str | None = None
        self._interrupt = False
        self._multi = False
        self.micro = 1  # micro-batches per loader batch (auto-microbatch doubles it on OOM)
        self.lr_scale = 1.0  # LR factor from non-finite rollbacks
        self.rollbacks = 0
        self.nonfinite_skipped = 0
        self._skip_streak = (-1, 0)  # (engine.updates at the last skip, skips in a row)
        self._group_loss = torch.zeros(())  # summed loss of the current accumulation group
        # auto-microbatch: the current group's batches, RNG state and losses length (replay)
        self._group: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._group_rng: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None
        self._group_losses = 0
        self.resumed_from: list[int] = []  # the step each resume of this run started at
        self._resume_record: dict[str, Any] | None = None  # metrics.jsonl line of this resume
        self.complete: str | None = None  # why a resumed run has nothing left to do
        self._setup(model, data, run_dir)

    # ------------------------------------------------------------------ setup

    def _setup(self, model: nn.Module | None, data: DataBundle | None, run_dir: Any) -> None:
        cfg = self.cfg
        if cfg.meta.enabled:
            raise ValueError(
                "meta.enabled=true runs the meta-learning loop, not the Trainer: use "
                "`kiln train CONFIG` or kiln.meta.runner.run_meta(cfg)"
            )
        # Before any work: a resume that would change what the run trains is refused.
        self._resume_plan = resume_policy.check(cfg)
        seed_everything(cfg.seed)
        set_deterministic(cfg.deterministic)
        self.data = data if data is not None else build.build_data_for(cfg)
        info = self.data.info
        self.engine = build.engine_for(cfg)
        world = self.engine.world
        self.is_zero = world.is_zero
        self._multi = world.size > 1
        check_techniques(cfg, info, strategy=self.engine.strategy, world=world.size)
        model = model if model is not None else build.build_model_for(cfg, info)
        if cfg.train.activation_checkpointing:
            from kiln.algorithms.activation_checkpointing import apply_activation_checkpointing

            targets = cfg.train.activation_checkpointing
            apply_activation_checkpointing(model, None if targets is True else targets)
        epochs = cfg.train.epochs
        self.tech = Techniques(cfg, info, model, epochs=epochs, rank=world.rank)
        freezer = self.tech.freezer
        if freezer is not None and not freezer.dynamic:
            freezer.apply(model, epoch=0)  # before wrapping and the optimizer: both skip them
        # FSDP2 shards the model in place; a plain copy rebuilds the best weights at the end.
        self.template = copy.deepcopy(model) if self.engine.strategy == "fsdp" else model
        self.model, _ = self.engine.setup(model)
        self.optimizer = build_optimizer(self.engine.model, cfg.optim)  # type: ignore[arg-type]
        self.loss_fn = build.loss_for(cfg, self.data)
        build.add_loss_parameters(self.optimizer, self.loss_fn, self.engine.device, world.size)
        if freezer is not None and freezer.dynamic:
            # Unfrozen later, so they stay in the optimizer; with no grad they get no update.
            freezer.apply(model, epoch=0)
        dev = self.engine.device
        self.train_loader, self.val_loader, self.test_loader = build.loaders_for(
            cfg,
            self.data,
            device=dev,
            rank=world.rank,
            world=world.size,
            fsdp=self.engine.strategy == "fsdp",
        )
        per_rank = build.per_rank_batch(cfg, world.size)
        sizes = batch_sizes(len(self.train_loader.sampler), per_rank, cfg.data.drop_last)  # type: ignore[arg-type]
        if not sizes:
            raise ValueError(
                f"the train split has {len(self.data.train)} examples, fewer than one batch of "  # type: ignore[arg-type]
                f"{cfg.data.batch_size} with drop_last; lower data.batch_size"
            )
        self.n_batches = len(sizes)
        self.per_rank_batch = per_rank
        self.updates_per_epoch = math.ceil(self.n_batches / cfg.train.accumulate)
        self.total_steps = cfg.train.max_steps or self.updates_per_epoch * cfg.train.epochs
        self.scheduler = build_scheduler(
            self.optimizer,
            cfg.scheduler,
            steps_per_epoch=self.updates_per_epoch,
            epochs=cfg.train.epochs,
            total_steps=self.total_steps,
        )
        self.metrics = build_metrics(info, device=dev, top_k=cfg.train.top_k, sync=world.size > 1)
        monitor = cfg.checkpoint.monitor
        if self.val_loader is None and monitor.startswith("val/"):
            monitor = "train/" + monitor.split("/", 1)[1]
        self.monitor = monitor
        self.mode = monitor_mode(monitor, cfg.checkpoint.mode)
        es = cfg.early_stop
        if es.enabled:
            self.early_monitor = es.monitor or monitor
            if not self.early_monitor.startswith("val/") or self.val_loader is None:
                raise ValueError(
                    f"early_stop monitors a validation metric (got {self.early_monitor!r}); "
                    "set data.val_fraction > 0 and early_stop.monitor=val/<metric>"
                )
            self.tech.early = EarlyStopping(
                mode=monitor_mode(self.early_monitor, es.mode),
                patience=es.patience,
                min_delta=es.min_delta,
            )
        self.run_dir, resume, restarted = locate_run(cfg, run_dir, is_zero=self.is_zero)
        if resume is not None:  # before writing anything: a failed resume changes no file
            self._resume_from(resume, elastic=restarted)
        if self.is_zero and self.complete is None:  # a complete run's files stay as they are
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not resume_policy.record(self.run_dir, self._resume_plan, self.step):
                build.write_run_files(self.run_dir, cfg, info)  # a resume keeps config.yaml
            distributed.mark_elastic_run(self.run_dir)
        self.ckpts = CheckpointManager(
            self.run_dir / "checkpoints",
            keep_last=cfg.checkpoint.keep_last,
            keep_best=cfg.checkpoint.keep_best,
            mode=self.mode,
        )

    def _resume_from(self, path: Path, *, elastic: bool) -> None:
        saved = snapshots.restore(self, path)
        loop = saved["loop"]
        done = completed_message(self.cfg, self.run_dir, loop, self.total_steps)
        self.complete = distributed.broadcast_object(done)  # rank 0 read summary.json
        self.resumed_from = [*saved.get("resumed_from", []), self.step]
        world = self.engine.world.size
        self._resume_record = resume_record(loop, path, world, elastic)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit (DESIGN.md rule 5); see ``snapshots``."""
        return snapshots.capture(self, self.step)

    def _should_stop(self) -> bool:
        """Whether to stop now; under several processes all ranks agree (one all-reduce).

        Called at logging steps and epoch ends only, so there is no per-step host sync.
        """
        if not self._multi:
            return self._stop_reason is not None
        flags = [1.0 if self._stop_reason else 0.0, 1.0 if self._interrupt else 0.0]
        agreed = distributed.all_reduce_max(torch.tensor(flags, device=self.engine.device))
        stop, interrupt = (bool(v) for v in agreed.tolist())
        if stop and not self._stop_reason:
            self._stop_reason = "another rank's stop request"
        self._interrupt = interrupt
        return stop

    def request_stop(self, reason: str = "request", *, interrupt: bool = False) -> None:
        """Stop at the next logging step or epoch end (callbacks may call this).

        A plain stop (early stopping) ends the run normally: best weights, test metrics,
        ``on_fit_end``. With ``interrupt=True`` (what SIGINT/SIGTERM do) Kiln saves a checkpoint
        and raises :class:`TrainingInterrupted`, so the run can be resumed.
        """
        self._stop_reason = reason
        self._interrupt = self._interrupt or interrupt

    # ------------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        """Train, validate, checkpoint; return the best metrics and the test metrics."""
        cfg = self.cfg
        if self.complete is not None:  # resumed a finished run: say so, write nothing
            if self.engine.owns_group:
                self.engine.close()
            if self.verbose and self.is_zero:
                print(self.complete, flush=True)
            return completed_result(self.run_dir, self.step)
        self.logger = MetricsLogger(
            self.run_dir, tensorboard=cfg.log.tensorboard, enabled=self.is_zero
        )
        if self._resume_record is not None:  # where this process starts, before any update
            self.logger.log(self._resume_record, step=self.step)
        shown = cfg.log.progress if self.is_zero else False
        progress = Progress(self.total_steps, enabled=shown, initial=self.step)
        try:
            # Anomaly mode (debugging): a NaN produced in backward raises, naming the op and
            # the forward line that created it. It slows every step, so it is off by default.
            anomaly = (
                torch.autograd.set_detect_anomaly(True, check_nan=True)
                if cfg.detect_anomaly
                else nullcontext()
            )
            with stop_on_signals(self), progress, anomaly:
                self.progress = progress
                if self.cfg.train.nonfinite == "rollback" and self.ckpts.last() is None:
                    self._save()  # a state to roll back to before the first update
                self.callbacks.fire("on_fit_start", self)
                # train.max_steps, when set, decides the length (epochs are then unbounded).
                while self.step < self.total_steps and (
                    cfg.train.max_steps or self.epoch < cfg.train.epochs
                ):
                    self._train_epoch()
                    if self._should_stop():
                        break
            if self._should_stop() and self._interrupt:
                path = self._save()
                raise TrainingInterrupted(self._stop_reason or "stop", path, self.run_dir)
            result = finish(self)
        except BaseException as exc:
            self.callbacks.fire("on_exception", self, exc)
            if self.engine.owns_group and self.engine.world.size == 1:
                self.engine.close()  # a private group of one: nothing to wait for
            raise  # a group shared with other ranks dies with the process (torchrun decides)
        finally:
            self.logger.close()
        if self.engine.owns_group:
            self.model = self.engine.model  # type: ignore[assignment]
            self.engine.close()
        self.callbacks.fire("on_fit_end", self, result)
        return result

    def _train_epoch(self) -> None:
        cfg, engine, opt, tech = self.cfg, self.engine, self.optimizer, self.tech
        epoch = self.epoch
        start_epoch(self.train_loader, epoch, self.batch_in_epoch)
        if tech.freezer is not None:
            changed = tech.freezer.apply(engine.model, epoch)  # type: ignore[arg-type]
            if changed and self.verbose and self.is_zero:
                print(f"epoch {epoch + 1}: unfroze {len(changed)} parameter tensors", flush=True)
        swa_on = tech.swa is not None and tech.swa.active(epoch)
        if tech.swa is not None:
            tech.swa.begin_epoch(opt, epoch)
        self.callbacks.fire("on_epoch_start", self, epoch)
        t0 = time.perf_counter()
        # Detached losses since the last log: no graph kept, no host sync until logging.
        losses: list[torch.Tensor] = []
        every_ckpt = cfg.checkpoint.every_n_steps
        sched = self.scheduler
        step_schedule = sched if sched is not None and sched.interval == "step" else None
        if swa_on:
            step_schedule = None  # SWALR owns the learning rate from here on
        self._train_mode()
        for i, batch in enumerate(self.train_loader, self.batch_in_epoch):
            x, y = engine.to_device(batch)
            if tech.mixer is not None:
                x, y = tech.mixer(x, y, epoch=epoch)
            if cfg.train.auto_microbatch:
                update = forward_backward_or_shrink(self, i, x, y, losses)
            else:
                update = self._forward_backward(i, x, y, losses)
            self.batch_in_epoch = i + 1
            if not update:
                continue
            if cfg.train.nonfinite != "ignore" and not self._finite_update():
                if handle_nonfinite(self, x) == "rollback":
                    return  # the loop continues from the restored checkpoint
                continue
            log_now = (self.step + 1) % cfg.train.log_every == 0
            grad_norm = engine.optimizer_step(opt, grad_norm=log_now)
            if step_schedule is not None and engine.last_step_taken:
                step_schedule.step()
            self.step += 1
            if tech.ema is not None and self.step % tech.ema_every == 0:
                tech.ema.update(engine.model)  # type: ignore[arg-type]
            self.callbacks.fire("on_update_end", self, self.step)
            if log_now:
                self._log_train(torch.stack(losses).float().mean(), grad_norm)
                losses.clear()
            self.progress.update(self.step)
            if every_ckpt and self.step % every_ckpt == 0:
                self._save()
            # Under several processes a stop is agreed at logging steps (no per-step sync).
            if self.step >= self.total_steps or (
                (log_now or not self._multi) and self._should_stop()
            ):
                break
        if self.batch_in_epoch == self.n_batches:
            self._end_epoch(time.perf_counter() - t0)

    def _train_mode(self) -> None:
        self.model.train()
        if self.tech.freezer is not None:
            self.tech.freezer.train_mode(self.engine.model)  # type: ignore[arg-type]

    def _forward_backward(
        self, i: int, x: torch.Tensor, y: torch.Tensor, losses: list[torch.Tensor]
    ) -> bool:
        """Forward and backward of loader batch ``i``; True when it ends an accumulation group.

        The batch runs as ``self.micro`` micro-batches (one unless auto-microbatch split it),
        each weighted by the Engine by its share of the group's samples, so the gradient is the
        same.
        """
        engine, model, loss_fn, n = self.engine, self.model, self.loss_fn, self.n_batches
        # The loss is checked only under fp16 (a NaN loss already makes the fp32/bf16 grads NaN).
        check = self.cfg.train.nonfinite != "ignore" and engine.precision.kind == "fp16"
        if self.micro == 1:
            pieces: Sequence[tuple[torch.Tensor, torch.Tensor]] = ((x, y),)
        else:
            size = math.ceil(self.per_rank_batch / self.micro)
            pieces = list(zip(x.split(size), y.split(size), strict=True))
        last = len(pieces) - 1
        update = engine.is_update(i, n)
        for j, (xb, yb) in enumerate(pieces):
            with engine.micro_step(i, n, size=len(xb), update=update and j == last):
                with engine.autocast():
                    out = model(xb)
                    loss = loss_fn(out, yb)
                engine.backward(loss)
            losses.append(loss.detach())
            if check:  # the group's summed loss, checked on device at the update
                first = j == 0 and i % engine.accumulate == 0
                self._group_loss = loss.detach() if first else self._group_loss + loss.detach()
        return update

    def _finite_update(self) -> bool:
        """Whether the group's loss and gradients are finite (one host sync per update)."""
        fp16 = self.engine.precision.kind == "fp16"
        return self.engine.grads_finite(self.optimizer, self._group_loss if fp16 else None)

    def _end_epoch(self, seconds: float) -> None:
        cfg, tech = self.cfg, self.tech
        metrics: dict[str, float] = {"epoch": self.epoch + 1, "epoch_time_s": round(seconds, 3)}
        swa_on = tech.swa is not None and tech.swa.active(self.epoch)
        if tech.swa is not None and swa_on:
            tech.swa.end_epoch(self.engine.model, self.epoch)  # type: ignore[arg-type]
            metrics["swa/n_averaged"] = tech.swa.n_averaged
        if hasattr(self.loss_fn, "task_weights"):  # multi-task: the learned weight of each task
            metrics.update({f"task_weight/{k}": v for k, v in self.loss_fn.task_weights().items()})
        val: dict[str, float] = {}
        if self.val_loader is not None and (self.epoch + 1) % cfg.train.val_every == 0:
            val = self.validate()
            metrics.update({f"val/{k}": v for k, v in val.items()})
        if self.scheduler is not None and not swa_on:
            if self.scheduler.interval == "epoch":
                self.scheduler.step()
            elif self.scheduler.interval == "plateau" and val:
                self.scheduler.step(val[self.monitor.split("/", 1)[1]])
        if tech.early is not None and val:
            reason = tech.early.check(self.early_monitor, val)
            if reason is not None:
                self.request_stop(reason)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.logger.log(metrics, step=self.step)
        if self.verbose and self.is_zero:
            line = epoch_line(self.epoch, cfg.train.epochs, self.step, metrics, seconds)
            if self.nonfinite_skipped:
                line += f"  skipped {self.nonfinite_skipped} non-finite updates"
            if self.progress.enabled:
                self.progress.print(line)
            else:
                print(line, flush=True)
        if cfg.checkpoint.every_epoch:
            self._save(metrics.get(self.monitor))
        self.callbacks.fire("on_epoch_end", self, self.epoch, metrics)

    def validate(self) -> dict[str, float]:
        """Metrics on the validation split (fires ``on_validation_end``)."""
        assert self.val_loader is not None
        ema = self.tech.ema if self.cfg.ema.evaluate else None
        with ema.swapped(self.engine.model) if ema is not None else nullcontext():  # type: ignore[arg-type]
            val = evaluate(self.model, self.val_loader, self.loss_fn, self.engine, self.metrics)
        self.callbacks.fire("on_validation_end", self, val)
        return val

    def _log_train(self, mean_loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        if self._multi:  # every rank logs at the same step: average the ranks' losses
            mean_loss = distributed.all_reduce_sum(mean_loss.clone()) / self.engine.world.size
        logs = {"train/loss": mean_loss.item(), "lr": self.optimizer.param_groups[0]["lr"]}
        if grad_norm is not None:
            logs["train/grad_norm"] = grad_norm.item()
        if self.engine.skipped:
            logs["train/skipped_updates"] = self.engine.skipped
        if self.nonfinite_skipped:
            logs["train/nonfinite_skipped"] = self.nonfinite_skipped
        self._last_train = logs
        self.logger.log(logs, step=self.step)
        shown = {"loss": logs["train/loss"]}
        if self.nonfinite_skipped:  # train.nonfinite=skip: how many updates were dropped
            shown["skipped"] = self.nonfinite_skipped
        self.progress.update(self.step, shown, force=True)
        self.callbacks.fire("on_log", self, logs)

    def _save(self, metric: float | None = None) -> Path:
        if metric is None and self.monitor.startswith("train/"):
            metric = getattr(self, "_last_train", {}).get(self.monitor)
        if metric is not None and self._is_better(metric):
            self.best = {"step": self.step, self.monitor: metric}
        state = self.state_dict()  # a collective under several processes
        path = self.ckpts.dir / f"step-{self.step}.ckpt"
        if self.is_zero:
            path = self.ckpts.save(state, step=self.step, metric=metric)
        distributed.barrier()  # no rank runs ahead of a checkpoint that is still being written
        self.callbacks.fire("on_checkpoint", self, path)
        return path

    def _is_better(self, metric: float) -> bool:
        old = self.best.get(self.monitor)
        return old is None or (metric < old if self.mode == "min" else metric > old)
