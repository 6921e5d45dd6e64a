"""The end of a fit: best (EMA) weights or the SWA average -> model.safetensors, test metrics,
summary.json, and the :class:`FitResult` the Trainer returns.

Functions take the trainer as their first argument (``self``) and are called by it only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from kiln.train import build, distributed, snapshots
from kiln.train.checkpoint.weights import save_weights
from kiln.train.evaluation import evaluate
from kiln.train.final_checks import (
    check_final_metrics,
    final_weights_problem,
    nonfinite_tensors,
)
from kiln.train.guard import NonFiniteError
from kiln.train.metrics import build_metrics

if TYPE_CHECKING:
    from kiln.train.trainer import Trainer

__all__ = ["FitResult", "final_kind", "finish", "swa_result"]


@dataclass
class FitResult:
    """What a finished ``fit()`` returns."""

    run_dir: Path
    steps: int
    val: dict[str, float] = field(default_factory=dict)  # best validation metrics
    test: dict[str, float] = field(default_factory=dict)  # test metrics of the best weights
    best_checkpoint: Path | None = None
    stopped: str | None = None  # why training ended early (early stopping, a stop request)


def finish(self: Trainer) -> FitResult:
    """Save the best weights as model.safetensors and measure them on the test split."""
    # The final position; a non-finite one must not push out a finite one. Sharded FSDP
    # models are saved anyway (their ranks must agree; the weights are checked when written).
    finite = snapshots.sharded(self) or not nonfinite_tensors(self.engine.model)  # type: ignore[arg-type]
    if (self.batch_in_epoch or not self.cfg.checkpoint.every_epoch) and finite:
        self._save()
    best_name = self.ckpts.best_name() if self.is_zero else None
    best_name = distributed.broadcast_object(best_name)
    best_file = self.ckpts.dir / best_name if best_name else None
    final = snapshots.best_weights(self, best_file)
    if self.tech.swa is not None and final is not None:
        final = swa_result(self)
    result = FitResult(
        self.run_dir, self.step, best_checkpoint=best_file, stopped=self._stop_reason
    )
    problem = None
    if final is not None:
        saved = [self.ckpts.dir / name for name in self.ckpts.index["saved"]]
        policy = self.cfg.train.nonfinite
        problem = final_weights_problem(
            final, checkpoints=saved, policy=policy, run_dir=self.run_dir
        )
    if distributed.broadcast_object(problem):  # every rank stops: never write NaN weights
        raise NonFiniteError(problem)
    if final is not None:  # rank 0: plain weights, evaluated without collectives
        save_weights(final, self.run_dir / "model.safetensors", self.cfg, self.data.info)
        metrics = build_metrics(
            self.data.info, device=self.engine.device, top_k=self.cfg.train.top_k
        )
        if self.data.val is not None:
            full_val = build.loader_for(
                self.cfg, self.data.val, train=False, device=self.engine.device
            )
            result.val = evaluate(final, full_val, self.loss_fn, self.engine, metrics)
        if self.test_loader is not None:
            result.test = evaluate(final, self.test_loader, self.loss_fn, self.engine, metrics)
            self.logger.log({f"test/{k}": v for k, v in result.test.items()}, step=self.step)
        summary = {
            "steps": self.step,
            "val": result.val,
            "test": result.test,
            "best_checkpoint": str(best_file) if best_file else None,
            "weights": final_kind(self, best_file),
            "stopped": self._stop_reason,
            "skipped_updates": self.nonfinite_skipped,  # train.nonfinite=skip
            "rollbacks": self.rollbacks,
            "resumed_from_step": self.resumed_from,  # one entry per resume, in order
        }
        if hasattr(self.loss_fn, "task_weights"):
            summary["task_weights"] = self.loss_fn.task_weights()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    result.val, result.test = distributed.broadcast_object((result.val, result.test))
    check_final_metrics(  # a NaN loss of the final weights: exit 2
        {"val": result.val, "test": result.test},
        skipped=self.nonfinite_skipped,
        rollbacks=self.rollbacks,
        steps=self.step,
        policy=self.cfg.train.nonfinite,
        run_dir=self.run_dir,
    )
    return result


def final_kind(self: Trainer, best_file: Path | None) -> str:
    """What model.safetensors holds (written to summary.json)."""
    if self.tech.swa is not None:
        return f"swa average of {self.tech.swa.n_averaged} epochs"
    ck = self.cfg.checkpoint
    only_final = not ck.every_epoch and ck.every_n_steps is None  # one checkpoint: the last
    # No best checkpoint (no finite monitored metric): the weights are the final ones.
    what = "final weights" if only_final or best_file is None else "best checkpoint"
    if self.tech.ema is not None and self.cfg.ema.evaluate:
        return f"ema of the {what}"
    return what


def swa_result(self: Trainer) -> nn.Module:
    """The SWA average, with BatchNorm statistics recomputed over the training split."""
    swa = self.tech.swa
    assert swa is not None
    if swa.n_averaged == 0:
        raise RuntimeError(
            f"SWA averaged no epoch (training ended before swa.start_epoch={swa.start_epoch}); "
            "lower swa.start_epoch"
        )
    loader = None
    if self.cfg.swa.update_bn:
        loader = build.loader_for(self.cfg, self.data.train, train=False, device=self.engine.device)
    model = swa.result(loader, self.engine.to_device)
    model.eval()
    return model
