"""Finders: a learning rate from a range test, and the largest batch size that fits in memory.

Both answer a question that is otherwise settled by trial and error across whole training runs,
and both do it in seconds on the user's own model, optimizer and data, then put everything back
exactly as it was (weights, buffers, gradients, optimizer state, the Engine's counters and every
global RNG), so running a finder before training does not change the training run.

* :func:`lr_find` is the LR range test (Smith, "Cyclical Learning Rates for Training Neural
  Networks", 2017; popularised by fastai): train for ``num_steps`` updates while the LR grows
  geometrically from ``start_lr`` to ``end_lr``, record the loss, smooth it, stop once it
  diverges, and suggest the LR where the smoothed loss falls fastest (:func:`suggest_lr`).
* :func:`batch_find` doubles the batch size (``mode="power"``), optionally followed by a binary
  search (``mode="binary"``), until one training step runs out of memory or its measured peak
  memory exceeds a budget.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> data = [(torch.randn(32, 4), torch.randint(0, 2, (32,))) for _ in range(4)]
    >>> result = lr_find(model, opt, data, nn.functional.cross_entropy, num_steps=20)
    >>> len(result.lrs), result.lrs[0]
    (20, 1e-07)
    >>> found = batch_find(model, opt, lambda n: data[0], nn.functional.cross_entropy, max_batch=8)
    >>> found.batch_size
    8
"""

from kiln.algorithms.finders._state import preserved
from kiln.algorithms.finders.batch import (
    BatchFindResult,
    BatchSizeError,
    BatchTrial,
    batch_find,
    peak_step_memory,
)
from kiln.algorithms.finders.lr import LRFindResult, lr_find, suggest_lr

__all__ = [
    "BatchFindResult",
    "BatchSizeError",
    "BatchTrial",
    "LRFindResult",
    "batch_find",
    "lr_find",
    "peak_step_memory",
    "preserved",
    "suggest_lr",
]
