"""Pruning: zero the smallest weights (unstructured) or remove whole channels (structured).

* :mod:`kiln.compress.prune.core`: masks, schedules, sparsity and
  :func:`~kiln.compress.prune.core.prune_model`.
* :mod:`kiln.compress.prune.structured`: channels really removed, shapes rebuilt.
* :mod:`kiln.compress.prune.io`: pruned files that rebuild their model.
* :mod:`kiln.compress.prune.run`: fine-tuning, rewinds and BatchNorm re-estimation for runs.
"""

from kiln.compress.prune.core import (
    PruneSpec,
    make_permanent,
    prune_model,
    prune_unstructured,
    sparsity,
)
from kiln.compress.prune.io import load_pruned, save_pruned

__all__ = [
    "PruneSpec",
    "load_pruned",
    "make_permanent",
    "prune_model",
    "prune_unstructured",
    "save_pruned",
    "sparsity",
]
