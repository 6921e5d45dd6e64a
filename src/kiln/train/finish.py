"""The end of a fit: best (EMA) weights or the SWA average -> model.safetensors, test metrics,
summary.json, and the :class:`FitResult` the Trainer returns.

Plain functions of the fit's parts and loop state (the Trainer calls them after its last save).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kiln.config import Config
from kiln.errors import UsageError
from kiln.run import SUMMARY, WEIGHTS
from kiln.train import build, distributed, snapshots
from kiln.train.build import Parts
from kiln.train.checkpoint.weights import save_weights
from kiln.train.evaluation import evaluate
from kiln.train.final_checks import check_final_metrics, final_weights_problem
from kiln.train.guard import NonFiniteError
from kiln.train.loop_state import LoopState
from kiln.train.metrics import build_metrics

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


def finish(
    cfg: Config,
    parts: Parts,
    state: LoopState,
    *,
    run_dir: Path,
    ckpts: Any,
    logger: Any,
    stopped: str | None,
) -> FitResult:
    """Save the best weights as model.safetensors and measure them on the test split.

    Args:
        cfg: the run's config.
        parts: the fit's parts.
        state: where the loop ended (the final checkpoint is already written).
        run_dir: the run directory.
        ckpts: the run's :class:`~kiln.train.checkpoint.CheckpointManager`.
        logger: the run's metrics logger (the test metrics go there).
        stopped: why training ended early, or None.
    """
    engine = parts.engine
    best_name = ckpts.best_name() if engine.world.is_zero else None
    best_name = distributed.broadcast_object(best_name)
    best_file = ckpts.dir / best_name if best_name else None
    final = snapshots.best_weights(parts, best_file, ema=cfg.ema.evaluate)
    if parts.tech.swa is not None and final is not None:
        final = swa_result(cfg, parts)
    result = FitResult(run_dir, state.step, best_checkpoint=best_file, stopped=stopped)
    problem = None
    if final is not None:
        saved = [ckpts.dir / name for name in ckpts.index["saved"]]
        policy = cfg.train.nonfinite
        problem = final_weights_problem(final, checkpoints=saved, policy=policy, run_dir=run_dir)
    if distributed.broadcast_object(problem):  # every rank stops: never write NaN weights
        raise NonFiniteError(problem)
    if final is not None:  # rank 0: plain weights, evaluated without collectives
        info = parts.data.info
        save_weights(final, run_dir / WEIGHTS, cfg, info)
        metrics = build_metrics(info, device=engine.device, top_k=cfg.train.top_k)
        if parts.data.val is not None:
            full_val = build.loader_for(cfg, parts.data.val, train=False, device=engine.device)
            result.val = evaluate(final, full_val, parts.loss_fn, engine, metrics)
        if parts.test_loader is not None:
            result.test = evaluate(final, parts.test_loader, parts.loss_fn, engine, metrics)
            logger.log({f"test/{k}": v for k, v in result.test.items()}, step=state.step)
        summary = {
            "steps": state.step,
            "val": result.val,
            "test": result.test,
            "best_checkpoint": str(best_file) if best_file else None,
            "weights": final_kind(cfg, parts.tech, best_file),
            "stopped": stopped,
            "skipped_updates": state.nonfinite_skipped,  # train.nonfinite=skip
            "rollbacks": state.rollbacks,
            "resumed_from_step": state.resumed_from,  # one entry per resume, in order
        }
        if hasattr(parts.loss_fn, "task_weights"):
            summary["task_weights"] = parts.loss_fn.task_weights()
        (run_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
    result.val, result.test = distributed.broadcast_object((result.val, result.test))
    check_final_metrics(  # a NaN loss of the final weights: exit 2
        {"val": result.val, "test": result.test},
        skipped=state.nonfinite_skipped,
        rollbacks=state.rollbacks,
        steps=state.step,
        policy=cfg.train.nonfinite,
        run_dir=run_dir,
    )
    return result


def final_kind(cfg: Config, tech: Any, best_file: Path | None) -> str:
    """What model.safetensors holds (written to summary.json).

    Example:
        >>> from kiln.config import load_config
        >>> from types import SimpleNamespace
        >>> final_kind(load_config(None, []), SimpleNamespace(swa=None, ema=None), None)
        'final weights'
    """
    if tech.swa is not None:
        return f"swa average of {tech.swa.n_averaged} epochs"
    ck = cfg.checkpoint
    only_final = not ck.every_epoch and ck.every_n_steps is None  # one checkpoint: the last
    # No best checkpoint (no finite monitored metric): the weights are the final ones.
    what = "final weights" if only_final or best_file is None else "best checkpoint"
    if tech.ema is not None and cfg.ema.evaluate:
        return f"ema of the {what}"
    return what


def swa_result(cfg: Config, parts: Parts) -> nn.Module:
    """The SWA average, with BatchNorm statistics recomputed over the training split."""
    swa = parts.tech.swa
    assert swa is not None
    if swa.n_averaged == 0:  # the user's settings, not a bug: the last checkpoint is saved
        cut = f" at train.max_steps={cfg.train.max_steps}" if cfg.train.max_steps else ""
        raise UsageError(
            f"SWA averaged no epoch: training ended{cut} before swa.start_epoch="
            f"{swa.start_epoch}; lower swa.start_epoch, or resume this run (resume=RUN) with a "
            "larger train.max_steps to reach it"
        )
    loader = None
    if cfg.swa.update_bn:
        device = parts.engine.device
        loader = build.loader_for(cfg, parts.data.train, train=False, device=device)
    model = swa.result(loader, parts.engine.to_device)
    model.eval()
    return model
