"""Task metrics: each metric is computed on its own (no merged states)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.train.metrics import TaskMetrics


def test_top5_is_not_merged_with_top1() -> None:
    """torchmetrics' compute groups would merge top-1 and top-5 after an all-correct batch."""
    m = TaskMetrics("classification", num_classes=10, device=torch.device("cpu"))
    y = torch.arange(10)
    right = F.one_hot(y, 10).float()  # batch 1: all right at top-1 (so top-1 == top-5 state)
    second = F.one_hot((y + 1) % 10, 10).float()
    second[torch.arange(10), y] = 0.5  # batch 2: wrong at top-1, right at top-5
    for out in (right, second):
        m.update(out, y, loss_sum=torch.zeros(()), count=10)
    got = m.compute()
    assert got["acc"] == 0.5
    assert got["top5_acc"] == 1.0
