"""Evaluation and the small pure helpers of the training loop (kept apart from the Trainer).

``evaluate`` is what validation, the final test pass and ``kiln eval`` share.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from kiln.losses import LossFn
from kiln.train.engine import Engine
from kiln.train.metrics import MultiTaskMetrics, TaskMetrics

__all__ = ["accumulation_weights", "evaluate", "group_totals", "monitor_mode"]


def monitor_mode(metric: str, mode: str) -> str:
    """``auto`` -> max for accuracy-like metrics, min for losses and errors."""
    if mode != "auto":
        return mode
    return (
        "max" if any(k in metric for k in ("acc", "f1", "auroc", "precision", "recall")) else "min"
    )


def accumulation_weights(sizes: Sequence[int], accumulate: int) -> list[float]:
    """Loss factor per micro-batch: its share of its group's samples (exact for a short last)."""
    weights: list[float] = []
    for start in range(0, len(sizes), accumulate):
        group = sizes[start : start + accumulate]
        weights.extend(s / sum(group) for s in group)
    return weights


def group_totals(sizes: Sequence[int], accumulate: int) -> list[int]:
    """For each batch, the number of samples in its accumulation group."""
    totals: list[int] = []
    for start in range(0, len(sizes), accumulate):
        group = sizes[start : start + accumulate]
        totals.extend([sum(group)] * len(group))
    return totals


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
