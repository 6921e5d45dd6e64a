"""Evaluation: what validation, the final test pass and ``kiln eval`` share.

Accumulation weights are not here: the Engine weighs every micro-batch exactly by itself
(:mod:`kiln.train.accumulation`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kiln.losses import LossFn
from kiln.train.engine import Engine
from kiln.train.metrics import MultiTaskMetrics, TaskMetrics

__all__ = ["evaluate", "monitor_mode"]


def monitor_mode(metric: str, mode: str) -> str:
    """``auto`` -> max for accuracy-like metrics, min for losses and errors."""
    if mode != "auto":
        return mode
    return (
        "max" if any(k in metric for k in ("acc", "f1", "auroc", "precision", "recall")) else "min"
    )


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    engine: Engine,
    metrics: TaskMetrics | MultiTaskMetrics,
) -> dict[str, float]:
    """Loss and task metrics of ``model`` over ``loader`` (inference mode, one host sync)."""
    was_training = model.training
    model.eval()
    metrics.reset()
    with torch.inference_mode():
        for batch in loader:
            x, y = engine.to_device(batch)
            with engine.autocast():
                out = model(x)
                loss_sum = loss_fn(out, y, reduction="sum")
            tokens = isinstance(out, torch.Tensor) and out.dim() == 3  # lm: loss per token
            metrics.update(out, y, loss_sum=loss_sum, count=y.numel() if tokens else len(y))
    model.train(was_training)
    return metrics.compute()
