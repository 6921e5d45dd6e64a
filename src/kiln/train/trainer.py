"""The Trainer: a thin loop built from Kiln's parts, readable top to bottom.

``fit()`` in pseudocode, with the callback events it fires::

    setup: seed -> data -> model -> Engine.setup -> optimizer -> scheduler -> resume state
    on_fit_start
    for epoch in epochs:                       (resumes mid-epoch at the saved batch)
        on_epoch_start
        freeze/unfreeze for this epoch; SWA takes over the LR from its start epoch
        while train_step(...) gives an update:  (kiln.train.step: fetch -> mix -> forward ->
                                                 loss -> backward per loader batch of the
                                                 group, then guard -> unscale/clip/step ->
                                                 schedule -> EMA; order fixed by seed and epoch)
            non-finite?  train.nonfinite: skip | rollback (kiln.train.guard) | stop (save, raise)
            on_update_end; every log_every: on_log; every N steps: save -> on_checkpoint
        swa.update; epoch schedulers; validate (EMA weights) -> on_validation_end;
        early stopping; save -> on_checkpoint; on_epoch_end
    best (EMA) weights or the SWA average -> model.safetensors; test metrics -> summary.json;
    on_fit_end
    on any exception: on_exception, then re-raise (SIGINT/SIGTERM save a checkpoint first)

The parts (model, optimizer, loaders...) are built by :func:`kiln.train.build.build_parts`;
the counters a resume continues from are one :class:`~kiln.train.loop_state.LoopState`.

Example:
    >>> from kiln.config import load_config
    >>> cfg = load_config(None, ["train.epochs=1", "log.tensorboard=false", "out_dir=/tmp/kr"])
    >>> result = Trainer(cfg, verbose=False).fit()      # doctest: +SKIP
    >>> result.test["acc"] > 0.9                         # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.config import Config
from kiln.data.base import DataBundle
from kiln.data.loader import start_epoch
from kiln.run import CHECKPOINTS
from kiln.train import build, distributed, guard, resume_policy, snapshots
from kiln.train.callbacks import Callbacks
from kiln.train.checkpoint import CheckpointManager
from kiln.train.diagnosis import stop_error
from kiln.train.evaluation import evaluate
from kiln.train.final_checks import nonfinite_tensors
from kiln.train.finish import FitResult, finish
from kiln.train.logging import MetricsLogger, Progress, epoch_line, train_record
from kiln.train.loop_state import StopRequest
from kiln.train.microbatch import AutoMicrobatch
from kiln.train.resume import completed_result, open_run
from kiln.train.signals import stop_on_signals
from kiln.train.step import epoch_schedule, mean_loss, train_step


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM or a stop request; a checkpoint was saved first."""

    def __init__(self, reason: str, checkpoint: Path | None, run_dir: Path) -> None:
        self.reason, self.checkpoint, self.run_dir = reason, checkpoint, run_dir
        super().__init__(f"stopped by {reason}; checkpoint saved to {checkpoint}")


def _reads(holder: str, names: str) -> Any:
    """Read-only views of ``self.<holder>.<name>`` for each of the space-separated ``names``."""

    def view(name: str) -> property:
        return property(lambda self: getattr(getattr(self, holder), name), doc=f"{holder}.{name}")

    return tuple(view(n) for n in names.split())


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

    # What callbacks read: the parts and the loop's counters, by their usual names.
    engine, model, optimizer, scheduler = _reads("parts", "engine model optimizer scheduler")
    data, loss_fn, tech, metrics = _reads("parts", "data loss_fn tech metrics")
    train_loader, val_loader, test_loader = _reads("parts", "train_loader val_loader test_loader")
    n_batches, per_rank_batch, monitor, mode = _reads(
        "parts", "n_batches per_rank_batch monitor mode"
    )
    updates_per_epoch, total_steps = _reads("parts", "updates_per_epoch total_steps")
    epoch, batch_in_epoch, step, micro = _reads("state", "epoch batch_in_epoch step micro")
    lr_scale, rollbacks, nonfinite_skipped = _reads("state", "lr_scale rollbacks nonfinite_skipped")
    best, resumed_from = _reads("state", "best resumed_from")

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
        if cfg.meta.enabled:
            raise ValueError(
                "meta.enabled=true runs the meta-learning loop, not the Trainer: use "
                "`kiln train CONFIG` or kiln.meta.runner.run_meta(cfg)"
            )
        self.cfg, self.verbose = cfg, verbose
        self.callbacks = Callbacks(callbacks)
        self.stop = StopRequest()
        self._last_train: dict[str, float] = {}  # the last logged train metrics
        self.logger: MetricsLogger | None = None  # set by fit()
        self.progress: Progress | None = None  # set by fit()
        # Before any work: a resume that would change what the run trains is refused.
        plan = resume_policy.check(cfg)
        self.parts = build.build_parts(cfg, model, data)
        self.auto = None
        if cfg.train.auto_microbatch:
            say = self._say if verbose and self.is_zero else None
            self.auto = AutoMicrobatch(
                self.parts.per_rank_batch, accumulate=self.engine.accumulate, say=say
            )
        opened = open_run(cfg, self.parts, run_dir, plan)
        self.run_dir, self.state, self.complete = opened.run_dir, opened.state, opened.complete
        self._resume_record = opened.record  # the metrics.jsonl line of this resume
        ck = cfg.checkpoint
        self.ckpts = CheckpointManager(
            self.run_dir / CHECKPOINTS,
            keep_last=ck.keep_last,
            keep_best=ck.keep_best,
            mode=self.mode,
        )

    @property
    def is_zero(self) -> bool:
        """Whether this process is rank 0 (the one that writes files)."""
        return bool(self.parts.engine.world.is_zero)

    def _say(self, line: str) -> None:
        if self.progress is not None and self.progress.enabled:
            self.progress.print(line)
        else:
            print(line, flush=True)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit (DESIGN.md rule 5); see ``snapshots``."""
        return snapshots.capture(self.parts, self.state, self.cfg, self.ckpts.dir)

    def _should_stop(self) -> bool:
        return self.stop.agree(self.engine.world.size, self.engine.device)

    def request_stop(self, reason: str = "request", *, interrupt: bool = False) -> None:
        """Stop at the next logging step or epoch end (callbacks may call this).

        A plain stop (early stopping) ends the run normally: best weights, test metrics,
        ``on_fit_end``. With ``interrupt=True`` (what SIGINT/SIGTERM do) Kiln saves a checkpoint
        and raises :class:`TrainingInterrupted`, so the run can be resumed.
        """
        self.stop.request(reason, interrupt=interrupt)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        """Train, validate, checkpoint; return the best metrics and the test metrics."""
        cfg, engine = self.cfg, self.parts.engine
        if self.complete is not None:  # resumed a finished run: say so, write nothing
            if engine.owns_group:
                engine.close()
            if self.verbose and self.is_zero:
                print(self.complete, flush=True)
            return completed_result(self.run_dir, self.state.step)
        self.logger = MetricsLogger(
            self.run_dir, tensorboard=cfg.log.tensorboard, enabled=self.is_zero
        )
        if self._resume_record is not None:  # where this process starts, before any update
            self.logger.log(self._resume_record, step=self.state.step)
        shown = cfg.log.progress if self.is_zero else False
        self.progress = Progress(self.total_steps, enabled=shown, initial=self.state.step)
        # Anomaly mode (debugging): a NaN produced in backward raises, naming the op and the
        # forward line that created it. It slows every step, so it is off by default.
        anomaly = (
            torch.autograd.set_detect_anomaly(True, check_nan=True)
            if cfg.detect_anomaly
            else nullcontext()
        )
        try:
            with stop_on_signals(self.request_stop), self.progress, anomaly:
                if cfg.train.nonfinite == "rollback" and self.ckpts.last() is None:
                    self._save()  # a state to roll back to before the first update
                self.callbacks.fire("on_fit_start", self)
                # train.max_steps, when set, decides the length (epochs are then unbounded).
                while self.state.step < self.total_steps and (
                    cfg.train.max_steps or self.state.epoch < cfg.train.epochs
                ):
                    self._train_epoch()
                    if self._should_stop():
                        break
            if self._should_stop() and self.stop.interrupt:
                path = self._save()
                raise TrainingInterrupted(self.stop.reason or "stop", path, self.run_dir)
            # The final position; a non-finite one must not push out a finite one. Sharded
            # FSDP models are saved anyway (ranks must agree; weights are checked when written).
            finite = snapshots.sharded(engine) or not nonfinite_tensors(engine.model)  # type: ignore[arg-type]
            if (self.state.batch_in_epoch or not cfg.checkpoint.every_epoch) and finite:
                self._save()
            result = finish(
                cfg,
                self.parts,
                self.state,
                run_dir=self.run_dir,
                ckpts=self.ckpts,
                logger=self.logger,
                stopped=self.stop.reason,
            )
        except BaseException as exc:
            self.callbacks.fire("on_exception", self, exc)
            if engine.owns_group and engine.world.size == 1:
                engine.close()  # a private group of one: nothing to wait for
            raise  # a group shared with other ranks dies with the process (torchrun decides)
        finally:
            self.logger.close()
        if engine.owns_group:
            self.parts.model = engine.model  # type: ignore[assignment]
            engine.close()
        self.callbacks.fire("on_fit_end", self, result)
        return result

    def _train_epoch(self) -> None:
        cfg, parts, state = self.cfg, self.parts, self.state
        tech, epoch = parts.tech, state.epoch
        start_epoch(parts.train_loader, epoch, state.batch_in_epoch)
        changed = tech.begin_epoch(self.engine.model, parts.optimizer, epoch)
        if changed and self.verbose and self.is_zero:
            print(f"epoch {epoch + 1}: unfroze {len(changed)} parameter tensors", flush=True)
        self.callbacks.fire("on_epoch_start", self, epoch)
        t0 = time.perf_counter()
        losses: list[torch.Tensor] = []  # detached, since the last log: no graph, no host read
        sched = parts.scheduler
        # SWALR owns the learning rate from the SWA start epoch on.
        schedule = sched if sched and sched.interval == "step" and not tech.swa_on(epoch) else None
        guarded, multi = cfg.train.nonfinite != "ignore", self.engine.world.size > 1
        # Read once per epoch, not per update: the loop's own Python is most of its overhead.
        log_every, save_every = cfg.train.log_every, cfg.checkpoint.every_n_steps
        total, stop, progress = self.total_steps, self.stop, self.progress
        tech.train_mode(parts.model, self.engine.model)
        batches = enumerate(parts.train_loader, state.batch_in_epoch)
        while True:
            log_now = (state.step + 1) % log_every == 0
            r = train_step(
                parts,
                batches,
                losses,
                epoch=epoch,
                step=state.step,
                micro=state.micro,
                guard=guarded,
                grad_norm=log_now,
                schedule=schedule,
                auto=self.auto,
            )
            if r is None:
                break
            state.batch_in_epoch, state.micro = r.batch, r.micro
            if not r.finite:
                if self._nonfinite(r.x):
                    return  # rolled back: the loop continues from the restored checkpoint
                continue
            state.step += 1
            self.callbacks.fire("on_update_end", self, state.step)
            if log_now:
                self._log_train(mean_loss(losses, self.engine.world.size), r.grad_norm)
                losses.clear()
            progress.update(state.step)  # type: ignore[union-attr]
            if save_every and state.step % save_every == 0:
                self._save()
            # Under several processes a stop is agreed at logging steps (no per-step sync).
            if state.step >= total or (
                log_now and self._should_stop() if multi else stop.reason is not None
            ):
                break
        if state.batch_in_epoch == parts.n_batches:
            self._end_epoch(time.perf_counter() - t0)

    def _nonfinite(self, x: Any) -> bool:
        """Apply ``train.nonfinite`` to a bad update (see ``guard``); True when rolled back."""
        cfg, parts, state = self.cfg.train, self.parts, self.state
        v = guard.verdict(cfg, state, parts.engine.updates)
        state.skip_streak = v.streak
        if v.action == "skip":
            guard.skip(parts, state)
            return False
        if v.action == "rollback":
            last = self.ckpts.last()
            self.state = state = guard.rollback(parts, state, last, factor=cfg.rollback_lr_factor)
            if self.verbose and self.is_zero and last is not None:
                print(guard.rollback_line(last, state, cfg.max_rollbacks), flush=True)
            self.logger.log({"train/rollbacks": state.rollbacks}, step=state.step)  # type: ignore[union-attr]
            return True
        raise stop_error(parts, state, x, save=self._save, advice=v.advice)

    def _end_epoch(self, seconds: float) -> None:
        cfg, parts, state = self.cfg, self.parts, self.state
        tech = parts.tech
        metrics: dict[str, float] = {"epoch": state.epoch + 1, "epoch_time_s": round(seconds, 3)}
        swa_on = tech.swa_on(state.epoch)
        metrics.update(tech.end_epoch(self.engine.model, state.epoch))
        if hasattr(parts.loss_fn, "task_weights"):  # multi-task: the learned weight of each task
            metrics.update({f"task_weight/{k}": v for k, v in parts.loss_fn.task_weights().items()})
        val: dict[str, float] = {}
        if parts.val_loader is not None and (state.epoch + 1) % cfg.train.val_every == 0:
            val = self.validate()
            metrics.update({f"val/{k}": v for k, v in val.items()})
        epoch_schedule(None if swa_on else parts.scheduler, val, parts.monitor)
        if tech.early is not None and val and parts.early_monitor:
            reason = tech.early.check(parts.early_monitor, val)
            if reason is not None:
                self.request_stop(reason)
        state.epoch += 1
        state.batch_in_epoch = 0
        self.logger.log(metrics, step=state.step)  # type: ignore[union-attr]
        if self.verbose and self.is_zero:
            line = epoch_line(state.epoch, cfg.train.epochs, state.step, metrics, seconds)
            if state.nonfinite_skipped:
                line += f"  skipped {state.nonfinite_skipped} non-finite updates"
            self._say(line)
        if cfg.checkpoint.every_epoch:
            self._save(metrics.get(parts.monitor))
        self.callbacks.fire("on_epoch_end", self, state.epoch, metrics)

    def validate(self) -> dict[str, float]:
        """Metrics on the validation split (fires ``on_validation_end``)."""
        parts = self.parts
        assert parts.val_loader is not None
        ema = parts.tech.ema if self.cfg.ema.evaluate else None
        with ema.swapped(parts.engine.model) if ema is not None else nullcontext():  # type: ignore[arg-type]
            val = evaluate(
                parts.model, parts.val_loader, parts.loss_fn, parts.engine, parts.metrics
            )
        self.callbacks.fire("on_validation_end", self, val)
        return val

    def _log_train(self, loss: float, grad_norm: torch.Tensor | None) -> None:
        state, lr = self.state, self.optimizer.param_groups[0]["lr"]
        skipped = state.nonfinite_skipped
        logs = train_record(
            loss, lr, grad_norm, scaler_skips=self.engine.skipped, nonfinite_skipped=skipped
        )
        self._last_train = logs
        self.logger.log(logs, step=state.step)  # type: ignore[union-attr]
        shown = {"loss": loss, "skipped": skipped} if skipped else {"loss": loss}
        self.progress.update(state.step, shown, force=True)  # type: ignore[union-attr]
        self.callbacks.fire("on_log", self, logs)

    def _save(self, metric: float | None = None) -> Path:
        state, monitor = self.state, self.parts.monitor
        if metric is None and monitor.startswith("train/"):
            metric = self._last_train.get(monitor)
        state.record_best(monitor, metric, self.parts.mode)
        snapshot = self.state_dict()  # a collective under several processes
        path = self.ckpts.dir / f"step-{state.step}.ckpt"
        if self.is_zero:
            path = self.ckpts.save(snapshot, step=state.step, metric=metric)
        distributed.barrier()  # no rank runs ahead of a checkpoint that is still being written
        self.callbacks.fire("on_checkpoint", self, path)
        return path
